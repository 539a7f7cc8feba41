"""The contract: what every model and every backend provides."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from .context import Context
from .results import AsyncTokenStream, TokenStream
from .types import BatchResult, Capabilities, ClassifyResult, GenerateMetrics, ModelInfo


@runtime_checkable
class TextModel(Protocol):
    """A loaded model that streams text (the seed's ``TextModel``)."""

    model_type: str

    @property
    def context_len(self) -> int: ...

    @property
    def capabilities(self) -> Capabilities: ...

    def generate(self, prompt: str, *opts: Any, ctx: Context | None = None, **kw: Any) -> TokenStream: ...

    def chat(
        self, messages: Sequence[Any], *opts: Any, ctx: Context | None = None, **kw: Any
    ) -> TokenStream: ...

    def agenerate(
        self, prompt: str, *opts: Any, ctx: Context | None = None, **kw: Any
    ) -> AsyncTokenStream: ...

    def achat(
        self, messages: Sequence[Any], *opts: Any, ctx: Context | None = None, **kw: Any
    ) -> AsyncTokenStream: ...

    def classify(
        self, prompts: Sequence[str], *opts: Any, ctx: Context | None = None, **kw: Any
    ) -> list[ClassifyResult]: ...

    def batch_generate(
        self, prompts: Sequence[str], *opts: Any, ctx: Context | None = None, **kw: Any
    ) -> list[BatchResult]: ...

    def chat_prompt(self, messages: Sequence[Any]) -> str: ...

    def tokenize(self, text: str) -> list[int]: ...

    def detokenize(self, ids: Sequence[int]) -> str: ...

    def info(self) -> ModelInfo: ...

    def metrics(self) -> GenerateMetrics: ...

    def err(self) -> BaseException | None: ...

    def close(self) -> None: ...

    def __enter__(self) -> Any: ...

    def __exit__(self, *exc: object) -> None: ...


@runtime_checkable
class Backend(Protocol):
    """A named engine that can load models (the seed's ``Backend``)."""

    @property
    def name(self) -> str: ...

    def available(self) -> bool: ...

    def why_unavailable(self) -> str | None: ...

    def can_load(self, path: str | os.PathLike[str]) -> bool: ...

    def load_model(self, path: str | os.PathLike[str], *opts: Any, **kw: Any) -> TextModel: ...
