"""Cancellation storm: many generations, each ended early, on one model; nothing may leak.

Every generation on the default model is ended at a random point by one of:

- ``cancel``:   ``ctx.cancel()``, from the consuming thread after k tokens or from a
                timer thread after a random delay (prefill included);
- ``deadline``: ``ctx.with_timeout(t)`` with a random ``t``;
- ``break``:    ``break`` out of the ``for`` loop after k tokens;
- ``task``:     cancelling the asyncio task that consumes ``agenerate``.

After a warm-up it measures, and at the end checks:

- resident memory after warm-up vs at the end: must grow by less than 5%
  (``--floor-mib`` allows a small absolute slack for short runs);
- threads: ``threading.active_count()`` and the OS thread count (psutil) back to
  their post-warm-up baseline;
- the model's greedy answer to a fixed prompt after the storm equals its first one.

Usage::

    python stress/storm.py                      # 1,000 generations -> stress/results/storm.json
    python stress/storm.py -n 60 --out /tmp/s.json

The test suite imports ``run_storm`` from this file and runs a short version.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import random
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import core_inference as ci

MODES = ("cancel", "deadline", "break", "task")
PROBE = "The capital of France is"
PROMPTS = (
    "The capital of France is",
    "Write a short story about a robot who learns to paint.",
    "List the planets of the solar system:",
    "def fibonacci(n):",
    "Translate to German: The weather is nice today.",
    "Once upon a time, in a land far away,",
    # a long prompt: several prefill chunks, so cancellation lands in prefill too
    "Summarise the following text. " + "The quick brown fox jumps over the lazy dog. " * 40,
)
ENDINGS = (ci.Cancelled, ci.DeadlineExceeded)


def rss_bytes() -> int:
    """Resident memory of this process now."""
    import psutil

    return int(psutil.Process().memory_info().rss)


def os_threads() -> int:
    """Threads of this process as the OS counts them (engine threads included)."""
    import psutil

    return int(psutil.Process().num_threads())


def greedy(model: Any, max_tokens: int = 24) -> str:
    return "".join(t.text for t in model.generate(PROBE, max_tokens=max_tokens))


def wait_threads(py_base: int, os_base: int, timeout: float = 10.0) -> tuple[int, int]:
    """Wait (up to ``timeout``) for thread counts to come back down; return the last counts."""
    end = time.monotonic() + timeout
    while True:
        py, osn = threading.active_count(), os_threads()
        if (py <= py_base and osn <= os_base) or time.monotonic() > end:
            return py, osn
        time.sleep(0.02)


def _sync_one(model: Any, mode: str, rng: random.Random, max_tokens: int) -> tuple[str, int]:
    prompt = rng.choice(PROMPTS)
    stop_after = rng.randint(0, max_tokens)
    timer: threading.Timer | None = None
    if mode == "deadline":
        ctx = ci.Context.background().with_timeout(rng.uniform(0.0, 0.6))
    else:
        ctx = ci.Context.background().with_cancel()
        if mode == "cancel" and rng.random() < 0.5:  # from another thread, at a random time
            timer = threading.Timer(rng.uniform(0.0, 0.6), ctx.cancel)
            timer.daemon = True
            timer.start()
            stop_after = max_tokens + 1
    n = 0
    outcome = "completed"
    try:
        for _tok in model.generate(prompt, max_tokens=max_tokens, ctx=ctx):
            n += 1
            if n >= stop_after:
                if mode == "break":
                    outcome = "break"
                    break
                if mode == "cancel":
                    ctx.cancel()
    except ENDINGS as exc:
        outcome = type(exc).__name__
    finally:
        if timer is not None:
            timer.cancel()
            timer.join()
    return outcome, n


async def _task_one(model: Any, rng: random.Random, max_tokens: int) -> tuple[str, int]:
    prompt = rng.choice(PROMPTS)
    stop_after = rng.randint(0, max_tokens)
    delay = rng.uniform(0.0, 0.6)
    got = 0
    reached = asyncio.Event()

    async def consume() -> None:
        nonlocal got
        async for _tok in model.agenerate(prompt, max_tokens=max_tokens):
            got += 1
            if got >= stop_after:
                reached.set()
        reached.set()

    task = asyncio.ensure_future(consume())
    if rng.random() < 0.5:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(reached.wait(), timeout=30)
    else:
        await asyncio.sleep(delay)
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        return "task-cancelled", got
    return "completed", got


def run_storm(
    model: Any,
    n: int = 1000,
    *,
    seed: int = 0,
    max_tokens: int = 32,
    warmup: int = 20,
    progress: bool = False,
) -> dict[str, Any]:
    """Run ``n`` generations, each ended early by a random mode; return the measurements."""
    rng = random.Random(seed)
    loop = asyncio.new_event_loop()
    first = greedy(model)
    outcomes: Counter[str] = Counter()
    modes: Counter[str] = Counter()
    tokens = 0
    errors: list[str] = []
    rss_warm = py_base = os_base = 0
    t0 = time.perf_counter()
    try:
        for i in range(n):
            if i == min(warmup, n):
                gc.collect()
                py_base, os_base = wait_threads(threading.active_count(), os_threads(), 1.0)
                rss_warm = rss_bytes()
            mode = MODES[i % len(MODES)] if i < len(MODES) else rng.choice(MODES)
            modes[mode] += 1
            try:
                if mode == "task":
                    outcome, got = loop.run_until_complete(_task_one(model, rng, max_tokens))
                else:
                    outcome, got = _sync_one(model, mode, rng, max_tokens)
            except Exception as exc:  # anything else is a failure of the storm
                errors.append(f"{mode}: {type(exc).__name__}: {exc}")
                continue
            outcomes[outcome] += 1
            tokens += got
            if progress and (i + 1) % 50 == 0:
                print(f"  {i + 1}/{n}  {dict(outcomes)}  rss {rss_bytes() >> 20} MiB", file=sys.stderr)
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
    elapsed = time.perf_counter() - t0
    if n <= warmup:  # too short for a warm-up: the baseline is the start
        gc.collect()
        rss_warm = rss_warm or rss_bytes()
        py_base = py_base or threading.active_count()
        os_base = os_base or os_threads()
    py_end, os_end = wait_threads(py_base, os_base)
    gc.collect()
    rss_end = rss_bytes()
    last = greedy(model)
    return {
        "generations": n,
        "seed": seed,
        "max_tokens": max_tokens,
        "warmup": warmup,
        "modes": dict(modes),
        "outcomes": dict(outcomes),
        "tokens_streamed": tokens,
        "errors": errors,
        "seconds": round(elapsed, 2),
        "rss_after_warmup_bytes": rss_warm,
        "rss_end_bytes": rss_end,
        "rss_growth_bytes": rss_end - rss_warm,
        "rss_growth_pct": round(100.0 * (rss_end - rss_warm) / rss_warm, 3) if rss_warm else 0.0,
        "python_threads_baseline": py_base,
        "python_threads_end": py_end,
        "os_threads_baseline": os_base,
        "os_threads_end": os_end,
        "first_greedy": first,
        "last_greedy": last,
        "greedy_equal": first == last,
    }


def check(result: dict[str, Any], max_growth_pct: float = 5.0, floor_bytes: int = 0) -> list[str]:
    """The storm's pass conditions; returns the failures (empty when it passed)."""
    problems = []
    if result["errors"]:
        problems.append(f"{len(result['errors'])} unexpected errors, e.g. {result['errors'][0]}")
    allowed = max(result["rss_after_warmup_bytes"] * max_growth_pct / 100.0, floor_bytes)
    if result["rss_growth_bytes"] >= allowed:
        problems.append(
            f"RSS grew {result['rss_growth_bytes'] >> 10} KiB ({result['rss_growth_pct']}%), "
            f"allowed {int(allowed) >> 10} KiB"
        )
    if result["python_threads_end"] > result["python_threads_baseline"]:
        problems.append(
            f"Python threads {result['python_threads_end']} > baseline {result['python_threads_baseline']}"
        )
    if result["os_threads_end"] > result["os_threads_baseline"]:
        problems.append(f"OS threads {result['os_threads_end']} > baseline {result['os_threads_baseline']}")
    if not result["greedy_equal"]:
        problems.append(f"greedy answer changed: {result['first_greedy']!r} -> {result['last_greedy']!r}")
    return problems


def main(argv: list[str] | None = None) -> int:
    here = Path(__file__).resolve().parent
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", "--generations", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--slots", type=int, default=2, help="parallel_slots of the model")
    ap.add_argument("--engine-threads", type=int, default=0, help="llama.cpp threads (0: every core)")
    ap.add_argument("--model", default=None, help="GGUF path (default: the embedded default model)")
    ap.add_argument("--floor-mib", type=float, default=0.0, help="absolute RSS growth always allowed")
    ap.add_argument("--out", default=str(here / "results" / "storm.json"))
    args = ap.parse_args(argv)
    with ci.load_model(args.model, parallel_slots=args.slots, threads=args.engine_threads) as model:
        result = run_storm(
            model, args.generations, seed=args.seed, max_tokens=args.max_tokens,
            warmup=args.warmup, progress=True,
        )
    result["problems"] = check(result, floor_bytes=int(args.floor_mib * 2**20))
    result["passed"] = not result["problems"]
    result["python"] = sys.version.split()[0]
    result["cpus"] = os.cpu_count()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("errors",)}, indent=2))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
