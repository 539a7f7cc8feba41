"""The ``llama_server`` suite: concurrent streams against llama.cpp's own ``llama-server`` (issue 14).

The native anchor: ``llama-server -np 16`` (built from the llama.cpp that the installed
llama-cpp-python vendors, by ``python -m core_inference.bench.llama_server``; ``make bench``
does it) decodes its slots together. Each row is N concurrent streams (1, 4, 16), each
asking for 48 greedy tokens of its own prompt, on the same model with the same threads:

- ``llama-server -np 16`` over its ``/v1/completions`` streaming API (the reference),
- ours through the Python API: N threads each running ``generate`` on one model loaded
  with ``parallel_slots=16``,
- ours through ``core-inference serve --parallel 16`` over the same HTTP API,
- both of ours again with ``batch_invariant=True`` (answers independent of the load:
  docs/reliability.md), the Python side in a worker process of its own since the option
  switches a kernel off for the whole process. These two carry no target: they show what
  that option costs against the anchor.

One more row has 16 streams of unequal lengths (every 4th asks for 4 tokens, the others for
64), as a server's answers are: the short ones end and leave free sequences between the long
ones' for the rest of the run.

A side's value is the aggregate tokens/s: every stream's tokens over the wall time from
the first request to the last token. Both servers run as child processes on 127.0.0.1;
the HTTP clients (asyncio + httpx2) run in this process. Without the binary the rows
are listed as not run, saying why (nothing is loaded or started).
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from functools import partial
from typing import Any

from .harness import BenchConfig, BenchError, Row, Side, Suite, Target
from .invariant_worker import InvariantWorker
from .llama_cpp_suite import BATCH_PROMPTS
from .llama_server import LlamaServer, find_binary
from .llama_server import why_unavailable as _binary_missing

SLOTS = 16
STREAMS = (1, 4, 16)
ANSWER_TOKENS = 48
TARGET_STREAMS = (4, 16)  # where ours must reach llama-server's aggregate
UNEVEN_SHORT = 4  # the uneven row: every 4th stream asks for this many tokens, the others for 64
UNEVEN_LONG = 64
QUICK_STREAMS = (1, 4)
QUICK_TOKENS = 4
ANCHOR = f"llama-server -np {SLOTS}"
API = f"ours: Python API, {{n}} x generate, parallel_slots={SLOTS}"
SERVE = f"ours: serve --parallel {SLOTS}"
INVARIANT_API = f"ours: Python API, parallel_slots={SLOTS}, batch_invariant=True"
INVARIANT_SERVE = f"ours: serve --parallel {SLOTS} --engine-option batch_invariant=true"


def prompts(n: int) -> list[str]:
    """Stream i's prompt: a different one for each of up to 16 streams."""
    return [BATCH_PROMPTS[i % len(BATCH_PROMPTS)] for i in range(n)]


