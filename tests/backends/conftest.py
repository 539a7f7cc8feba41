"""Fixtures the llama.cpp backend's test modules share."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import cast

import pytest

import core_inference as ci


@pytest.fixture(scope="module")
def model_path() -> Path:
    """The embedded default model (Gemma 3 270M, GGUF)."""
    return cast("Callable[..., Path]", ci.default_model_path)(progress=False)
