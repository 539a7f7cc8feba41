"""What ``generate``/``chat`` return: a token stream that, once it ends, carries the call's result.

``TokenStream`` is a plain iterator of ``Token`` (code written in the seed's style loops
over it and calls ``model.err()``/``model.metrics()`` as before); ``AsyncTokenStream`` is
its async twin. Once the stream ends, for any reason, each carries that call's own
``finish_reason``, ``stop`` (what fired), ``err``, ``metrics`` and ``prompt_tokens``:
what a server needs to answer one request while other requests run on the same model.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

from .types import GenerateMetrics, Token


class CallResult:
    """One call's outcome, shared by its stream object and the code that runs the call.

    Kept apart from the stream so that the running generator never refers back to the
    stream object: breaking out of a ``for`` loop then frees the engine at once, with
    no reference cycle left for the garbage collector.
    """

    __slots__ = ("err", "finish_reason", "metrics", "prompt_tokens", "stop")

    def __init__(self) -> None:
        self.finish_reason: str | None = None
        self.stop: str | int | None = None
        self.err: BaseException | None = None
        self.metrics = GenerateMetrics()
        self.prompt_tokens = 0


class _ResultView:
    """The result fields, read through to the call's ``CallResult``."""

    __slots__ = ("_result",)

    _result: CallResult

    @property
    def finish_reason(self) -> str | None:
        """Why the stream ended: "length", "stop", "end_of_text", "context_full", "cancelled"
        or "error"; None while it runs."""
        return self._result.finish_reason

    @property
    def stop(self) -> str | int | None:
        """The stop string or stop token id that ended the stream (when ``finish_reason`` is "stop")."""
        return self._result.stop

    @property
    def err(self) -> BaseException | None:
        """The error that ended the stream, or None."""
        return self._result.err

    @property
    def metrics(self) -> GenerateMetrics:
        """This call's own counts and timings (zeros until the stream ends)."""
        return self._result.metrics

    @property
    def prompt_tokens(self) -> int:
        """How many tokens the prompt was (0 until prefill is done)."""
        return self._result.prompt_tokens

    @property
    def done(self) -> bool:
        """True once the stream has ended."""
        return self._result.finish_reason is not None


class TokenStream(_ResultView):
    """An iterator of ``Token`` for one ``generate``/``chat`` call, carrying its result.

    >>> for token in stream:                      # doctest: +SKIP
    ...     print(token.text, end="")
    >>> stream.finish_reason, stream.metrics.decode_tokens_per_sec   # doctest: +SKIP

    Breaking out of the loop (or ``close()``, or leaving a ``with`` block) stops the
    engine and frees its slot; ``finish_reason`` is then "cancelled" unless the stream
    had already ended.
    """

    __slots__ = ("_gen",)

    def __init__(self, gen: Iterator[Token], result: CallResult) -> None:
        self._gen = gen
        self._result = result

    def __iter__(self) -> Iterator[Token]:
        return self._gen  # the generator itself: a ``for`` loop runs at its full speed

    def __next__(self) -> Token:
        return next(self._gen)

    def close(self) -> None:
        """Stop the stream and free the engine's slot."""
        close = getattr(self._gen, "close", None)
        if close is not None:
            close()

    def text(self) -> str:
        """Consume the rest of the stream and return its text."""
        return "".join(t.text for t in self._gen)

    def __enter__(self) -> TokenStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = self.finish_reason or "running"
        return f"<TokenStream {state}>"


class AsyncTokenStream(_ResultView):
    """The async twin of ``TokenStream``, returned by ``agenerate``/``achat``.

    ``on_drop`` runs when the stream is closed or dropped unfinished (an abandoned async
    generator is finalised only when its event loop next runs; this stops the engine at
    once, as a sync stream is closed at once when a ``for`` loop breaks out of it).
    """

    __slots__ = ("_agen", "_on_drop")

    def __init__(
        self, agen: AsyncIterator[Token], result: CallResult, on_drop: Callable[[], None] | None = None
    ) -> None:
        self._agen = agen
        self._result = result
        self._on_drop = on_drop

    def __aiter__(self) -> AsyncTokenStream:
        return self

    def __anext__(self) -> Awaitable[Token]:
        return self._agen.__anext__()

    async def aclose(self) -> None:
        """Stop the stream and free the engine's slot."""
        if self._on_drop is not None:
            self._on_drop()
        aclose: Any = getattr(self._agen, "aclose", None)
        if aclose is not None:
            await aclose()

    async def text(self) -> str:
        """Consume the rest of the stream and return its text."""
        return "".join([t.text async for t in self._agen])

    async def __aenter__(self) -> AsyncTokenStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __del__(self) -> None:
        on_drop = getattr(self, "_on_drop", None)
        if on_drop is not None and not self.done:
            on_drop()

    def __repr__(self) -> str:
        state = self.finish_reason or "running"
        return f"<AsyncTokenStream {state}>"


def finish_reason_for(exc: BaseException) -> str:
    """The ``finish_reason`` of a stream that ended with ``exc``."""
    from .errors import Cancelled, DeadlineExceeded

    if isinstance(exc, (Cancelled, DeadlineExceeded, GeneratorExit, KeyboardInterrupt)):
        return "cancelled"
    return "error"


__all__ = ["AsyncTokenStream", "CallResult", "TokenStream", "finish_reason_for"]
