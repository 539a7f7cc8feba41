"""The contract: what every model and every backend provides."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Generator, Sequence
from typing import Any, Protocol, runtime_checkable

from .context import Context
from .types import BatchResult, ClassifyResult, GenerateMetrics, Message, ModelInfo, Token


@runtime_checkable
class TextModel(Protocol):
    """A loaded model that streams text (the seed's ``TextModel``)."""

    model_type: str

    def generate(
        self, prompt: str, *opts: Any, ctx: Context | None = None, **kw: Any
    ) -> Generator[Token, None, None]: ...

    def chat(
        self, messages: Sequence[Any], *opts: Any, ctx: Context | None = None, **kw: Any
    ) -> Generator[Token, None, None]: ...

    def agenerate(
        self, prompt: str, *opts: Any, ctx: Context | None = None, **kw: Any
    ) -> AsyncIterator[Token]: ...

    def achat(
        self, messages: Sequence[Any], *opts: Any, ctx: Context | None = None, **kw: Any
    ) -> AsyncIterator[Token]: ...

    def classify(
        self, prompts: Sequence[str], *opts: Any, ctx: Context | None = None, **kw: Any
    ) -> list[ClassifyResult]: ...

    def batch_generate(
        self, prompts: Sequence[str], *opts: Any, ctx: Context | None = None, **kw: Any
    ) -> list[BatchResult]: ...

    def chat_prompt(self, messages: list[Message]) -> str: ...

    def info(self) -> ModelInfo: ...

    def metrics(self) -> GenerateMetrics: ...

    def err(self) -> BaseException | None: ...

    def close(self) -> None: ...

    def __enter__(self) -> Any: ...

    def __exit__(self, *exc: object) -> None: ...


@runtime_checkable
class Backend(Protocol):
    """A named engine that can load models (the seed's ``Backend``)."""

    name: str

    def available(self) -> bool: ...

    def why_unavailable(self) -> str | None: ...

    def can_load(self, path: str | os.PathLike[str]) -> bool: ...

    def load_model(self, path: str | os.PathLike[str], *opts: Any, **kw: Any) -> TextModel: ...
