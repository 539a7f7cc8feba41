"""The error hierarchy: every failure the library raises is an ``InferenceError``."""

from __future__ import annotations

from collections.abc import Iterable


class InferenceError(Exception):
    """Base of every error raised by core-inference."""


class BackendNotRegistered(InferenceError, LookupError):
    """No backend is registered under the asked-for name."""

    def __init__(self, name: str, known: Iterable[str]) -> None:
        self.name = name
        self.known = sorted(known)
        names = ", ".join(self.known) or "none"
        super().__init__(f"backend {name!r} is not registered (known backends: {names})")


class BackendUnavailable(InferenceError):
    """A registered backend cannot run here: its engine is missing or the hardware is absent."""

    def __init__(self, name: str, reason: str, extra: str | None = None) -> None:
        self.name = name
        self.reason = reason
        self.extra = extra
        install = f"pip install 'core-inference[{extra}]'"
        hint = f"; install it with: {install}" if extra and install not in reason else ""
        super().__init__(f"backend {name!r} is unavailable: {reason}{hint}")


class NoBackendAvailable(InferenceError):
    """No registered backend is available and able to load the model."""


class ModelLoadError(InferenceError):
    """A model is missing, corrupt, truncated or of a format no backend supports."""


class ContextLengthExceeded(InferenceError, ValueError):
    """The prompt (plus room to generate) does not fit the model's context."""

    def __init__(self, prompt_tokens: int, context_len: int) -> None:
        self.prompt_tokens = prompt_tokens
        self.context_len = context_len
        super().__init__(
            f"prompt of {prompt_tokens} tokens does not fit the context of {context_len} tokens"
        )


class Cancelled(InferenceError):
    """The call's ``Context`` was cancelled."""


class DeadlineExceeded(InferenceError, TimeoutError):
    """The call's ``Context`` passed its deadline."""


class ModelClosed(InferenceError):
    """The model was closed; no further calls are possible."""