async def _http_stream(client: Any, url: str, body: dict[str, Any]) -> int:
    """One streaming ``/v1/completions`` request; its completion tokens (from ``usage``
    when the server sends it, else one per chunk with text)."""
    chunks, usage = 0, None
    async with client.stream("POST", url + "/completions", json=body) as r:
        if r.status_code != 200:
            raise BenchError(f"HTTP {r.status_code} from {url}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            if "error" in data:
                raise BenchError(f"error event from {url}: {data['error']}")
            if data.get("usage"):
                usage = data["usage"].get("completion_tokens")
            chunks += sum(1 for c in data.get("choices", []) if c.get("text"))
    return int(usage) if usage is not None else chunks


def http_streams(url: str, bodies: list[dict[str, Any]]) -> tuple[int, float]:
    """Every body sent at once as its own streaming request: (total tokens, wall seconds)."""
    import httpx2

    async def go() -> tuple[int, float]:
        n = len(bodies)
        limits = httpx2.Limits(max_connections=n, max_keepalive_connections=n)
        async with httpx2.AsyncClient(timeout=600, limits=limits) as client:
            start = time.perf_counter()
            got = await asyncio.gather(*(_http_stream(client, url, b) for b in bodies))
            return sum(got), time.perf_counter() - start

    return asyncio.run(go())


def api_streams(model: Any, texts: list[str], max_tokens: int | list[int]) -> tuple[int, float]:
    """Every prompt streamed by its own thread through ``generate`` at once: (tokens, seconds).
    ``max_tokens``: for all, or per prompt."""
    counts = [0] * len(texts)
    limits = max_tokens if isinstance(max_tokens, list) else [max_tokens] * len(texts)
    errors: list[BaseException] = []
    go = threading.Barrier(len(texts) + 1)

    def run(i: int) -> None:
        try:
            go.wait()
            for _ in model.generate(texts[i], max_tokens=limits[i]):
                counts[i] += 1
        except BaseException as exc:  # reported below, in the caller
            errors.append(exc)

    pool = [threading.Thread(target=run, args=(i,)) for i in range(len(texts))]
    for t in pool:
        t.start()
    go.wait()
    start = time.perf_counter()
    for t in pool:
        t.join()
    seconds = time.perf_counter() - start
    if errors:
        raise BenchError(f"a stream failed: {errors[0]!r}")
    return sum(counts), seconds


def _side(record: list[dict[str, Any]], run: Callable[[], tuple[int, float]]) -> Callable[[], float]:
    """A side's callable: run once, keep its tokens and seconds in the row's info."""

    def timed() -> float:
        tokens, seconds = run()
        if tokens == 0:
            raise BenchError("no tokens came back")
        record.append({"tokens": tokens, "seconds": round(seconds, 4)})
        return tokens / seconds

    return timed


def _row(n: int, tokens: int, sides: list[Side], info: dict[str, Any], skipped: str | None = None) -> Row:
    """The row for ``n`` concurrent streams (``sides``: anchor, Python API, serve, and both
    of ours with ``batch_invariant=True``)."""
    api = API.format(n=n)
    return Row(
        key=f"llama_server_{n}_streams",
        title=f"{n} concurrent stream{'s' if n > 1 else ''} x {tokens} greedy tokens, "
              f"vs llama-server -np {SLOTS}",
        unit="tokens/s",
        sides=sides,
        reference=ANCHOR,
        targets=[Target(api, ">=", 1.0, ANCHOR), Target(SERVE, ">=", 1.0, ANCHOR)]
        if n in TARGET_STREAMS else [],
        note="aggregate tokens/s: every stream's tokens over the wall time from the first "
             "request to the last token; each stream its own prompt, prefilled afresh; "
             "info.runs has every run's tokens and seconds (warm-up runs first)",
        info={"streams": n, "max_tokens": tokens, "expected_tokens": n * tokens, "slots": SLOTS,
              "prompts": prompts(n), **info},
        skipped=skipped,
    )


def _not_run() -> float:
    raise BenchError("a skipped row's side was run")


def _rows(cfg: BenchConfig) -> Iterator[Row]:
    import httpx2

    from .. import load_model
    from ..default_model import default_model_path
    from ..server.process import ServerProcess

    streams_list = QUICK_STREAMS if cfg.quick else STREAMS
    tokens = QUICK_TOKENS if cfg.quick else ANSWER_TOKENS
    missing = _binary_missing()
    if missing:  # the rows say why, and nothing is loaded or started
        for n in streams_list:
            sides = [Side(ANCHOR, _not_run, False), Side(API.format(n=n), _not_run, True),
                     Side(SERVE, _not_run, True), Side(INVARIANT_API, _not_run, True),
                     Side(INVARIANT_SERVE, _not_run, True)]
            yield _row(n, tokens, sides, {"threads": cfg.threads}, skipped=missing)
        return
    path = cfg.model or str(default_model_path(progress=False))
    with ExitStack() as stack:
        model = stack.enter_context(load_model(path, backend="llama_cpp", threads=cfg.threads,
                                               parallel_slots=SLOTS))
        ctx_per_slot = int(model.context_len)  # llama-server gets ours' room per slot
        anchor = stack.enter_context(LlamaServer(path, cfg.threads, SLOTS, ctx_per_slot))
        serve = stack.enter_context(ServerProcess(
            ["--model", path, "--parallel", str(SLOTS), "--threads", str(cfg.threads)], timeout=300))
        served_as = httpx2.get(serve.url + "/models").json()["data"][0]["id"]
        invariant = InvariantWorker(path, cfg.threads, SLOTS)
        stack.callback(invariant.close)
        invariant_serve = stack.enter_context(ServerProcess(
            ["--model", path, "--parallel", str(SLOTS), "--threads", str(cfg.threads),
             "--engine-option", "batch_invariant=true"], timeout=300))
        for n in streams_list:
            texts = prompts(n)
            common = {"max_tokens": tokens, "temperature": 0, "stream": True,
                      "stream_options": {"include_usage": True}}
            # cache_prompt off: every request prefills its prompt afresh, as ours does
            anchor_bodies = [{"prompt": p, "cache_prompt": False, **common} for p in texts]
            serve_bodies = [{"model": served_as, "prompt": p, **common} for p in texts]
            api = API.format(n=n)
            runs: dict[str, list[dict[str, Any]]] = {
                ANCHOR: [], api: [], SERVE: [], INVARIANT_API: [], INVARIANT_SERVE: []}
            sides = [
                Side(ANCHOR, _side(runs[ANCHOR], partial(http_streams, anchor.url, anchor_bodies)), False),
                Side(api, _side(runs[api], partial(api_streams, model, texts, tokens)), True),
                Side(SERVE, _side(runs[SERVE], partial(http_streams, serve.url, serve_bodies)), True),
                Side(INVARIANT_API, _side(runs[INVARIANT_API],
                                          partial(invariant.timed, "streams", texts, tokens)), True),
                Side(INVARIANT_SERVE, _side(runs[INVARIANT_SERVE],
                                            partial(http_streams, invariant_serve.url, serve_bodies)), True),
            ]
            yield _row(n, tokens, sides, {
                "model": os.path.basename(path), "threads": cfg.threads, "ctx_per_slot": ctx_per_slot,
                "llama_server": str(find_binary()), "runs": runs})
        if not cfg.quick:
            yield _uneven_row(path, cfg, model, anchor.url, serve.url, served_as)


def uneven_lengths(n: int) -> list[int]:
    """Stream i's max_tokens in the uneven row: every 4th one short, so it ends early and
    leaves its sequence free between the others' for the rest of the run."""
    return [UNEVEN_SHORT if i % 4 == 1 else UNEVEN_LONG for i in range(n)]


def _uneven_row(path: str, cfg: BenchConfig, model: Any, anchor_url: str, serve_url: str,
                served_as: str) -> Row:
    """16 streams of unequal lengths: the short ones end and leave gaps between the sequences
    of the long ones, which llama.cpp's cache per sequence cuts a decode at (unless filled)."""
    n, texts, lengths = SLOTS, prompts(SLOTS), uneven_lengths(SLOTS)
    common = {"temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    anchor_bodies = [{"prompt": p, "max_tokens": k, "cache_prompt": False, **common}
                     for p, k in zip(texts, lengths, strict=True)]
    serve_bodies = [{"model": served_as, "prompt": p, "max_tokens": k, **common}
                    for p, k in zip(texts, lengths, strict=True)]
    api = API.format(n=n)
    runs: dict[str, list[dict[str, Any]]] = {ANCHOR: [], api: [], SERVE: []}
    return Row(
        key="llama_server_uneven_16_streams",
        title=f"{n} concurrent streams, every 4th of {UNEVEN_SHORT} tokens and the rest of "
              f"{UNEVEN_LONG}, vs llama-server -np {SLOTS}",
        unit="tokens/s",
        sides=[
            Side(ANCHOR, _side(runs[ANCHOR], partial(http_streams, anchor_url, anchor_bodies)), False),
            Side(api, _side(runs[api], partial(api_streams, model, texts, lengths)), True),
            Side(SERVE, _side(runs[SERVE], partial(http_streams, serve_url, serve_bodies)), True),
        ],
        reference=ANCHOR,
        targets=[Target(api, ">=", 1.0, ANCHOR), Target(SERVE, ">=", 1.0, ANCHOR)],
        note="aggregate tokens/s; the short streams end after a few steps and leave free "
             "sequences between the long ones' for the rest of the run (a server's usual load: "
             "answers of different lengths). Ours fills each gap with a row so the streams stay "
             "one micro-batch",
        info={"streams": n, "max_tokens": lengths, "slots": SLOTS, "prompts": texts,
              "model": os.path.basename(path), "threads": cfg.threads, "runs": runs},
    )


def _why_unavailable() -> str | None:
    needed = ("llama_cpp", "httpx2", "starlette", "uvicorn")
    missing = [m for m in needed if importlib.util.find_spec(m) is None]
    if missing:
        return f"needs {', '.join(missing)} (pip install 'core-inference[server,llama-cpp]')"
    return None  # without the binary the rows are listed as not run, saying why


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    out = {}
    for dist in ("llama-cpp-python", "httpx2"):
        try:
            out[dist] = version(dist)
        except Exception:  # a version is a nicety
            out[dist] = "?"
    binary = find_binary()
    out["llama-server"] = (f"built from llama-cpp-python's vendored llama.cpp ({binary})" if binary
                           else _binary_missing() or "?")
    return out


SUITE = Suite(
    name="llama_server",
    engine=f"llama.cpp's own {ANCHOR} (the native anchor)",
    rows=_rows,
    why_unavailable=_why_unavailable,
    versions=_versions,
)


def main(argv: list[str] | None = None) -> int:
    """``python -m core_inference.bench.llama_server_suite [--quick] [--out DIR]``: this suite alone."""
    from .runner import suite_main

    return suite_main(
        SUITE, argv, "Concurrent streams: ours against llama-server -np 16.",
        quick_help="1 and 4 streams of 4 tokens: proves it runs"
    )


if __name__ == "__main__":
    raise SystemExit(main())
