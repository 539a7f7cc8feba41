"""``BaseModel``: the contract's machinery written once, so a backend writes only its engine calls.

A backend subclasses ``BaseModel`` and implements ``_engine_generate`` (a raw stream of
``(token id, bytes)``), ``_close_engine`` and, where the engine can, ``_engine_chat``,
``_classify`` and ``_batch_generate``. Options, validation, slots, cancellation,
stop handling, metrics, ``err()``, async and closing all live here.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Generator,
    Iterator,
    Mapping,
    Sequence,
)
from typing import Any, TypeVar

from .context import Context
from .errors import ModelClosed
from .options import apply_generate_opts
from .streaming import MetricsRecorder, Piece, SlotQueue, finish_tokens
from .types import BatchResult, ClassifyResult, GenerateConfig, GenerateMetrics, Message, ModelInfo, Token

MessageLike = Message | Mapping[str, Any]
_R = TypeVar("_R")
_M = TypeVar("_M", bound="BaseModel")


def to_messages(messages: Sequence[MessageLike]) -> list[Message]:
    """Validate a conversation: a non-empty list of ``Message`` or role/content mappings."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise TypeError("messages: expected a list of Message or {'role', 'content'} mappings")
    if not messages:
        raise ValueError("messages: the conversation is empty")
    return [m if isinstance(m, Message) else Message.from_dict(m) for m in messages]


def check_prompts(prompts: Sequence[str]) -> list[str]:
    """Validate a list of prompts for ``classify`` and ``batch_generate``."""
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise TypeError("prompts: expected a list of str")
    for p in prompts:
        if not isinstance(p, str):
            raise TypeError(f"prompts: expected str items, got {type(p).__name__}")
    return list(prompts)


def _check_prompt(prompt: object) -> str:
    if not isinstance(prompt, str):
        raise TypeError(f"prompt: expected str, got {type(prompt).__name__}")
    return prompt


_END = object()


