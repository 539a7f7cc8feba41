"""Fixtures the llama.cpp backend's test modules share."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest

import core_inference as ci


@pytest.fixture(scope="module")
def model_path() -> Path:
    """The embedded default model (Gemma 3 270M, GGUF)."""
    return cast("Callable[..., Path]", ci.default_model_path)(progress=False)


EXACT = {"prefix_cache": False, "shared_decode": False}  # nothing shared: answers as the prompt alone


def ids(tokens: Any) -> list[int]:
    """The token ids of a stream or a result's tokens."""
    return [t.id for t in tokens]


def _llama(model_path: Path, **options: Any) -> Any:
    from core_inference.backends.llama_cpp import LlamaCppBackend
    from core_inference.backends.llama_cpp.model import LlamaCppModel

    m = LlamaCppBackend().load_model(model_path, parallel_slots=4, **options)
    assert isinstance(m, LlamaCppModel)
    return m


@pytest.fixture(scope="module")
def model(model_path: Path) -> Iterator[Any]:
    """The default model on llama.cpp with 4 slots (a module's own; modules may override it)."""
    m = _llama(model_path)
    yield m
    m.close()


@pytest.fixture(scope="module")
def exact(model_path: Path) -> Iterator[Any]:
    """The same with nothing shared: every answer as the prompt alone gives it."""
    m = _llama(model_path, engine_options=EXACT)
    yield m
    m.close()
