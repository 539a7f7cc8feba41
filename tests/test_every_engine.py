"""One model, every engine: the default Gemma 3 270M gives the same greedy tokens everywhere.

The GGUF is converted once (``converted_default_model``, kept in the cache) to a Hugging
Face folder of float32 weights. MLX (``metal`` on its CPU device) and torch compute with
those same weights, so their greedy ids must agree on the first 32 tokens; llama.cpp
computes with the quantised original (Q4_K_M blocks, its own kernels), so it must agree on
the first 8 at least. Where engines part, the test prints at which token.

Measured here (32 tokens, run with ``-s`` to see it): metal and torch agree on all 32 of
each prompt; llama.cpp and torch on 15, 32 and 32. Where they part, two continuations were
nearly tied and quantisation moved one ahead, not a defect.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from core_inference import TextModel, load_model

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Water boils at a temperature of"]


def greedy(model: TextModel, prompt: str, n: int) -> list[int]:
    return [t.id for t in model.generate(prompt, max_tokens=n, temperature=0)]


def first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


@pytest.fixture(scope="module")
def runs(converted_default_model: Path, default_model_file: Path) -> Iterator[dict[str, list[list[int]]]]:
    pytest.importorskip("mlx_lm", reason="needs core-inference[mlx]")
    pytest.importorskip("torch", reason="needs core-inference[torch]")
    pytest.importorskip("llama_cpp", reason="needs core-inference[llama-cpp]")
    out: dict[str, list[list[int]]] = {}
    loads = {
        "metal": (converted_default_model, {"engine_options": {"device": "cpu"}}),
        "torch": (converted_default_model, {}),
        "llama_cpp": (default_model_file, {}),
    }
    for name, (path, extra) in loads.items():
        with load_model(path, backend=name, threads=1, context_len=512, **extra) as model:
            out[name] = [greedy(model, p, 32) for p in PROMPTS]
    yield out


def test_mlx_and_torch_agree_on_32_tokens(runs: dict[str, list[list[int]]]) -> None:
    for prompt, mlx_ids, torch_ids in zip(PROMPTS, runs["metal"], runs["torch"], strict=True):
        at = first_difference(mlx_ids, torch_ids)
        print(f"{prompt!r}: metal and torch agree on {at} of 32 tokens")
        assert mlx_ids == torch_ids, (prompt, at, mlx_ids, torch_ids)


def test_llama_cpp_agrees_on_the_first_8(runs: dict[str, list[list[int]]]) -> None:
    for prompt, torch_ids, llama_ids in zip(PROMPTS, runs["torch"], runs["llama_cpp"], strict=True):
        at = first_difference(torch_ids, llama_ids)
        print(f"{prompt!r}: llama_cpp (Q4_K_M) and torch (float32 from it) agree on {at} of 32 tokens")
        assert at >= 8, (prompt, at, torch_ids, llama_ids)
