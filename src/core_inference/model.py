"""``BaseModel``: the contract's machinery written once, so a backend writes only its engine calls.

A backend subclasses ``BaseModel`` and implements its raw stream once, either sync
(``_engine_generate``, a generator of ``(token id, bytes)``) or async
(``_aengine_generate``, an async generator of the same), plus ``_close_engine`` and, where
the engine can, ``_render_chat``, ``_tokenize``/``_detokenize``, ``_classify`` and
``_batch_generate``. Options, validation, slots, cancellation, stop handling, metrics,
the result per call, ``err()``, the other of sync/async, and closing all live here.
"""

from __future__ import annotations

import atexit
import sys
import threading
import warnings
import weakref
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import suppress
from typing import Any, TypeVar

from .aio import AsyncBridge, EngineLoop, SyncBridge, pump_thread
from .context import Context
from .errors import Cancelled, EngineError, InferenceError, ModelClosed
from .options import apply_generate_opts
from .results import AsyncTokenStream, CallResult, TokenStream, finish_reason_for
from .streaming import (
    MetricsRecorder,
    Piece,
    SlotQueue,
    SlotTicket,
    TokenFinisher,
    afinish_tokens,
    finish_tokens,
)
from .types import (
    BatchResult,
    Capabilities,
    ClassifyResult,
    GenerateConfig,
    GenerateMetrics,
    Message,
    ModelInfo,
)

MessageLike = Message | Mapping[str, Any]
_R = TypeVar("_R")
_M = TypeVar("_M", bound="BaseModel")
_BACKGROUND = Context.background()


def to_messages(messages: Sequence[MessageLike]) -> list[Message]:
    """Validate a conversation: a non-empty list of ``Message`` or role/content mappings."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise TypeError("messages: expected a list of Message or {'role', 'content'} mappings")
    if not messages:
        raise ValueError("messages: the conversation is empty")
    out = []
    for i, m in enumerate(messages):
        if isinstance(m, Message):
            out.append(m)
        elif isinstance(m, Mapping):
            out.append(Message.from_dict(m))
        else:
            raise TypeError(
                f"messages[{i}]: expected a Message or a {{'role', 'content'}} mapping, "
                f"got {type(m).__name__}"
            )
    return out


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


class _Last:
    """A thread's last call, for ``model.err()`` and ``model.metrics()``."""

    __slots__ = ("err", "metrics")

    def __init__(self) -> None:
        self.err: BaseException | None = None
        self.metrics = GenerateMetrics()


_open_models: weakref.WeakSet[BaseModel] = weakref.WeakSet()


def _close_open_models() -> None:
    """At exit, free the models nobody closed, while their engines' threads still run.

    Left to the interpreter's last teardown, an engine's own finalizers find its modules
    half gone: vLLM's ``AsyncLLM.__del__`` raised ``TypeError: 'NoneType' object is not
    callable``, and MLX arrays aborted the process (exit status 134).
    """
    for model in list(_open_models):
        with suppress(Exception):  # one engine failing to free must not keep the others
            model._drop()


def close_open_models_first_at_exit() -> None:
    """Move the exit hook that frees unclosed models behind every hook registered so far.

    Called when a model is made and again once it is loaded: ``atexit`` runs hooks
    last-registered first, so the models are freed before the hooks that their engines
    registered while loading take the engines down.
    """
    atexit.unregister(_close_open_models)
    atexit.register(_close_open_models)


