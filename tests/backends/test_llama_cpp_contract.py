"""The contract suite on the real llama.cpp engine and the embedded default model."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from core_inference.backends.llama_cpp import LlamaCppBackend
from core_inference.protocols import TextModel
from core_inference.testing import BackendContract

if TYPE_CHECKING:  # the lazy re-export is typed ``object``; give mypy its real signature
    from core_inference.default_model import default_model_path
else:
    from core_inference import default_model_path


class TestLlamaCppContract(BackendContract):
    def load_model(self, **kw: Any) -> TextModel:
        return LlamaCppBackend().load_model(default_model_path(progress=False), **kw)