class BaseModel:
    """Shared implementation of the ``TextModel`` contract."""

    model_type: str = ""

    def __init__(self, parallel_slots: int = 1) -> None:
        self._slots = SlotQueue(parallel_slots)
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._active = 0
        self._freed = False
        self._last_err: BaseException | None = None
        self._last_metrics = GenerateMetrics()

    # -- what a backend implements -------------------------------------------------

    def _engine_generate(
        self, prompt: str, cfg: GenerateConfig, ctx: Context, rec: MetricsRecorder
    ) -> Iterator[Piece]:
        """Raw (token id, bytes) stream for a prompt; checks ``ctx`` between prefill chunks."""
        raise NotImplementedError

    def _engine_chat(
        self, messages: list[Message], cfg: GenerateConfig, ctx: Context, rec: MetricsRecorder
    ) -> Iterator[Piece]:
        """Raw stream for a conversation; by default the chat prompt through generate."""
        return self._engine_generate(self.chat_prompt(messages), cfg, ctx, rec)

    def chat_prompt(self, messages: list[Message]) -> str:
        """The prompt text the model's chat template builds for ``messages``."""
        raise NotImplementedError(f"{type(self).__name__} has no chat template")

    def _classify(
        self, prompts: list[str], cfg: GenerateConfig, ctx: Context, rec: MetricsRecorder
    ) -> list[ClassifyResult]:
        raise NotImplementedError(f"{type(self).__name__} does not support classify")

    def _batch_generate(
        self, prompts: list[str], cfg: GenerateConfig, ctx: Context, rec: MetricsRecorder
    ) -> list[BatchResult]:
        """Fallback for engines that cannot batch: one prompt after another."""
        results = []
        for prompt in prompts:
            sub = MetricsRecorder()
            raw: Iterator[Piece] | None = None
            try:
                raw = self._engine_generate(prompt, cfg, ctx, sub)
                tokens = tuple(finish_tokens(raw, cfg, ctx, sub, self._closed))
                results.append(BatchResult(tokens))
            except Exception as exc:  # one bad prompt does not sink the batch
                if ctx.err() is not None or self._closed.is_set():
                    raise  # ... but a cancelled call or a closed model does
                results.append(BatchResult(err=exc))
            finally:
                close = getattr(raw, "close", None)
                if close is not None:
                    close()
                rec.prompt_tokens += sub.prompt_tokens
                rec.generated_tokens += sub.generated_tokens
                rec.first_token = rec.first_token or sub.first_token
        return results

    def _close_engine(self) -> None:
        """Free the engine's memory. Called once, when no call is running."""

    def info(self) -> ModelInfo:
        """What the model is."""
        return ModelInfo(architecture=self.model_type)

    # -- the contract --------------------------------------------------------------

    def generate(
        self, prompt: str, *opts: Any, ctx: Context | None = None, **kw: Any
    ) -> Generator[Token, None, None]:
        """Stream tokens for ``prompt``; options as ``with_x(...)`` or keywords."""
        cfg = apply_generate_opts(opts, **kw)
        prompt = _check_prompt(prompt)
        self._check_open()
        return self._stream(lambda c, r: self._engine_generate(prompt, cfg, c, r), cfg, ctx)

    def chat(
        self, messages: Sequence[MessageLike], *opts: Any, ctx: Context | None = None, **kw: Any
    ) -> Generator[Token, None, None]:
        """Stream the assistant's reply to a conversation, through the model's chat template."""
        cfg = apply_generate_opts(opts, **kw)
        msgs = to_messages(messages)
        self._check_open()
        return self._stream(lambda c, r: self._engine_chat(msgs, cfg, c, r), cfg, ctx)

    def classify(
        self, prompts: Sequence[str], *opts: Any, ctx: Context | None = None, **kw: Any
    ) -> list[ClassifyResult]:
        """Prefill each prompt and sample the token at its last position."""
        cfg = apply_generate_opts(opts, **kw)
        items = check_prompts(prompts)
        return self._call(lambda c, r: self._classify(items, cfg, c, r), ctx)

    def batch_generate(
        self, prompts: Sequence[str], *opts: Any, ctx: Context | None = None, **kw: Any
    ) -> list[BatchResult]:
        """Generate for every prompt together; a failing prompt sets only its own ``err``."""
        cfg = apply_generate_opts(opts, **kw)
        items = check_prompts(prompts)
        return self._call(lambda c, r: self._batch_generate(items, cfg, c, r), ctx)

    def agenerate(
        self, prompt: str, *opts: Any, ctx: Context | None = None, **kw: Any
    ) -> AsyncIterator[Token]:
        """``generate`` as an async iterator that never blocks the event loop."""
        return _aiter_thread(lambda c: self.generate(prompt, *opts, ctx=c, **kw), ctx)

    def achat(
        self, messages: Sequence[MessageLike], *opts: Any, ctx: Context | None = None, **kw: Any
    ) -> AsyncIterator[Token]:
        """``chat`` as an async iterator that never blocks the event loop."""
        return _aiter_thread(lambda c: self.chat(messages, *opts, ctx=c, **kw), ctx)

    async def aclassify(
        self, prompts: Sequence[str], *opts: Any, ctx: Context | None = None, **kw: Any
    ) -> list[ClassifyResult]:
        """``classify`` run in a worker thread."""
        import asyncio

        return await asyncio.to_thread(self.classify, prompts, *opts, ctx=ctx, **kw)

    async def abatch_generate(
        self, prompts: Sequence[str], *opts: Any, ctx: Context | None = None, **kw: Any
    ) -> list[BatchResult]:
        """``batch_generate`` run in a worker thread."""
        import asyncio

        return await asyncio.to_thread(self.batch_generate, prompts, *opts, ctx=ctx, **kw)

    def metrics(self) -> GenerateMetrics:
        """Counts and timings of the last finished call."""
        return self._last_metrics

    def err(self) -> BaseException | None:
        """The error that ended the last call, or None if it succeeded (the seed's ``Err``)."""
        return self._last_err

    @property
    def closed(self) -> bool:
        """True once ``close()`` was called."""
        return self._closed.is_set()

    def close(self) -> None:
        """Free the engine; idempotent. Running streams end with ``ModelClosed``."""
        with self._lock:
            if self._closed.is_set():
                return
            self._closed.set()
            free_now = self._active == 0
        if free_now:
            self._free()

    def __enter__(self: _M) -> _M:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        closed = getattr(self, "_closed", None)
        if closed is not None and not closed.is_set():
            warnings.warn(
                f"{type(self).__name__} was not closed; call close() or use 'with'",
                ResourceWarning,
                stacklevel=2,
            )
            closed.set()
            self._free()

    # -- machinery -----------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed.is_set():
            raise ModelClosed("the model is closed")

    def _free(self) -> None:
        with self._lock:
            if self._freed:
                return
            self._freed = True
        self._close_engine()

    def _enter(self, ctx: Context) -> None:
        self._slots.acquire(ctx, self._closed)
        with self._lock:
            self._active += 1
        if self._closed.is_set():
            self._leave()
            raise ModelClosed("the model is closed")

    def _leave(self) -> None:
        self._slots.release()
        with self._lock:
            self._active -= 1
            free_now = self._active == 0 and self._closed.is_set()
        if free_now:
            self._free()

    def _stream(
        self,
        produce: Callable[[Context, MetricsRecorder], Iterator[Piece]],
        cfg: GenerateConfig,
        ctx: Context | None,
    ) -> Generator[Token, None, None]:
        """The stream generator: waits for a slot on first ``next()``, frees it at the end."""
        ctx = ctx or Context.background()
        self._last_err = None
        try:
            self._enter(ctx)
        except BaseException as exc:
            self._last_err = exc
            raise
        rec = MetricsRecorder()
        raw: Iterator[Piece] | None = None
        try:
            raw = produce(ctx, rec)
            yield from finish_tokens(raw, cfg, ctx, rec, self._closed)
            self._last_err = None
        except GeneratorExit:
            raise
        except BaseException as exc:
            self._last_err = exc
            raise
        finally:
            close = getattr(raw, "close", None)
            if close is not None:
                close()
            self._last_metrics = rec.finish()
            self._leave()

    def _call(self, work: Callable[[Context, MetricsRecorder], _R], ctx: Context | None) -> _R:
        ctx = ctx or Context.background()
        self._check_open()
        self._last_err = None
        rec = MetricsRecorder()
        try:
            self._enter(ctx)
            try:
                result = work(ctx, rec)
            finally:
                self._last_metrics = rec.finish()
                self._leave()
        except BaseException as exc:
            self._last_err = exc
            raise
        return result


