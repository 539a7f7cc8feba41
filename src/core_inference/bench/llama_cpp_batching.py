"""The ``llama_cpp_batching`` suite: continuous batching on the ``llama_cpp`` backend (issue 14).

Concurrent streams against ``batch_generate`` on the same prompts and model, the
slowest stream's time between tokens among 16 against one stream alone, and how soon
a deadline ends a ``classify`` or ``batch_generate`` of 1,000-token prompts. Every
side is ours: the reference each target names is measured in the same run.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Any

from .harness import BenchConfig, BenchError, Row, Side, Suite, Target
from .llama_cpp_suite import BATCH_PROMPTS, PARAGRAPH, _versions, _why_unavailable

DEADLINE = 0.2  # seconds given to each call of the deadline row
LONG_PROMPT_TOKENS = 1000


def _prompts(n: int) -> list[str]:
    return [BATCH_PROMPTS[i % len(BATCH_PROMPTS)] + ("" if i < len(BATCH_PROMPTS) else f" ({i})")
            for i in range(n)]


def _streams(model: Any, prompts: list[str], n: int) -> list[list[float]]:
    """Every prompt streamed by its own thread at once; each stream's token arrival times."""
    times: list[list[float]] = [[] for _ in prompts]
    errors: list[BaseException] = []
    go = threading.Barrier(len(prompts))

    def run(i: int) -> None:
        try:
            go.wait()
            for _ in model.generate(prompts[i], max_tokens=n):
                times[i].append(time.perf_counter())
        except BaseException as exc:  # reported below, in the caller
            errors.append(exc)

    pool = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    if errors:
        raise BenchError(f"a stream failed: {errors[0]!r}")
    return times


def _gap(times: list[float]) -> float:
    """Mean seconds between a stream's tokens after its first."""
    if len(times) < 2:
        raise BenchError("a stream gave fewer than 2 tokens; pick longer max_tokens")
    return (times[-1] - times[0]) / (len(times) - 1)


def concurrency_row(path: str, cfg: BenchConfig, stack: ExitStack, streams: int) -> Row:
    """Aggregate tokens/s of ``streams`` concurrent generate calls vs batch_generate."""
    from .. import load_model

    model = stack.enter_context(load_model(path, backend="llama_cpp", threads=cfg.threads,
                                           parallel_slots=streams))
    prompts = _prompts(streams)
    n = cfg.batch_tokens

    def together() -> float:
        start = time.perf_counter()
        times = _streams(model, prompts, n)
        return sum(map(len, times)) / (time.perf_counter() - start)

    def batch() -> float:
        start = time.perf_counter()
        results = model.batch_generate(prompts, max_tokens=n)
        return sum(len(r.tokens) for r in results) / (time.perf_counter() - start)

    def alone() -> float:
        start = time.perf_counter()
        got = sum(1 for _ in model.generate(prompts[0], max_tokens=n))
        return got / (time.perf_counter() - start)

    conc, ref = f"ours: {streams} concurrent generate streams", "ours: batch_generate, same prompts"
    return Row(
        key=f"concurrent_{streams}",
        title=f"{streams} concurrent streams x {n} tokens vs batch_generate",
        unit="tokens/s",
        sides=[Side(conc, together, True), Side(ref, batch, True),
               Side("ours: one stream alone", alone, True)],
        reference=ref,
        targets=[Target(conc, ">=", 0.9, ref)],
        note="aggregate generated tokens/s, one model with parallel_slots equal to the streams",
        info={"streams": streams, "max_tokens": n},
    )


