"""Rows for the ``vllm`` backend against vLLM's ``AsyncLLM`` called directly.

Both sides drive the same engine (our backend's own ``AsyncLLM``, on its own event loop):
the same weights, processes and threads, in one run, interleaved. The direct side submits
``SamplingParams`` itself and counts the ids of the deltas; ours goes through ``generate``
and ``batch_generate`` (tokenizing, the result per call, whole-UTF-8 text, stops matched on
our side). It runs where vLLM is installed: ``.venv-vllm/bin/python -m
core_inference.bench.vllm_suite --out bench/results`` (vLLM pins its own torch, so it is not
in the main environment and ``make bench`` does not run it).

- ``decode``: one stream of ``decode_tokens`` greedy tokens (a prompt that does not end
  sooner; the direct side ignores the end-of-text token, and ours is checked to get them all).
- ``batch_generate``: ``batch_prompts`` prompts of ``batch_tokens`` tokens, all submitted at
  once (vLLM batches them in its steps), aggregate tokens/s.

The model is a Hugging Face folder (``--model DIR``), or the default GGUF converted by the
main environment (vLLM's lacks the converter), kept in the cache.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from .harness import BenchConfig, BenchError, Row, Side, Suite, Target, timed
from .llama_cpp_suite import BATCH_PROMPTS, DECODE_PROMPT

OURS = "ours"
DIRECT = "AsyncLLM.generate"


def _why_unavailable() -> str | None:
    if importlib.util.find_spec("vllm") is None:
        return "vllm is not installed here (it has an environment of its own: make test builds .venv-vllm)"
    return None


def _versions() -> dict[str, str]:
    import vllm

    return {"vllm": str(vllm.__version__)}


def _folder(cfg: BenchConfig) -> str:
    """``--model`` when it is a folder; else the default model converted by the main ``.venv``."""
    from ..formats import HF, sniff_format

    if cfg.model and sniff_format(cfg.model) == HF:
        return cfg.model
    if cfg.model:
        raise BenchError("the vllm suite needs a Hugging Face folder (core-inference convert makes one)")
    import sys
    from pathlib import Path

    from ..convert import convert_default_with

    try:  # vLLM's environment lacks the converter: the main one (beside it) converts
        return str(convert_default_with(Path(sys.prefix).parent / ".venv" / "bin" / "python"))
    except RuntimeError as exc:
        raise BenchError(str(exc)[-800:]) from exc



def _direct(model: Any, prompts: list[str], n: int) -> Callable[[], int]:
    """vLLM's own ``generate`` on the backend's engine: every prompt at once, greedy, ``n`` ids each."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    engine = model._engine
    ids = [model.tokenize(p) for p in prompts]
    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True,
                            output_kind=RequestOutputKind.DELTA)

    async def one(tokens: list[int]) -> int:
        got = 0
        async for out in engine.generate({"prompt_token_ids": tokens}, params, f"bench-{uuid.uuid4().hex}"):
            got += len(out.outputs[0].token_ids)
        return got

    async def every() -> int:
        return sum(await asyncio.gather(*(one(t) for t in ids)))

    def work() -> int:
        got: int = model.engine_loop().run(every())
        if got != n * len(prompts):
            raise BenchError(f"vLLM gave {got} of {n * len(prompts)} tokens")
        return got

    return work


def _rows(cfg: BenchConfig) -> Iterator[Row]:
    from ..backends.vllm import VllmBackend

    folder = _folder(cfg)
    n, slots = cfg.decode_tokens, max(cfg.batch_prompts, 2)
    began = time.monotonic()
    model = VllmBackend().load_model(folder, context_len=1024, parallel_slots=slots,
                                     engine_options={"dtype": "float32"})
    facts: dict[str, Any] = {
        "model": folder.rstrip("/").rsplit("/", 1)[-1], "load_seconds": round(time.monotonic() - began, 1),
        "dtype": "float32", "max_model_len": 1024,
        # vLLM's CPU build: the cores its worker's threads are bound to ("auto": every core here)
        "cpu_threads_bind": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto"),
    }
    try:
        def ours_decode() -> int:
            got = sum(1 for _ in model.generate(DECODE_PROMPT, max_tokens=n))
            if got != n:
                raise BenchError(f"generate stopped after {got} of {n} tokens; pick another prompt")
            return n

        direct = timed(_direct(model, [DECODE_PROMPT], n))
        yield Row("decode", "one stream's greedy tokens/s", "tokens/s",
                  [Side(OURS, timed(ours_decode), True), Side(DIRECT, direct, False)],
                  DIRECT, targets=[Target(OURS, ">=", 0.97, against=DIRECT)], info={**facts, "tokens": n},
                  note="the same engine on both sides; ours adds tokenizing, each token's text, the result")

        prompts = list(BATCH_PROMPTS * ((cfg.batch_prompts // len(BATCH_PROMPTS)) + 1))[: cfg.batch_prompts]
        m = cfg.batch_tokens

        def ours_batch() -> int:
            results = model.batch_generate(prompts, max_tokens=m)
            got = sum(len(r.tokens) for r in results)
            if got != m * len(prompts) or any(r.err for r in results):
                raise BenchError(f"batch_generate gave {got} of {m * len(prompts)} tokens")
            return got

        direct = timed(_direct(model, prompts, m))
        yield Row("batch_generate", "a batch's aggregate tokens/s", "tokens/s",
                  [Side(OURS, timed(ours_batch), True), Side(DIRECT, direct, False)],
                  DIRECT, targets=[Target(OURS, ">=", 0.97, against=DIRECT)],
                  info={**facts, "prompts": len(prompts), "tokens": m},
                  note="every prompt submitted at once on both sides; vLLM batches them in its steps")
    finally:
        model.close()


SUITE = Suite("vllm", "vllm", _rows, _why_unavailable, _versions)


def main(argv: list[str] | None = None) -> int:
    """``python -m core_inference.bench.vllm_suite [--quick] [--out DIR]`` (in ``.venv-vllm``)."""
    from .runner import suite_main

    return suite_main(
        SUITE, argv, "The vllm backend against vLLM's AsyncLLM on the same engine.",
        model_help="a Hugging Face folder (default: the embedded model, converted)", threads=False
    )


if __name__ == "__main__":  # vLLM spawns its engine and workers: the guard is required
    import sys

    sys.exit(main())
