"""The contract suite on the real llama.cpp engine and the embedded default model."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from core_inference.backends.llama_cpp import LlamaCppBackend
from core_inference.protocols import TextModel
from core_inference.testing import BackendContract

if TYPE_CHECKING:  # the lazy re-export is typed ``object``; give mypy its real signature
    from core_inference.default_model import default_model_path
else:
    from core_inference import default_model_path


class TestLlamaCppContract(BackendContract):
    # threads checked against the prompts alone where nothing is shared: with the defaults two
    # streams share a decode, and llama.cpp picks its kernels by the rows in it (a greedy answer
    # can change, docs/reliability.md: found on an Intel Xeon VM, where 8 threads on 2 slots
    # gave one answer different from alone in one CI run of two)
    alone_kw: ClassVar[dict[str, Any]] = {"engine_options": {"shared_decode": False, "prefix_cache": False}}

    def load_model(self, **kw: Any) -> TextModel:
        return LlamaCppBackend().load_model(default_model_path(progress=False), **kw)
