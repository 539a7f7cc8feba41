"""Answers independent of the neighbours: greedy output of a prompt alone vs beside others.

For N prompts of 5 to 400 tokens (built from a fixed word list with a seed), each
prompt's greedy output alone (``generate``, one call at a time) is the reference; the
run counts how many outputs are the same token for token under

- ``batch_generate`` of all the prompts in one call,
- ``classify`` of all the prompts in one call (its token against ``generate``'s first,
  and its logits bit for bit against ``classify([prompt])`` alone),
- 4 threads streaming ``generate`` on one model with 4 parallel slots,

with the engine's defaults, with ``batch_invariant=True`` (everything shared, on kernels
whose result for a row does not depend on its neighbours) and with ``shared_decode=False,
prefix_cache=False`` (nothing shared). Each configuration runs in a process of its own:
``batch_invariant`` switches a kernel off for the whole process.

The figures are counts, not timings: a busy machine changes how calls interleave, not
what llama.cpp computes for a given step, so they hold on any machine of the same kind.

Usage::

    python stress/independence.py                      # 200 prompts -> stress/results/independence.json
    python stress/independence.py --prompts 20 --max-tokens 8
    python stress/independence.py --config unshared   # re-measure one configuration, keep the other

The test suite (``tests/backends/test_llama_cpp.py``) checks each property on a handful
of prompts; this measures the shares over many.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import core_inference as ci

WORDS = (
    "river", "valley", "green", "long", "stone", "house", "light", "morning", "quiet", "market",
    "bread", "window", "teacher", "garden", "letter", "north", "winter", "music", "paper", "story",
    "little", "old", "road", "across", "mountain", "city", "small", "bright", "evening", "water",
    "friend", "table", "under", "between", "always", "never", "because", "after", "before",
    "during", "through",
)


# the default (a decode shared by the streams, a prefix cache), the same on batch-invariant
# kernels, and nothing shared at all
CONFIGS: dict[str, dict[str, bool]] = {
    "default": {},
    "invariant": {"batch_invariant": True},
    "unshared": {"shared_decode": False, "prefix_cache": False},
}


def make_prompts(model: Any, n: int, seed: int, shortest: int = 5, longest: int = 400) -> list[str]:
    """``n`` prompts whose token counts spread evenly over ``shortest``..``longest``."""
    rng = random.Random(seed)
    prompts = []
    for i in range(n):
        want = shortest + (longest - shortest) * i // max(1, n - 1)
        words: list[str] = []
        while len(model.tokenize(" ".join(words))) < want:
            words.append(rng.choice(WORDS) if len(words) % 9 else rng.choice(WORDS).capitalize())
        prompts.append(" ".join(words))
    rng.shuffle(prompts)
    return prompts


def ids(tokens: Any) -> list[int]:
    return [t.id for t in tokens]


def measure(model: Any, prompts: list[str], max_tokens: int, streams: int = 4) -> dict[str, Any]:
    alone = [ids(model.generate(p, max_tokens=max_tokens)) for p in prompts]
    cls_alone = [model.classify([p], return_logits=True)[0] for p in prompts]

    batch = model.batch_generate(prompts, max_tokens=max_tokens)
    batch_same = sum(ids(r.tokens) == a for r, a in zip(batch, alone, strict=True))

    cls = model.classify(prompts, return_logits=True)
    cls_token_same = sum(r.token.id == a[0] for r, a in zip(cls, alone, strict=True) if a)
    cls_logits_same = sum(
        r.logits is not None and c.logits is not None and list(r.logits) == list(c.logits)
        for r, c in zip(cls, cls_alone, strict=True)
    )

    todo: queue.Queue[int] = queue.Queue()
    for i in range(len(prompts)):
        todo.put(i)
    together: dict[int, list[int]] = {}

    def worker() -> None:
        while True:
            try:
                i = todo.get_nowait()
            except queue.Empty:
                return
            together[i] = ids(model.generate(prompts[i], max_tokens=max_tokens))

    pool = [threading.Thread(target=worker) for _ in range(streams)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    conc_same = sum(together[i] == a for i, a in enumerate(alone))
    lengths = [len(model.tokenize(p)) for p in prompts]
    differ = {
        "batch_generate": [lengths[i] for i, r in enumerate(batch) if ids(r.tokens) != alone[i]],
        "concurrent": [lengths[i] for i in range(len(prompts)) if together[i] != alone[i]],
    }
    n = len(prompts)
    return {
        "prompts": n,
        "prompt_tokens": [min(lengths), max(lengths)],
        "max_tokens": max_tokens,
        "batch_generate_same": batch_same,
        "classify_token_same": cls_token_same,
        "classify_logits_bitwise_same": cls_logits_same,
        f"concurrent_{streams}_same": conc_same,
        "prompt_tokens_of_those_that_differ": differ,
        "shares": {
            "batch_generate": batch_same / n,
            "classify": cls_token_same / n,
            f"concurrent_{streams}": conc_same / n,
        },
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=200)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 1))
    ap.add_argument("--seed", type=int, default=14)
    ap.add_argument("--longest", type=int, default=400, help="tokens in the longest prompt")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "independence.json"))
    ap.add_argument("--config", action="append", choices=list(CONFIGS),
                    help="only this configuration (repeatable); the others' figures in --out are kept")
    args = ap.parse_args(argv)
    path = cast("Callable[..., Path]", ci.default_model_path)(progress=False)
    out = Path(args.out)
    result: dict[str, Any] = json.loads(out.read_text()) if args.config and out.exists() else {}
    names = [n for n in CONFIGS if not args.config or n in args.config]
    if len(names) > 1:  # one process per configuration
        for name in names:
            rest = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k != "config"]
            subprocess.run([sys.executable, __file__, *rest, "--config", name], check=True,
                           stdout=subprocess.DEVNULL)
        return 0
    for name, options in CONFIGS.items():
        if name not in names:
            continue
        began = time.time()
        with ci.load_model(path, parallel_slots=4, threads=args.threads, engine_options=options) as model:
            prompts = make_prompts(model, args.prompts, args.seed, longest=args.longest)
            result[name] = {"engine_options": options, **measure(model, prompts, args.max_tokens)}
        result[name]["seconds"] = round(time.time() - began, 1)
        print(name, json.dumps(result[name]["shares"]), file=sys.stderr, flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    json.dump(result, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
