"""The contract suite on the ``vllm`` backend (vLLM's CPU build here), on a tiny random llama."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import pytest

from core_inference.protocols import TextModel
from core_inference.testing import BackendContract

from .conftest import CONTEXT


class TestVllmContract(BackendContract):
    # A random tiny model writes few spaces: this prompt gives the stop-string rules their
    # three words within 32 tokens.
    prompt = "One two three"
    max_tokens = 32
    folder: ClassVar[Path]

    @pytest.fixture(autouse=True)
    def _folder(self, vllm_tiny: Path) -> None:
        type(self).folder = vllm_tiny

    def load_model(self, **kw: Any) -> TextModel:
        from core_inference.backends.vllm import VllmBackend

        kw.setdefault("context_len", CONTEXT)
        return VllmBackend().load_model(type(self).folder, **kw)