def inter_token_row(path: str, cfg: BenchConfig, stack: ExitStack, streams: int = 16) -> Row:
    """The slowest stream's mean time between tokens among ``streams`` vs one stream alone."""
    from .. import load_model

    model = stack.enter_context(load_model(path, backend="llama_cpp", threads=cfg.threads,
                                           parallel_slots=streams))
    prompts = _prompts(streams)
    n = max(cfg.batch_tokens, 3)

    def slowest() -> float:
        return max(map(_gap, _streams(model, prompts, n))) * 1e3

    def alone() -> float:
        return _gap(_streams(model, prompts[:1], n)[0]) * 1e3

    worst, ref = f"ours: slowest of {streams} streams", "ours: one stream alone"
    return Row(
        key=f"inter_token_{streams}",
        title=f"time between tokens, slowest of {streams} streams vs one alone",
        unit="ms",
        sides=[Side(worst, slowest, True), Side(ref, alone, True)],
        reference=ref,
        higher_is_better=False,
        targets=[Target(worst, "<=", 6.0, ref)],
        note="each stream's mean gap between its tokens after the first; the slowest stream's",
        info={"streams": streams, "max_tokens": n},
    )


def deadline_row(path: str, cfg: BenchConfig, stack: ExitStack) -> Row:
    """Seconds from the start of a call with a 0.2 s deadline to its DeadlineExceeded."""
    from .. import Context, DeadlineExceeded, load_model

    model = stack.enter_context(load_model(path, backend="llama_cpp", threads=cfg.threads,
                                           parallel_slots=2))
    size = 32 if cfg.quick else LONG_PROMPT_TOKENS
    words = PARAGRAPH.split()
    text = " ".join(words[i % len(words)] for i in range(size))
    while len(model.tokenize(text)) > size:
        text = text.rsplit(" ", 1)[0]
    prompts = [text, text + " Again.", text + " Once more."]

    def ended(call: Callable[[Context], object]) -> Callable[[], float]:
        def run() -> float:
            start = time.perf_counter()
            try:
                call(Context.background().with_timeout(DEADLINE))
            except DeadlineExceeded:
                return time.perf_counter() - start
            if cfg.quick:
                return time.perf_counter() - start  # tiny prompts may finish first
            raise BenchError("the call finished before its deadline; use longer prompts")

        return run

    cls, bat = "ours: classify", "ours: batch_generate"
    gen = "ours: generate"
    return Row(
        key="deadline_long_prompts",
        title=f"a {DEADLINE} s deadline on 3 prompts of {size} tokens: seconds to end",
        unit="s",
        sides=[
            Side(cls, ended(lambda c: model.classify(prompts, ctx=c)), True),
            Side(bat, ended(lambda c: model.batch_generate(prompts, max_tokens=8, ctx=c)), True),
            Side(gen, ended(lambda c: list(model.generate(prompts[0], max_tokens=8, ctx=c))), True),
        ],
        reference=gen,
        higher_is_better=False,
        targets=[Target(cls, "<=", 0.3), Target(bat, "<=", 0.3)],
        note="from the call to its DeadlineExceeded (the deadline itself included)",
        info={"prompt_tokens": len(model.tokenize(text)), "deadline_s": DEADLINE},
    )


def _rows(cfg: BenchConfig) -> Iterator[Row]:
    from ..default_model import default_model_path

    path = cfg.model or str(default_model_path(progress=False))
    makers: list[Callable[[ExitStack], Row]] = [
        lambda s: concurrency_row(path, cfg, s, 4),
        lambda s: concurrency_row(path, cfg, s, 16),
        lambda s: inter_token_row(path, cfg, s, 16),
        lambda s: deadline_row(path, cfg, s),
    ]
    for make in makers:
        with ExitStack() as stack:  # each row's model is freed before the next row
            row = make(stack)
            row.info.update({"model": os.path.basename(path), "threads": cfg.threads})
            yield row


SUITE = Suite(
    name="llama_cpp_batching",
    engine="none: every side is ours, each target against its reference in the same run",
    rows=_rows,
    why_unavailable=_why_unavailable,
    versions=_versions,
)


__all__ = ["SUITE", "concurrency_row", "deadline_row", "inter_token_row"]
