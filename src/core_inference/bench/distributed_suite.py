"""Rows for ``core_inference.distributed``: replicas on a local Ray cluster against one process.

The same prompts, the same GGUF and llama.cpp on every side, in one run, interleaved:

- ``2 replicas x t threads``: ``Pool.batch_generate`` over two Ray actors,
- ``1 replica x t threads``: the same over one actor (the reference: the scaling a
  cluster would see from adding a replica; the target is 1.8x),
- ``one process, 2t threads``: ``batch_generate`` of all the prompts in this process
  (what the same cores do without Ray).

``t`` is half the bench's threads (at least 1). The pools are loaded before the rows
are timed; a run is one call (chunks sent, results collected in order), so Ray's task
and transfer costs are inside the time, start-up and model loading are not.
"""

from __future__ import annotations

import importlib.util
import os
import secrets
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

from .harness import BenchConfig, BenchError, Row, Side, Suite, Target, timed
from .llama_cpp_suite import BATCH_PROMPTS, _sentences

TWO = "ours: 2 replicas (Ray)"
ONE = "ours: 1 replica (Ray)"
LOCAL = "one process"


def _why_unavailable() -> str | None:
    if importlib.util.find_spec("ray") is None:
        return "ray is not installed (pip install 'core-inference[ray]')"
    if importlib.util.find_spec("llama_cpp") is None:
        return "llama-cpp-python is not installed (pip install 'core-inference[llama-cpp]')"
    return None


def _versions() -> dict[str, str]:
    import ray

    return {"ray": str(ray.__version__)}



@contextmanager
def _own_cluster(num_cpus: int) -> Iterator[None]:
    """A local cluster for this run whose auth token lives in the environment only: Ray
    otherwise writes one to ``~/.ray/auth_token``, which would outlive the run. ``ray.init``
    also sets ``RAY_AUTH_MODE``; both are as before afterwards."""
    from ..distributed import local_cluster

    names = ("RAY_AUTH_TOKEN", "RAY_AUTH_MODE")
    saved = {name: os.environ.get(name) for name in names}
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(16))
    try:
        with local_cluster(num_cpus=num_cpus):
            yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _checked(results: list[Any], what: str) -> list[Any]:
    errors = [r.err for r in results if r.err is not None]
    if errors:
        raise BenchError(f"{what}: {errors[0]}")
    return results


def _rows(cfg: BenchConfig) -> Iterator[Row]:
    import ray

    from .. import load_model
    from ..default_model import default_model_path
    from ..distributed import Pool

    path = cfg.model or str(default_model_path(progress=False))
    t = max(1, cfg.threads // 2)
    n_prompts = cfg.batch_prompts * 2
    prompts = [BATCH_PROMPTS[i % len(BATCH_PROMPTS)] + f" ({i})" for i in range(n_prompts)]
    sentences = _sentences(cfg.classify_sentences)
    chunk = max(1, n_prompts // 8)  # 4 chunks per replica of the 2-replica pool
    n_tokens = cfg.batch_tokens
    with ExitStack() as stack:
        # both pools are held while the sides run interleaved: 3 replicas' worth of logical CPUs
        if not ray.is_initialized():  # else: the caller's cluster, used as it is
            stack.enter_context(_own_cluster(3 * t))
        two = stack.enter_context(Pool(path, replicas=2, threads=t, backend="llama_cpp"))
        one = stack.enter_context(Pool(path, replicas=1, threads=t, backend="llama_cpp"))
        local = stack.enter_context(load_model(path, backend="llama_cpp", threads=2 * t))
        facts = {"model": os.path.basename(path), "threads_per_replica": t, "one_process_threads": 2 * t,
                 "chunk_size": chunk, "ray": str(ray.__version__)}

        def generate(pool: Pool) -> Callable[[], int]:
            def run() -> int:
                out = pool.batch_generate(prompts, max_tokens=n_tokens, chunk_size=chunk, progress=False)
                return sum(len(r.tokens) for r in _checked(out, "distributed batch_generate"))

            return run

        def generate_here() -> int:
            out = local.batch_generate(prompts, max_tokens=n_tokens)
            return sum(len(r.tokens) for r in _checked(out, "batch_generate"))

        yield Row(
            key="replicas_batch_generate",
            title=f"batch_generate over Ray replicas, {n_prompts} prompts x {n_tokens} tokens",
            unit="tokens/s",
            sides=[Side(TWO, timed(generate(two)), True), Side(ONE, timed(generate(one)), True),
                   Side(f"{LOCAL}, {2 * t} threads: batch_generate", timed(generate_here), True)],
            reference=ONE,
            targets=[Target(TWO, ">=", 1.8, ONE)],
            note=f"replicas of {t} thread(s) each on a local Ray cluster, chunks of {chunk} prompts; the "
            "one-process side decodes every prompt in one batch_generate call",
            info={**facts, "prompts": n_prompts, "max_tokens": n_tokens},
        )

        def classify(pool: Pool) -> Callable[[], int]:
            def run() -> int:
                out = pool.classify(sentences, chunk_size=max(1, len(sentences) // 8), progress=False)
                return len(_checked(out, "distributed classify"))

            return run

        def classify_here() -> int:
            return len(_checked(local.classify(sentences), "classify"))

        yield Row(
            key="replicas_classify",
            title=f"classify over Ray replicas, {len(sentences)} sentences",
            unit="sentences/s",
            sides=[Side(TWO, timed(classify(two)), True), Side(ONE, timed(classify(one)), True),
                   Side(f"{LOCAL}, {2 * t} threads: classify", timed(classify_here), True)],
            reference=ONE,
            targets=[Target(TWO, ">=", 1.8, ONE)],
            note="prefill only; chunks of an eighth of the sentences",
            info={**facts, "chunk_size": max(1, len(sentences) // 8), "sentences": len(sentences)},
        )


SUITE = Suite(
    name="distributed",
    engine="llama-cpp-python replicas on a local Ray cluster",
    rows=_rows,
    why_unavailable=_why_unavailable,
    versions=_versions,
)


def main(argv: list[str] | None = None) -> int:
    """``python -m core_inference.bench.distributed_suite [--quick] [--out DIR]``: this suite alone."""
    from .runner import suite_main

    return suite_main(
        SUITE, argv, "Ray replicas against one replica and one process.", runs=False
    )


if __name__ == "__main__":
    import sys

    sys.exit(main())
