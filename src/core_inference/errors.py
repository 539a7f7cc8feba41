"""The error hierarchy: every failure the library raises is an ``InferenceError``."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping


class InferenceError(Exception):
    """Base of every error raised by core-inference."""


class BackendNotRegistered(InferenceError, LookupError):
    """No backend is registered under the asked-for name."""

    def __init__(self, name: str, known: Iterable[str]) -> None:
        self.name = name
        self.known = sorted(known)
        names = ", ".join(self.known) or "none"
        super().__init__(f"backend {name!r} is not registered (known backends: {names})")

    def __reduce__(self) -> tuple[object, ...]:  # pickle rebuilds from the arguments, not the message
        return (type(self), (self.name, self.known), self.__dict__)


class BackendUnavailable(InferenceError):
    """A registered backend cannot run here: its engine is missing or the hardware is absent."""

    def __init__(self, name: str, reason: str, extra: str | None = None) -> None:
        self.name = name
        self.reason = reason
        self.extra = extra
        install = f"pip install 'core-inference[{extra}]'"
        hint = f"; install it with: {install}" if extra and install not in reason else ""
        super().__init__(f"backend {name!r} is unavailable: {reason}{hint}")

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.name, self.reason, self.extra), self.__dict__)


class NoBackendAvailable(InferenceError):
    """No registered backend is available and able to load the model.

    ``reasons`` maps each backend name that was tried to why it was passed over.
    """

    def __init__(self, message: str, reasons: Mapping[str, str] | None = None) -> None:
        self.reasons: dict[str, str] = dict(reasons or {})
        super().__init__(message)

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (str(self), self.reasons), self.__dict__)


class ModelLoadError(InferenceError):
    """A model is missing, corrupt, truncated or of a format no backend supports.

    ``path`` is the file or folder at fault when one is known (else None).
    """

    def __init__(self, message: str, path: str | os.PathLike[str] | None = None) -> None:
        self.path: str | None = os.fspath(path) if path is not None else None
        super().__init__(message)

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (str(self), self.path), self.__dict__)


class ContextLengthExceeded(InferenceError, ValueError):
    """The prompt (plus room to generate) does not fit the model's context.

    ``requested`` is the prompt's length in tokens and ``limit`` the context it had to fit.
    """

    def __init__(self, requested: int, limit: int) -> None:
        self.requested = requested
        self.limit = limit
        super().__init__(f"prompt of {requested} tokens does not fit the context of {limit} tokens")

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.requested, self.limit), self.__dict__)

    @property
    def prompt_tokens(self) -> int:
        """The same as ``requested`` (the name before 0.2)."""
        return self.requested

    @property
    def context_len(self) -> int:
        """The same as ``limit`` (the name before 0.2)."""
        return self.limit


class EngineError(InferenceError):
    """A failure inside an engine (llama.cpp, MLX, torch, vLLM, a remote server).

    Each backend maps its engine's exceptions to this (or to a more specific contract
    error) in one place, chaining the engine's own exception as ``__cause__``.
    """


class Cancelled(InferenceError):
    """The call's ``Context`` was cancelled."""


class DeadlineExceeded(InferenceError, TimeoutError):
    """The call's ``Context`` passed its deadline."""


class ModelClosed(InferenceError):
    """The model was closed; no further calls are possible."""
