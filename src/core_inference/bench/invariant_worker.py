"""A model loaded with ``batch_invariant=True`` in a process of its own, for bench sides.

``batch_invariant`` switches one of llama.cpp's kernels off for the whole process (before
its first decode), and the bench's other rows must keep it: so the side that measures it
talks to this worker over a pipe. The worker times each run itself, the call alone (the
pipe and the JSON stay outside), so its figure compares with the in-process sides'.

Protocol: one JSON object a line on stdin, ``{"op": "batch_generate" | "classify" |
"streams" | "first_token", "prompts": [...], "max_tokens": n}`` ("streams": each prompt
streamed by ``generate`` in a thread of its own, all at once; "first_token": the first
prompt's ``generate`` until its first token); one line back, ``{"units": n, "seconds": s}``
(tokens, or sentences for classify).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any, TextIO

from .harness import BenchError


class InvariantWorker:
    """The parent's handle: start the worker, send it runs, stop it."""

    def __init__(self, path: str, threads: int, slots: int = 1, **options: Any) -> None:
        env = dict(os.environ, GGML_CPU_TILED_MM="0")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "core_inference.bench.invariant_worker", path, str(threads), str(slots),
             json.dumps(options)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
        )
        if self._read() != {"ready": True}:
            raise BenchError("the batch_invariant worker did not start")

    def _read(self) -> Any:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise BenchError(f"the batch_invariant worker exited (status {self.proc.poll()})")
        return json.loads(line)

    def run(self, op: str, prompts: list[str], max_tokens: int = 0) -> float:
        """One run of ``op`` over ``prompts``: its units per second, timed in the worker."""
        units, seconds = self.timed(op, prompts, max_tokens)
        return units / seconds

    def timed(self, op: str, prompts: list[str], max_tokens: int = 0) -> tuple[int, float]:
        """One run of ``op`` over ``prompts``: (units, seconds), timed in the worker."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, "prompts": prompts, "max_tokens": max_tokens}) + "\n")
        self.proc.stdin.flush()
        got = self._read()
        if "error" in got:
            raise BenchError(f"batch_invariant worker: {got['error']}")
        return int(got["units"]), float(got["seconds"])

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _serve(path: str, threads: int, slots: int, more: dict[str, Any], inp: TextIO, out: TextIO) -> None:
    from .. import load_model

    options = {**more, "batch_invariant": True}
    with load_model(path, backend="llama_cpp", threads=threads, parallel_slots=slots,
                    engine_options=options) as m:
        out.write(json.dumps({"ready": True}) + "\n")
        out.flush()
        for line in inp:
            try:
                units, seconds = _run(m, json.loads(line))
                reply: dict[str, Any] = {"units": units, "seconds": seconds}
            except Exception as exc:  # reported to the parent, which raises it as a BenchError
                reply = {"error": f"{type(exc).__name__}: {exc}"}
            out.write(json.dumps(reply) + "\n")
            out.flush()


def _run(m: Any, req: dict[str, Any]) -> tuple[int, float]:
    """One request on the worker's model: its units and seconds, timed here."""
    from .llama_cpp_batching import _streams
    from .llama_cpp_suite import first_token_ms

    if req["op"] == "first_token":  # timed as the ttft row's own sides are
        return 1, first_token_ms(m, req["prompts"][0]) / 1e3
    began = time.perf_counter()
    if req["op"] == "batch_generate":
        results = m.batch_generate(req["prompts"], max_tokens=req["max_tokens"])
        units = sum(len(r.tokens) for r in results)
    elif req["op"] == "streams":  # the batching suite's own, timed here
        times = _streams(m, req["prompts"], req["max_tokens"])
        if not all(times):
            raise RuntimeError("a stream gave no token")
        units = sum(map(len, times))
    else:
        units = len(m.classify(req["prompts"]))
    return units, time.perf_counter() - began


if __name__ == "__main__":
    _serve(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4]), sys.stdin, sys.stdout)
