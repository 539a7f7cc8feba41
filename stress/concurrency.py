"""Concurrency: many threads mixing generate, chat, classify and batch_generate on one model.

Every call is greedy, so each has one right answer: the output of the same call made
alone. The run passes with zero errors and every output equal to its reference.
``batch_generate`` is compared with ``batch_generate`` alone on the same prompt list
(batched matmuls may round differently from single-sequence decoding), and
``classify`` with ``classify`` alone on the same list.

Usage::

    python stress/concurrency.py                 # 16 threads x 50 calls -> stress/results/concurrency.json
    python stress/concurrency.py --threads 8 --calls 5 --max-tokens 8
    python stress/concurrency.py --invariant --out stress/results/concurrency-invariant.json

By default the model shares nothing (``shared_decode=False, prefix_cache=False``);
``--shared`` uses the engine's defaults, ``--invariant`` ``batch_invariant=True`` (everything
shared, on kernels whose result for a row does not depend on its neighbours).

The test suite imports ``run_concurrency`` from this file and runs a short version.
"""

from __future__ import annotations

import argparse
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

PROMPTS = (
    "The capital of France is",
    "One plus one is",
    "The sky is",
    "Hello, my name",
    "def add(a, b):",
    "List three colours:",
)
CONVERSATIONS = (
    [{"role": "user", "content": "Name a fruit."}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 2+2?"}],
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "How are you?"},
    ],
)
PROMPT_LISTS = (
    list(PROMPTS[:3]),
    list(PROMPTS[2:]),
    [PROMPTS[0], PROMPTS[4], PROMPTS[1], PROMPTS[5], PROMPTS[3]],
)


def call_specs() -> list[tuple[str, int]]:
    """Every distinct call the run makes: (kind, index into its inputs)."""
    specs = [("generate", i) for i in range(len(PROMPTS))]
    specs += [("chat", i) for i in range(len(CONVERSATIONS))]
    specs += [("classify", i) for i in range(len(PROMPT_LISTS))]
    specs += [("batch_generate", i) for i in range(len(PROMPT_LISTS))]
    return specs


def make_call(model: Any, kind: str, i: int, max_tokens: int) -> Any:
    """Run one call; return a comparable result (token ids and texts)."""
    if kind == "generate":
        return [(t.id, t.text) for t in model.generate(PROMPTS[i], max_tokens=max_tokens)]
    if kind == "chat":
        return [(t.id, t.text) for t in model.chat(CONVERSATIONS[i], max_tokens=max_tokens)]
    if kind == "classify":
        return [(r.token.id, r.token.text) for r in model.classify(PROMPT_LISTS[i])]
    if kind == "batch_generate":
        out = []
        for r in model.batch_generate(PROMPT_LISTS[i], max_tokens=max_tokens):
            if r.err is not None:
                raise r.err
            out.append([(t.id, t.text) for t in r.tokens])
        return out
    raise ValueError(kind)


def run_concurrency(
    model: Any,
    threads: int = 16,
    calls: int = 50,
    *,
    max_tokens: int = 16,
    seed: int = 0,
) -> dict[str, Any]:
    """``threads`` threads each make ``calls`` random calls; every output is checked."""
    specs = call_specs()
    t0 = time.perf_counter()
    reference = {spec: make_call(model, *spec, max_tokens) for spec in specs}
    ref_seconds = time.perf_counter() - t0
    errors: list[str] = []
    mismatches: list[str] = []
    kinds: Counter[str] = Counter()
    lock = threading.Lock()
    start = threading.Barrier(threads)

    def worker(w: int) -> None:
        rng = random.Random(seed * 1000 + w)
        start.wait()
        for _ in range(calls):
            spec = rng.choice(specs)
            try:
                got = make_call(model, *spec, max_tokens)
            except Exception as exc:
                with lock:
                    errors.append(f"{spec}: {type(exc).__name__}: {exc}")
                continue
            with lock:
                kinds[spec[0]] += 1
                if got != reference[spec]:
                    mismatches.append(f"{spec}: {got!r} != {reference[spec]!r}")

    pool = [threading.Thread(target=worker, args=(w,), name=f"conc-{w}") for w in range(threads)]
    t1 = time.perf_counter()
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    elapsed = time.perf_counter() - t1
    return {
        "threads": threads,
        "calls_per_thread": calls,
        "calls": threads * calls,
        "max_tokens": max_tokens,
        "parallel_slots": getattr(getattr(model, "_slots", None), "size", None),
        "by_kind": dict(kinds),
        "errors": errors,
        "mismatches": mismatches,
        "reference_seconds": round(ref_seconds, 2),
        "seconds": round(elapsed, 2),
        "calls_per_second": round(threads * calls / elapsed, 2) if elapsed else 0.0,
        "passed": not errors and not mismatches,
    }


def main(argv: list[str] | None = None) -> int:
    here = Path(__file__).resolve().parent
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=16)
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--slots", type=int, default=4, help="parallel_slots of the model")
    ap.add_argument("--engine-threads", type=int, default=0, help="llama.cpp threads (0: every core)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shared", action="store_true",
                    help="the engine's defaults (streams share decodes: answers may differ from alone)")
    ap.add_argument("--invariant", action="store_true",
                    help="batch_invariant=True: every kind of sharing on, answers still equal to alone")
    ap.add_argument("--model", default=None, help="GGUF path (default: the embedded default model)")
    ap.add_argument("--out", default=str(here / "results" / "concurrency.json"))
    args = ap.parse_args(argv)
    options: dict[str, bool] = {"shared_decode": False, "prefix_cache": False}
    if args.shared or args.invariant:
        options = {"batch_invariant": True} if args.invariant else {}
    with ci.load_model(args.model, parallel_slots=args.slots, threads=args.engine_threads,
                       engine_options=options) as model:
        result = run_concurrency(
            model, args.threads, args.calls, max_tokens=args.max_tokens, seed=args.seed
        )
    result["python"] = sys.version.split()[0]
    result["cpus"] = os.cpu_count()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    summary = {k: v for k, v in result.items() if k not in ("errors", "mismatches")}
    summary["errors"] = len(result["errors"])
    summary["mismatches"] = len(result["mismatches"])
    print(json.dumps(summary, indent=2))
    for line in (result["errors"] + result["mismatches"])[:5]:
        print("  ", line[:300], file=sys.stderr)
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