class BaseModel:
    """Shared implementation of the ``TextModel`` contract."""

    model_type: str = ""
    context_len: int = 0  # the loaded context in tokens (0 where unknown)

    def __init__(self, parallel_slots: int = 1) -> None:
        self._slots = SlotQueue(parallel_slots)
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._active = 0
        self._freed = False
        self._tls = threading.local()
        self._loop: EngineLoop | None = None
        _open_models.add(self)
        close_open_models_first_at_exit()  # again once loaded (BaseBackend.load_model)

    # -- what a backend implements -------------------------------------------------

    def _engine_generate(
        self, prompt: str, cfg: GenerateConfig, ctx: Context, rec: MetricsRecorder
    ) -> Iterator[Piece]:
        """Raw (token id, bytes) stream for a prompt; checks ``ctx`` between prefill chunks."""
        raise NotImplementedError

    def _aengine_generate(
        self, prompt: str, cfg: GenerateConfig, ctx: Context, rec: MetricsRecorder
    ) -> AsyncIterator[Piece]:
        """The same as an async generator, for engines that are async (runs on ``engine_loop``)."""
        raise NotImplementedError

    def _prepare_chat(self, messages: list[Message]) -> Any:
        """What ``_engine_chat`` takes, built at the call so that a bad conversation fails there.

        By default the prompt text of the model's chat template; a backend whose engine
        takes the messages themselves (a chat endpoint) returns them.
        """
        return self.chat_prompt(messages)

    def _engine_chat(
        self, prepared: Any, cfg: GenerateConfig, ctx: Context, rec: MetricsRecorder
    ) -> Iterator[Piece]:
        """Raw stream for a conversation; by default its chat prompt through generate."""
        return self._engine_generate(prepared, cfg, ctx, rec)

    def _aengine_chat(
        self, prepared: Any, cfg: GenerateConfig, ctx: Context, rec: MetricsRecorder
    ) -> AsyncIterator[Piece]:
        """``_engine_chat`` for async engines."""
        return self._aengine_generate(prepared, cfg, ctx, rec)

    def _render_chat(self, messages: list[Message]) -> str:
        """The prompt text of the model's chat template for ``messages``."""
        raise NotImplementedError(f"{type(self).__name__} has no chat template")

    def _tokenize(self, text: str) -> list[int]:
        raise NotImplementedError(f"{type(self).__name__} cannot tokenize")

    def _detokenize(self, ids: Sequence[int]) -> str:
        raise NotImplementedError(f"{type(self).__name__} cannot detokenize")

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
            fin = TokenFinisher(cfg, sub)
            raw: Iterator[Piece] | None = None
            try:
                raw = self._raw("generate", prompt, cfg, ctx, sub)
                tokens = tuple(finish_tokens(raw, cfg, ctx, sub, self._closed, fin))
                results.append(BatchResult(tokens, None, fin.finish_reason or "", fin.stop,
                                           sub.prompt_tokens, sub.finish()))
            except Exception as exc:  # one bad prompt does not sink the batch
                if ctx.err() is not None or self._closed.is_set():
                    raise  # ... but a cancelled call or a closed model does
                results.append(BatchResult(err=self._mapped(exc), finish_reason="error",
                                           prompt_tokens=sub.prompt_tokens, metrics=sub.finish()))
            finally:
                _close(raw)
                rec.prompt_tokens += sub.prompt_tokens
                rec.generated_tokens += sub.generated_tokens
                rec.first_token = rec.first_token or sub.first_token
        return results

    def _close_engine(self) -> None:
        """Free the engine's memory. Called once, when no call is running."""

    def _map_engine_error(self, exc: Exception) -> InferenceError:
        """The contract error for an engine's own exception (the one place a backend maps them).

        Contract errors, ``ValueError`` and ``TypeError`` (a caller's mistake) pass as
        they are; this sees everything else. The default is ``EngineError``.
        """
        return EngineError(f"{type(self).__name__}: {type(exc).__name__}: {exc}")

    def _describe(self) -> ModelInfo:
        """What the model is, from its own files."""
        return ModelInfo(architecture=self.model_type)

    @property
    def capabilities(self) -> Capabilities:
        """What this model can do; backends override what differs from what they implement."""
        impl = type(self)
        return Capabilities(
            token_ids=True,
            logits=impl._classify is not BaseModel._classify,
            classify="native" if impl._classify is not BaseModel._classify else "",
            batch_generate="native" if impl._batch_generate is not BaseModel._batch_generate else "fallback",
            chat_template=impl._render_chat is not BaseModel._render_chat
            or impl._engine_chat is not BaseModel._engine_chat,
            tokenize=impl._tokenize is not BaseModel._tokenize,
            parallel_slots=self._slots.size,
            async_engine=self._is_async,
        )

    @property
    def _is_async(self) -> bool:
        return type(self)._aengine_generate is not BaseModel._aengine_generate

    # -- the contract --------------------------------------------------------------

    def generate(self, prompt: str, *opts: Any, ctx: Context | None = None, **kw: Any) -> TokenStream:
        """Stream tokens for ``prompt``; options as ``with_x(...)`` or keywords."""
        cfg = apply_generate_opts(opts, **kw)
        prompt = _check_prompt(prompt)
        self._check_open()
        return self._open("generate", prompt, cfg, ctx)

    def chat(
        self, messages: Sequence[MessageLike], *opts: Any, ctx: Context | None = None, **kw: Any
    ) -> TokenStream:
        """Stream the assistant's reply to a conversation, through the model's chat template."""
        cfg = apply_generate_opts(opts, **kw)
        msgs = to_messages(messages)
        self._check_open()
        return self._open("chat", self._prepare_chat(msgs), cfg, ctx)

    def agenerate(
        self, prompt: str, *opts: Any, ctx: Context | None = None, **kw: Any
    ) -> AsyncTokenStream:
        """``generate`` as an async iterator that never blocks the event loop."""
        cfg = apply_generate_opts(opts, **kw)
        prompt = _check_prompt(prompt)
        self._check_open()
        return self._aopen("generate", prompt, cfg, ctx)

    def achat(
        self, messages: Sequence[MessageLike], *opts: Any, ctx: Context | None = None, **kw: Any
    ) -> AsyncTokenStream:
        """``chat`` as an async iterator that never blocks the event loop."""
        cfg = apply_generate_opts(opts, **kw)
        msgs = to_messages(messages)
        self._check_open()
        return self._aopen("chat", self._prepare_chat(msgs), cfg, ctx)

    def chat_prompt(self, messages: Sequence[MessageLike]) -> str:
        """The prompt text the model's chat template builds for ``messages``.

        It begins with the model's BOS text where the template writes one, and
        ``generate`` adds no second BOS to a prompt that already begins with it, so
        ``generate(model.chat_prompt(msgs))`` prefills what ``chat(msgs)`` does.
        """
        msgs = to_messages(messages)
        self._check_open()
        return self._render_chat(msgs)

    def tokenize(self, text: str) -> list[int]:
        """The token ids ``generate(text)`` would prefill (BOS included where it adds one)."""
        _check_prompt(text)
        self._check_open()
        return self._tokenize(text)

    def detokenize(self, ids: Sequence[int]) -> str:
        """The text of a sequence of token ids (control tokens render as nothing).

        An id outside the model's vocabulary is a ``ValueError`` naming it, on every backend
        (engines differ: llama.cpp aborts the process, tokenizers return "" or overflow).
        """
        if isinstance(ids, (str, bytes)) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in ids
        ):
            raise TypeError("ids: expected a sequence of int")
        self._check_open()
        vocab = self._describe().vocab_size  # 0 where the backend cannot know: negatives only
        for n, i in enumerate(ids):
            if i < 0 or (vocab > 0 and i >= vocab):
                known = f"0 to {vocab - 1}" if vocab > 0 else "0 and up"
                raise ValueError(f"ids[{n}]: {i} is not a token id of this model (ids run from {known})")
        return self._detokenize(ids)

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

    def info(self) -> ModelInfo:
        """What the model is: architecture, sizes, trained context length, quantisation."""
        self._check_open()
        return self._describe()

    def metrics(self) -> GenerateMetrics:
        """Counts and timings of the calling thread's last finished call."""
        return self._last().metrics

    def err(self) -> BaseException | None:
        """The error that ended the calling thread's last call, or None (the seed's ``Err``)."""
        return self._last().err

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
        self._drop()

    def _drop(self) -> None:
        """Close a model nobody closed, with a ``ResourceWarning`` (as an unclosed file gives).

        ``close()``, not ``_free()``: at exit a daemon thread may still be inside a call, and
        the engine must outlive it (from ``__del__`` no call is left, so the two agree).
        """
        closed = getattr(self, "_closed", None)
        if closed is not None and not closed.is_set():
            if not sys.is_finalizing():  # the warnings machinery may be torn down by then
                warnings.warn(
                    f"{type(self).__name__} was not closed; call close() or use 'with'",
                    ResourceWarning,
                    stacklevel=3,
                )
            self.close()

    # -- for backends --------------------------------------------------------------

    def engine_loop(self) -> EngineLoop:
        """The event loop an async engine runs on (one thread per model, made on first use)."""
        with self._lock:
            if self._loop is None:
                self._loop = EngineLoop(f"core-inference {type(self).__name__} loop")
            return self._loop

    # -- machinery -----------------------------------------------------------------

    def _last(self) -> _Last:
        last: _Last | None = getattr(self._tls, "last", None)
        if last is None:
            last = self._tls.last = _Last()
        return last

    def _check_open(self) -> None:
        if self._closed.is_set():
            raise ModelClosed("the model is closed")

    def _free(self) -> None:
        with self._lock:
            if self._freed:
                return
            self._freed = True
        try:
            self._close_engine()
        finally:
            if self._loop is not None:
                self._loop.stop()

    def _enter(self, ctx: Context, ticket: SlotTicket) -> None:
        """Count the call in and take a slot, each written in ``ticket`` as it happens."""
        with self._lock:
            self._active += 1
            ticket.active = True
        self._slots.acquire(ctx, self._closed, ticket)
        if self._closed.is_set():
            raise ModelClosed("the model is closed")

    async def _aenter(self, ctx: Context, ticket: SlotTicket) -> None:
        with self._lock:
            self._active += 1
            ticket.active = True
        await self._slots.aacquire(ctx, self._closed, ticket)
        if self._closed.is_set():
            raise ModelClosed("the model is closed")

    def _leave(self, ticket: SlotTicket) -> None:
        """Give back what ``ticket`` shows the call took; the engine is freed after the last
        call of a closed model."""
        holder, ticket.holder = ticket.holder, None
        if holder is not None:
            self._slots.release(holder)
        with self._lock:
            if not ticket.active:
                return
            ticket.active = False
            self._active -= 1
            free_now = self._active == 0 and self._closed.is_set()
        if free_now:
            self._free()

    def _mapped(self, exc: BaseException) -> BaseException:
        if isinstance(exc, (InferenceError, ValueError, TypeError)) or not isinstance(exc, Exception):
            return exc
        mapped = self._map_engine_error(exc)
        mapped.__cause__ = exc
        return mapped

    def _raw(self, kind: str, payload: Any, cfg: GenerateConfig, ctx: Context,
             rec: MetricsRecorder) -> Iterator[Piece]:
        """The engine's raw stream as a sync iterator, whichever kind of engine it is."""
        if self._is_async:
            return SyncBridge(self.engine_loop(), self._araw(kind, payload, cfg, ctx, rec), ctx, self._closed)
        if kind == "chat":
            return self._engine_chat(payload, cfg, ctx, rec)
        return self._engine_generate(payload, cfg, ctx, rec)

    def _araw(self, kind: str, payload: Any, cfg: GenerateConfig, ctx: Context,
              rec: MetricsRecorder) -> AsyncIterator[Piece]:
        if kind == "chat":
            return self._aengine_chat(payload, cfg, ctx, rec)
        return self._aengine_generate(payload, cfg, ctx, rec)

    def _open(self, kind: str, payload: Any, cfg: GenerateConfig, ctx: Context | None) -> TokenStream:
        result = CallResult()
        return TokenStream(self._run(kind, payload, cfg, ctx or _BACKGROUND, result, self._last()), result)

    def _run(self, kind: str, payload: Any, cfg: GenerateConfig, ctx: Context,
             result: CallResult, owner: _Last) -> Iterator[Any]:
        """The stream generator: waits for a slot on first ``next()``, frees it at the end."""
        owner.err = None
        # one try from the first line: a Ctrl-C may land anywhere, and the slot is given back
        ticket = SlotTicket()
        rec: MetricsRecorder | None = None
        fin: TokenFinisher | None = None
        raw: Iterator[Piece] | None = None
        failure: BaseException | None = None
        try:
            self._enter(ctx, ticket)
            rec = MetricsRecorder()
            fin = TokenFinisher(cfg, rec)
            raw = self._raw(kind, payload, cfg, ctx, rec)
            yield from finish_tokens(raw, cfg, ctx, rec, self._closed, fin)
        except GeneratorExit:
            raise
        except BaseException as exc:
            failure = self._mapped(exc)
            if failure is not exc:
                raise failure from exc
            raise
        finally:
            _close(raw)
            self._ended(result, owner, rec, failure, fin)
            self._leave(ticket)

    def _ended(self, result: CallResult, owner: _Last, rec: MetricsRecorder | None,
               failure: BaseException | None, fin: TokenFinisher | None = None) -> None:
        """Record a call's end in its result and in its thread's ``err()``/``metrics()``."""
        if failure is not None:
            result.finish_reason = finish_reason_for(failure)
            result.err = owner.err = failure
        else:
            result.finish_reason = (fin.finish_reason if fin is not None else None) or "cancelled"
        if fin is not None:
            result.stop = fin.stop
        if rec is not None:
            result.metrics = owner.metrics = rec.finish()
            result.prompt_tokens = rec.prompt_tokens

    def _aopen(self, kind: str, payload: Any, cfg: GenerateConfig, ctx: Context | None) -> AsyncTokenStream:
        result = CallResult()
        owner = self._last()
        inner = (ctx or _BACKGROUND).with_cancel()
        if self._is_async:
            native = self._arun(kind, payload, cfg, inner, result, owner)
            return AsyncTokenStream(native, result, inner.cancel)
        # A sync engine: one worker thread per stream runs the sync path, result and all.
        left = threading.Event()

        def consumer_left() -> None:
            left.set()
            inner.cancel()

        def start() -> Iterator[Any]:
            try:
                yield from self._run(kind, payload, cfg, inner, result, owner)
            except Cancelled:
                if left.is_set():  # our own cancel, because nobody reads any more
                    _forget(result, owner)
                    return
                raise

        async def agen() -> AsyncIterator[Any]:
            import asyncio

            try:
                async for tok in pump_thread(start, inner, consumer_left):
                    yield tok
            except (GeneratorExit, asyncio.CancelledError):
                raise
            except BaseException as exc:
                if result.err is None:  # the caller's context ended between two tokens
                    result.err = owner.err = exc
                    result.finish_reason = finish_reason_for(exc)
                raise

        def on_drop() -> None:
            if not result.finish_reason:
                consumer_left()

        return AsyncTokenStream(agen(), result, on_drop)

    async def _arun(self, kind: str, payload: Any, cfg: GenerateConfig, ctx: Context,
                    result: CallResult, owner: _Last) -> AsyncIterator[Any]:
        """The async stream for an async engine, read through its loop one piece at a time."""
        import asyncio

        owner.err = None
        ticket = SlotTicket()
        rec: MetricsRecorder | None = None
        fin: TokenFinisher | None = None
        bridge: AsyncBridge[Piece] | None = None
        failure: BaseException | None = None
        try:
            await self._aenter(ctx, ticket)
            rec = MetricsRecorder()
            fin = TokenFinisher(cfg, rec)
            raw = self._araw(kind, payload, cfg, ctx, rec)
            bridge = AsyncBridge(self.engine_loop(), raw, ctx, self._closed)
            async for tok in afinish_tokens(bridge, cfg, ctx, rec, self._closed, fin):
                yield tok
        except (GeneratorExit, asyncio.CancelledError):
            raise
        except BaseException as exc:
            failure = self._mapped(exc)
            if failure is not exc:
                raise failure from exc
            raise
        finally:
            if bridge is not None:
                bridge.close()
            self._ended(result, owner, rec, failure, fin)
            self._leave(ticket)

    def _call(self, work: Callable[[Context, MetricsRecorder], _R], ctx: Context | None) -> _R:
        ctx = ctx or _BACKGROUND
        self._check_open()
        owner = self._last()
        owner.err = None
        rec = MetricsRecorder()
        ticket = SlotTicket()
        try:
            try:
                self._enter(ctx, ticket)
                return work(ctx, rec)
            finally:
                if ticket.holder is not None:
                    owner.metrics = rec.finish()
                self._leave(ticket)
        except BaseException as exc:
            failure = self._mapped(exc)
            owner.err = failure
            if failure is not exc:
                raise failure from exc
            raise


def _close(raw: object) -> None:
    close = getattr(raw, "close", None)
    if close is not None:
        close()


def _forget(result: CallResult, owner: _Last) -> None:
    """A stream the consumer left: cancelled, but no error of the caller's."""
    if owner.err is result.err:
        owner.err = None
    result.err = None
    result.finish_reason = "cancelled"
