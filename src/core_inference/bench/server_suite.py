"""Load on ``core-inference serve`` against llama-cpp-python's own server and our Python API.

Each row is N concurrent streaming clients for T seconds, every client asking for a
completion of the same prompt again and again (``max_tokens`` 48, greedy), on the same
model with the same threads:

- ``serve --parallel 16`` (ours, over HTTP and JSON; the reference for the targets),
- ``python -m llama_cpp.server`` (llama-cpp-python's server: one request at a time),
- the same streams through our Python API in this process (``agenerate`` on a model
  loaded with 16 parallel slots): what HTTP and JSON cost us.

A side's value is its aggregate tokens/s; requests served, errors, and p50/p99 time to
first token of every run go into the row's ``info``. Both servers run as child
processes on 127.0.0.1; the load generator (asyncio + httpx2) runs in this process.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

from .harness import BenchConfig, BenchError, Row, Side, Suite, Target

PROMPT = "Once upon a time"  # greedy, the default model writes far past 48 tokens from here
ANSWER_TOKENS = 48
PARALLEL = 16
CLIENTS = (16, 64)
SECONDS = 60.0
QUICK_CLIENTS = (2,)
QUICK_SECONDS = 5.0
QUICK_TOKENS = 8


@dataclass
class Load:
    """What N clients got in T seconds."""

    seconds: float
    requests: int = 0
    errors: int = 0
    tokens: int = 0
    ttft: list[float] = field(default_factory=list)
    error_samples: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {
            "requests": self.requests, "errors": self.errors, "tokens": self.tokens,
            "tokens_per_s": round(self.tokens / self.seconds, 2),
            "ttft_p50_s": _quantile(self.ttft, 0.50), "ttft_p99_s": _quantile(self.ttft, 0.99),
            "error_samples": self.error_samples[:3],
        }


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return round(values[0], 4)
    return round(statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1], 4)


Stream = Callable[[], AsyncIterator[str]]  # one request: its pieces of text as they arrive


async def drive(stream: Stream, clients: int, seconds: float) -> Load:
    """``clients`` loops, each running ``stream`` again and again until ``seconds`` are up.

    Tokens are counted as they arrive (a request cut by the deadline counts its tokens,
    not itself); a request that fails counts as an error.
    """
    load = Load(seconds)
    end = time.monotonic() + seconds

    async def client() -> None:
        while time.monotonic() < end:
            began = time.monotonic()
            first = True
            try:
                async for _piece in stream():
                    if first:
                        load.ttft.append(time.monotonic() - began)
                        first = False
                    load.tokens += 1
                load.requests += 1
            except Exception as exc:
                load.errors += 1
                if len(load.error_samples) < 10:
                    load.error_samples.append(f"{type(exc).__name__}: {exc}"[:300])

    tasks = [asyncio.ensure_future(client()) for _ in range(clients)]
    await asyncio.sleep(seconds)
    for t in tasks:
        t.cancel()  # requests still running at the deadline: their tokens so far count
    await asyncio.gather(*tasks, return_exceptions=True)
    return load


def http_stream(url: str, body: dict[str, Any], client: Any) -> Stream:
    """A streaming ``/v1/completions`` request; yields each chunk's text."""

    async def run() -> AsyncIterator[str]:
        async with client.stream("POST", url + "/completions", json=body) as r:
            if r.status_code != 200:
                raise BenchError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
            async for line in r.aiter_lines():
                if line == "data: [DONE]":
                    return
                if not line.startswith("data: "):
                    continue
                data = json.loads(line[6:])
                if "error" in data:
                    raise BenchError(f"error event: {data['error']}")
                for choice in data.get("choices", []):
                    if choice.get("text"):
                        yield choice["text"]

    return run


def api_stream(model: Any, max_tokens: int) -> Stream:
    """The same request through our Python API."""

    async def run() -> AsyncIterator[str]:
        async for token in model.agenerate(PROMPT, max_tokens=max_tokens):
            if token.text:
                yield token.text

    return run


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LlamaCppServer:
    """``python -m llama_cpp.server`` as a child process on 127.0.0.1."""

    def __init__(self, model: str, threads: int, n_ctx: int, timeout: float = 180.0) -> None:
        port = _free_port()
        self.url = f"http://127.0.0.1:{port}/v1"
        self._log = tempfile.TemporaryFile()  # noqa: SIM115  (closed by close())
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", model, "--n_threads", str(threads),
             "--n_threads_batch", str(threads), "--n_ctx", str(n_ctx), "--host", "127.0.0.1",
             "--port", str(port),
             # its default cuts a running stream short whenever another request arrives;
             # served one at a time instead, every client gets its whole answer
             "--interrupt_requests", "False"],
            stdout=self._log, stderr=subprocess.STDOUT)
        import httpx2

        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx2.get(self.url + "/models", timeout=2).status_code == 200:
                    break
            except httpx2.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self._log.seek(0)
                self.close()
                raise BenchError(f"llama_cpp.server did not start: {self._log.read()[-2000:]!r}")
            time.sleep(0.2)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def _why_unavailable() -> str | None:
    needed = ("starlette", "uvicorn", "httpx2", "llama_cpp")
    missing = [m for m in needed if importlib.util.find_spec(m) is None]
    if missing:
        return f"needs {', '.join(missing)} (pip install 'core-inference[server,llama-cpp]')"
    for m in ("fastapi", "sse_starlette", "starlette_context", "pydantic_settings"):
        if importlib.util.find_spec(m) is None:
            return f"llama-cpp-python's server needs {m} (pip install 'llama-cpp-python[server]')"
    return None


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    out = {}
    for dist in ("llama-cpp-python", "starlette", "uvicorn", "httpx2"):
        try:
            out[dist] = version(dist)
        except Exception:  # a version is a nicety
            out[dist] = "?"
    return out


