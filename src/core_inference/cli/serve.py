"""``core-inference serve``: the OpenAI-compatible HTTP server (extra ``server``)."""

from __future__ import annotations

import importlib.util
import sys
from typing import Any

from ..types import LoadConfig

API_KEY_ENV = "CORE_INFERENCE_API_KEY"


def click_command() -> Any:
    """The ``serve`` click command (click is imported by the caller's ``build_cli``)."""
    import click

    from .app import _not_empty, _registered, engine_option

    @click.command("serve")
    @click.option("-m", "--model", metavar="PATH", callback=_not_empty,
                  help="Model file, folder or URL (default: the built-in SmolLM2-135M-Instruct).")
    @click.option("-b", "--backend", metavar="NAME", callback=_registered,
                  help="Backend to load with (see 'backends').")
    @click.option("--host", default="127.0.0.1", show_default=True,
                  help="Address to listen on (0.0.0.0 for every interface).")
    @click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535),
                  help="Port to listen on (0: one the OS picks; the line on stderr says which).")
    @click.option("--parallel", default=4, show_default=True, type=click.IntRange(1, 1024),
                  help="Requests generated at once (the model's parallel slots).")
    @click.option("--queue", "queue", type=click.IntRange(0, 100_000),
                  help="Requests that may wait for a slot; past them the answer is 429 [4 x --parallel].")
    @click.option("--api-key", metavar="KEY", envvar=API_KEY_ENV, show_envvar=True,
                  help="Require 'Authorization: Bearer KEY' on every request.")
    @click.option("--model-name", metavar="NAME", callback=_not_empty,
                  help="The model's id in the API [the model file's name].")
    @click.option("--max-tokens", default=256, show_default=True, type=click.IntRange(1),
                  help="Chat answers' length when a request does not say.")
    @click.option("--max-body", default=4 * 2**20, show_default=True, type=click.IntRange(1),
                  help="Largest request body in bytes (413 past it).")
    @click.option("--body-timeout", default=30.0, show_default=True, type=click.FloatRange(0.1),
                  help="Seconds a request body may take to arrive (408 past it).")
    @click.option("--threads", type=click.IntRange(0), help="CPU threads (0: all cores).")
    @click.option("--context-len", type=click.IntRange(0), help="Context length in tokens (0: the model's).")
    @click.option("--gpu-layers", type=click.IntRange(-1), help="Layers offloaded to the GPU (-1: all).")
    @engine_option(click)
    @click.option("--log-level", default="warning", show_default=True,
                  type=click.Choice(["critical", "error", "warning", "info", "debug"]))
    def serve_cmd(**kw: Any) -> int:
        """Serve a model over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions).

        Binds 127.0.0.1 unless --host says otherwise. SIGTERM or Ctrl-C stops it
        gracefully: new requests are refused, answers in flight finish, exit status 0.
        """
        return run_serve(**kw)

    return serve_cmd


def run_serve(
    model: str | None, backend: str | None, host: str, port: int, parallel: int, queue: int | None,
    api_key: str | None, model_name: str | None, max_tokens: int, max_body: int, body_timeout: float,
    threads: int | None,
    context_len: int | None, gpu_layers: int | None, log_level: str,
    engine_options: dict[str, Any] | None = None,
) -> int:
    """Load the model, bind, serve until stopped; the exit status."""
    from .app import fail

    missing = [m for m in ("starlette", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        from ..server import INSTALL_HINT

        return fail(f"serve needs {' and '.join(missing)}: {INSTALL_HINT}")
    from ..server.app import ServerState, bind, print_ready, run
    from ..server.metrics import ServerMetrics
    from ..server.serving import Admission, Served
    from .run import open_model

    load: dict[str, Any] = {"backend": backend or "", "parallel_slots": parallel}
    for key, value in (("threads", threads), ("context_len", context_len), ("gpu_layers", gpu_layers),
                       ("engine_options", engine_options)):
        if value is not None:
            load[key] = value
    sock = bind(host, port)  # before the model loads: a port in use fails at once
    try:
        loaded = open_model(model, LoadConfig(**load), chat=True)
        with loaded.model as m:
            metrics = ServerMetrics()
            name = model_name or loaded.name
            if model is not None and "://" in model and not model_name:
                # a remote model (the openai backend): its own id, not the URL's last segment
                name = str(getattr(m, "model_id", "") or model)
            slots = parallel
            engine_slots = m.capabilities.parallel_slots
            if 0 < engine_slots < parallel:  # the rest would wait inside the model, unseen and unbounded
                print(f"core-inference serve: {loaded.backend} runs {engine_slots} request(s) at once; "
                      f"--parallel {parallel} lowered to {engine_slots}", file=sys.stderr, flush=True)
                slots = engine_slots
            served = Served(m, name, metrics,
                            Admission(slots, 4 * parallel if queue is None else queue, metrics),
                            chat_max_tokens=max_tokens)
            state = ServerState(served, api_key=api_key or None, max_body=max_body, body_timeout=body_timeout)
            ok = run(state, sock, log_level, print_ready)
    finally:
        sock.close()
    return 0 if ok else 1


__all__ = ["API_KEY_ENV", "click_command", "run_serve"]
