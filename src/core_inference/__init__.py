"""core-inference: one Python contract for text generation, many engines behind it.

>>> import core_inference as ci
>>> with ci.load_model() as model:                     # the embedded default model
...     for token in model.generate("The capital of France is", max_tokens=16):
...         print(token.text, end="")

What an application uses is here; what a backend author uses is in
``core_inference.backend`` (``BaseBackend``, ``BaseModel``, the stream helpers).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .context import Context
from .discover import DiscoveredModel, discover
from .errors import (
    BackendNotRegistered,
    BackendUnavailable,
    Cancelled,
    ContextLengthExceeded,
    DeadlineExceeded,
    EngineError,
    InferenceError,
    ModelClosed,
    ModelLoadError,
    NoBackendAvailable,
)
from .options import (
    GenerateOption,
    LoadOption,
    with_backend,
    with_context_len,
    with_engine_options,
    with_gpu_layers,
    with_max_tokens,
    with_parallel_slots,
    with_repeat_penalty,
    with_return_logits,
    with_seed,
    with_stop,
    with_stop_tokens,
    with_temperature,
    with_threads,
    with_top_k,
    with_top_p,
)
from .protocols import Backend, TextModel
from .registry import (
    broken_backends,
    default_backend,
    get,
    list_backends,
    load_model,
    preference_order,
    register,
    unregister,
)
from .results import AsyncTokenStream, TokenStream
from .types import (
    BatchResult,
    Capabilities,
    ClassifyResult,
    GenerateConfig,
    GenerateMetrics,
    LoadConfig,
    Message,
    ModelInfo,
    Token,
)

__version__ = "0.1.0"

if TYPE_CHECKING:  # the lazy names below, typed for checkers
    from .default_model import chat_model_path, default_model_path

# Imported on first touch, keeping ``import core_inference`` fast. The backend-author
# names lived here before 0.2 and still resolve, from ``core_inference.backend``.
_LAZY = {
    "default_model_path": "core_inference.default_model",
    "chat_model_path": "core_inference.default_model",
    "BaseBackend": "core_inference.backend",
    "BaseModel": "core_inference.backend",
    "apply_generate_opts": "core_inference.backend",
    "apply_load_opts": "core_inference.backend",
}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'core_inference' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "AsyncTokenStream", "Backend", "BackendNotRegistered", "BackendUnavailable", "BatchResult",
    "Cancelled", "Capabilities", "ClassifyResult", "Context", "ContextLengthExceeded",
    "DeadlineExceeded", "DiscoveredModel", "EngineError", "GenerateConfig", "GenerateMetrics",
    "GenerateOption", "InferenceError", "LoadConfig", "LoadOption", "Message", "ModelClosed",
    "ModelInfo", "ModelLoadError", "NoBackendAvailable", "TextModel", "Token", "TokenStream",
    "broken_backends", "chat_model_path", "default_backend", "default_model_path", "discover", "get",
    "list_backends", "load_model", "preference_order", "register", "unregister",
    "with_backend", "with_context_len", "with_engine_options", "with_gpu_layers",
    "with_max_tokens", "with_parallel_slots", "with_repeat_penalty", "with_return_logits",
    "with_seed", "with_stop", "with_stop_tokens", "with_temperature", "with_threads",
    "with_top_k", "with_top_p",
]