def _rows(cfg: BenchConfig) -> Iterator[Row]:
    import httpx2

    from .. import load_model
    from ..default_model import default_model_path
    from ..server.process import ServerProcess

    path = cfg.model or str(default_model_path(progress=False))
    clients_list = QUICK_CLIENTS if cfg.quick else CLIENTS
    seconds = QUICK_SECONDS if cfg.quick else SECONDS
    tokens = QUICK_TOKENS if cfg.quick else ANSWER_TOKENS
    body = {"prompt": PROMPT, "max_tokens": tokens, "temperature": 0, "stream": True}
    with ExitStack() as stack:
        ours = stack.enter_context(ServerProcess(
            ["--model", path, "--parallel", str(PARALLEL), "--queue", str(4 * max(clients_list)),
             "--threads", str(cfg.threads)], timeout=300))
        model = stack.enter_context(load_model(path, backend="llama_cpp", threads=cfg.threads,
                                               parallel_slots=PARALLEL))
        n_ctx = int(model.context_len) // PARALLEL or 2048  # a slot's share, for the one-slot server
        peer = LlamaCppServer(path, cfg.threads, min(max(n_ctx, 512), 8192))
        stack.callback(peer.close)
        body["model"] = httpx2.get(ours.url + "/models").json()["data"][0]["id"]
        peer_body = {k: v for k, v in body.items() if k != "model"}
        for clients in clients_list:
            info: dict[str, Any] = {
                "model": os.path.basename(path), "threads": cfg.threads, "parallel": PARALLEL,
                "clients": clients, "seconds": seconds, "max_tokens": tokens, "prompt": PROMPT,
                "runs": {"serve": [], "llama_cpp.server": [], "python API": []},
            }

            def http_side(url: str, req: dict[str, Any], key: str, n: int = clients,
                          info: dict[str, Any] = info) -> Callable[[], float]:
                def run() -> float:
                    async def go() -> Load:
                        limits = httpx2.Limits(max_connections=n, max_keepalive_connections=n)
                        async with httpx2.AsyncClient(timeout=600, limits=limits) as c:
                            return await drive(http_stream(url, req, c), n, seconds)

                    load = asyncio.run(go())
                    info["runs"][key].append(load.summary())
                    return load.tokens / seconds

                return run

            def api_side(n: int = clients, info: dict[str, Any] = info) -> float:
                load = asyncio.run(drive(api_stream(model, tokens), n, seconds))
                info["runs"]["python API"].append(load.summary())
                return load.tokens / seconds

            serve_name = f"serve --parallel {PARALLEL}"
            yield Row(
                key=f"serve_{clients}_clients",
                title=f"{clients} streaming clients for {seconds:g} s, {tokens}-token answers",
                unit="tokens/s",
                sides=[Side(serve_name, http_side(ours.url, body, "serve"), True),
                       Side("llama_cpp.server", http_side(peer.url, peer_body, "llama_cpp.server"), False),
                       Side("python API", api_side, True)],
                reference="llama_cpp.server",
                targets=[Target(serve_name, ">=", 2.0, "llama_cpp.server"),
                         Target(serve_name, ">=", 0.9, "python API")] if clients == PARALLEL else [],
                note="aggregate tokens/s of every client; requests, errors (must be 0) and p50/p99 "
                     "time to first token per run are in info.runs",
                runs=1 if cfg.quick else 2,
                info=info,
            )


SUITE = Suite(
    name="server",
    engine="llama-cpp-python's server (python -m llama_cpp.server)",
    rows=_rows,
    why_unavailable=_why_unavailable,
    versions=_versions,
)


def main(argv: list[str] | None = None) -> int:
    """``python -m core_inference.bench.server_suite [--quick] [--out DIR]``: this suite alone.

    (``core-inference bench --suite server`` runs it too once the suite is registered.)
    """
    from .runner import suite_main

    return suite_main(
        SUITE, argv, "Load on serve against llama-cpp-python's server.",
        quick_help="2 clients for 5 s: proves it runs, times nothing", runs=False
    )


if __name__ == "__main__":
    sys.exit(main())