def _aiter_thread(
    start: Callable[[Context], Iterator[Token]], ctx: Context | None
) -> AsyncIterator[Token]:
    """Run a blocking token stream in a worker thread, feeding an asyncio queue.

    When the consumer stops (break, ``aclose()``, task cancelled, or the iterator is
    dropped), the worker's context is cancelled, so the engine stops at its next token
    and frees its slot, even if the event loop never runs again to finalise the stream.
    """
    inner = (ctx or Context.background()).with_cancel()
    return _ThreadStream(_pump(start, inner), inner)


class _ThreadStream:
    """The async iterator ``agenerate``/``achat`` return.

    Python finalises an abandoned async generator only when its event loop next runs;
    this wrapper cancels the worker at once when it is dropped, as a sync generator is
    closed at once when a ``for`` loop breaks out of it.
    """

    __slots__ = ("_agen", "_inner")

    def __init__(self, agen: AsyncGenerator[Token, None], inner: Context) -> None:
        self._agen = agen
        self._inner = inner

    def __aiter__(self) -> _ThreadStream:
        return self

    def __anext__(self) -> Awaitable[Token]:
        return self._agen.__anext__()

    async def aclose(self) -> None:
        """Stop the stream and its worker."""
        self._inner.cancel()
        await self._agen.aclose()

    def __del__(self) -> None:
        inner = getattr(self, "_inner", None)
        if inner is not None:
            inner.cancel()


async def _pump(
    start: Callable[[Context], Iterator[Token]], inner: Context
) -> AsyncGenerator[Token, None]:
    import asyncio

    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Any] = asyncio.Queue()

    def put(item: Any) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the loop is gone; nobody is listening
            inner.cancel()

    def work() -> None:
        try:
            for tok in start(inner):
                put(tok)
                # The caller's context ended (say why, as generate does) or the consumer
                # left (nobody reads it): either way stop here, not at the next token.
                inner.raise_if_done()
        except BaseException as exc:
            put(_Failure(exc))
        else:
            put(_END)

    worker = threading.Thread(target=work, name="core-inference-stream", daemon=True)
    worker.start()
    try:
        while True:
            item = await queue.get()
            if item is _END:
                return
            if isinstance(item, _Failure):
                raise item.exc
            yield item
    finally:
        inner.cancel()


class _Failure:
    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc
