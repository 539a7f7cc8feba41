"""Fixtures for the vLLM tests, which run in their own virtual environment (``.venv-vllm``).

``make test`` runs them there after the main suite; in any environment without vLLM they
are skipped, saying so. vLLM starts its engine and workers as spawned processes: each test
module loads as few engines as it can, with a small context and one thread per process.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MAIN_PYTHON = REPO / ".venv" / "bin" / "python"
CONTEXT = 256  # max_model_len of the tiny model's engines


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip every test here, saying why, where vLLM is not installed (the main ``.venv``)."""
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        return
    here = Path(__file__).parent
    why = (
        "vLLM is not installed in this environment: these tests run in .venv-vllm "
        "(`make test` builds it and runs them there)"
    )
    if (REPO / ".venv-vllm" / ".unavailable").exists():
        why = "the vLLM environment could not be built here: " + \
            (REPO / ".venv-vllm" / ".unavailable").read_text().strip()
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.skip(reason=why))


@pytest.fixture(scope="session", autouse=True)
def _one_thread_per_engine() -> Iterator[None]:
    """vLLM's CPU build binds one OpenMP thread per core unless told: 1 thread, core 0."""
    saved = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0")
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)


@pytest.fixture(scope="session")
def vllm_tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random llama folder that vLLM loads (built once per session, ~2 s)."""
    from .tiny import make_vllm_tiny

    return make_vllm_tiny(tmp_path_factory.mktemp("vllm-tiny") / "llama")


@pytest.fixture(scope="session")
def converted_default_folder() -> Path:
    """The default model converted to a Hugging Face folder, by the main ``.venv``
    (conversion needs gguf and transformers 5, which this environment lacks); kept in the
    user's cache, so only the first run on a machine pays its minutes."""
    if not MAIN_PYTHON.exists():
        pytest.skip(f"{MAIN_PYTHON} is missing: the default model is converted there (make test builds it)")
    from core_inference.convert import convert_default_with

    try:
        return convert_default_with(MAIN_PYTHON, timeout=1800)
    except RuntimeError as exc:
        pytest.fail(str(exc))
