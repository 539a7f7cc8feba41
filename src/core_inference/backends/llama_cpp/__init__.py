"""The ``llama_cpp`` backend: GGUF files through llama-cpp-python's low-level bindings.

This module imports only the core: llama-cpp-python is imported when a model loads
(``model.py`` and ``engine.py``), so listing or choosing backends stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ...backend import BaseBackend
from ...formats.validate import gguf_header
from ...types import LoadConfig
from .hparams import check_hparams

if TYPE_CHECKING:
    from .model import LlamaCppModel


class LlamaCppBackend(BaseBackend):
    """GGUF files on llama.cpp: CPU here; Metal, CUDA, ROCm or Vulkan where it was built so."""

    name = "llama_cpp"
    extra = "llama-cpp"
    engine_modules = ("llama_cpp",)
    formats = ("gguf",)
    engine_options = frozenset({"batch_invariant", "prefill_chunk", "prefix_cache", "shared_decode"})

    def _load(self, path: str, cfg: LoadConfig) -> LlamaCppModel:
        header = gguf_header(path)  # llama.cpp can abort the process on a malformed file
        check_hparams(header)  # ... or on values it asserts rather than checks
        from .model import LlamaCppModel

        return LlamaCppModel(path, header, cfg)


__all__ = ["LlamaCppBackend"]
