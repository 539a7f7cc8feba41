"""Bridges between sync and async engines, so a backend writes its raw stream only once.

- ``EngineLoop``: one event loop thread per model whose engine is async (an HTTP client,
  vLLM's ``AsyncLLM``). The engine's coroutines always run there, whichever thread or
  event loop the caller uses, so a client bound to one loop is never used from another.
- ``SyncBridge``/``AsyncBridge``: an engine's raw async stream read from a plain thread
  or from the caller's own event loop, one hand-off per piece (no thread per token);
  both stop waiting as soon as the call's context ends or the model closes, and closing
  them closes the engine's stream on its loop (which aborts the request there).
- ``pump_thread``: a sync engine's stream read from an event loop, through one worker
  thread per stream feeding an ``asyncio.Queue``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Coroutine, Iterator
from typing import Any, TypeVar

from .context import Context
from .errors import ModelClosed

_T = TypeVar("_T")
POLL = 0.05  # seconds between looks at the context while waiting for an async engine
_END = object()


class EngineLoop:
    """An event loop running in its own daemon thread, for one model's async engine."""

    def __init__(self, name: str = "core-inference engine loop") -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def submit(self, coro: Coroutine[Any, Any, _T]) -> concurrent.futures.Future[_T]:
        """Schedule ``coro`` on the loop; returns a thread-safe future."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, _T], ctx: Context | None = None,
            closed: threading.Event | None = None) -> _T:
        """Run ``coro`` on the loop and wait for it, giving up when ``ctx`` ends or the model closes."""
        return wait_future(self.submit(coro), ctx, closed)

    def stop(self) -> None:
        """Stop the loop and its thread (pending tasks are cancelled first)."""
        if self.loop.is_closed():
            return

        async def cancel_all() -> None:
            me = asyncio.current_task()
            tasks = [t for t in asyncio.all_tasks() if t is not me]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        if threading.current_thread() is not self._thread:
            with contextlib.suppress(concurrent.futures.TimeoutError, RuntimeError):
                self.submit(cancel_all()).result(timeout=5)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=5)
            if not self._thread.is_alive():
                self.loop.close()


def _poll(ctx: Context | None) -> float:
    """How long to wait before looking at ``ctx`` again: ``POLL``, or less where its deadline
    comes sooner, so that a deadline ends the wait when it passes, not up to ``POLL`` after."""
    deadline = None if ctx is None else ctx.deadline
    if deadline is None:
        return POLL
    return min(POLL, max(0.0, deadline - time.monotonic()))


def wait_future(
    fut: concurrent.futures.Future[_T], ctx: Context | None, closed: threading.Event | None
) -> _T:
    """``fut.result()``, but cancelled at once when ``ctx`` ends or ``closed`` is set."""
    if ctx is None and closed is None:
        return fut.result()
    while True:
        try:
            return fut.result(timeout=_poll(ctx))
        except concurrent.futures.TimeoutError:
            pass
        if ctx is not None and ctx.done():
            fut.cancel()
            ctx.raise_if_done()
        if closed is not None and closed.is_set():
            fut.cancel()
            raise ModelClosed("model closed during the call")


async def _next_or_end(agen: AsyncIterator[_T]) -> _T | object:
    try:
        return await agen.__anext__()
    except StopAsyncIteration:
        return _END


def _close_on_loop(loop: EngineLoop, agen: AsyncIterator[Any]) -> None:
    """Close an engine stream on its own loop without waiting (aborts its request there)."""
    aclose = getattr(agen, "aclose", None)
    if aclose is None or loop.loop.is_closed():
        return
    with contextlib.suppress(RuntimeError):  # the loop has stopped meanwhile
        loop.submit(aclose())


class SyncBridge(Iterator[_T]):
    """Reads an engine's async stream, running on ``loop``, from a plain thread."""

    def __init__(self, loop: EngineLoop, agen: AsyncIterator[_T], ctx: Context,
                 closed: threading.Event) -> None:
        self._loop, self._agen, self._ctx, self._closed = loop, agen, ctx, closed
        self._done = False

    def __next__(self) -> _T:
        if self._done:
            raise StopIteration
        item = wait_future(self._loop.submit(_next_or_end(self._agen)), self._ctx, self._closed)
        if item is _END:
            self._done = True
            raise StopIteration
        return item  # type: ignore[return-value]

    def close(self) -> None:
        """Close the engine's stream (on its loop)."""
        if not self._done:
            self._done = True
            _close_on_loop(self._loop, self._agen)


class AsyncBridge(AsyncIterator[_T]):
    """Reads an engine's async stream, running on ``loop``, from the caller's event loop."""

    def __init__(self, loop: EngineLoop, agen: AsyncIterator[_T], ctx: Context,
                 closed: threading.Event) -> None:
        self._loop, self._agen, self._ctx, self._closed = loop, agen, ctx, closed
        self._done = False

    async def __anext__(self) -> _T:
        if self._done:
            raise StopAsyncIteration
        fut = asyncio.wrap_future(self._loop.submit(_next_or_end(self._agen)))
        while True:
            done, _ = await asyncio.wait({fut}, timeout=_poll(self._ctx))
            if done:
                break
            if self._ctx.done() or self._closed.is_set():
                fut.cancel()
                self.close()
                self._ctx.raise_if_done()
                raise ModelClosed("model closed during the call")
        item = fut.result()
        if item is _END:
            self._done = True
            raise StopAsyncIteration
        return item  # type: ignore[return-value]

    def close(self) -> None:
        """Close the engine's stream (on its loop) without waiting."""
        if not self._done:
            self._done = True
            _close_on_loop(self._loop, self._agen)


class _Failure:
    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


async def pump_thread(
    start: Callable[[], Iterator[_T]], inner: Context, on_consumer_left: Callable[[], None]
) -> AsyncGenerator[_T, None]:
    """Run a blocking stream in one worker thread, feeding this event loop.

    When the consumer stops (break, ``aclose()``, task cancelled), ``inner`` is
    cancelled so the engine stops at its next token and frees its slot, and
    ``on_consumer_left`` runs first, so the cancel is not taken for the caller's.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Any] = asyncio.Queue()

    def put(item: Any) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the loop is gone; nobody is listening
            inner.cancel()

    def work() -> None:
        try:
            for item in start():
                put(item)
                # The caller's context ended (say why, as generate does) or the consumer
                # left (nobody reads it): either way stop here, not at the next token.
                inner.raise_if_done()
        except BaseException as exc:
            put(_Failure(exc))
        else:
            put(_END)

    worker = threading.Thread(target=work, name="core-inference-stream", daemon=True)
    worker.start()
    finished = False
    try:
        while True:
            item = await queue.get()
            if item is _END:
                finished = True
                return
            if isinstance(item, _Failure):
                finished = True
                raise item.exc
            yield item
    finally:
        if not finished:
            on_consumer_left()
        inner.cancel()
