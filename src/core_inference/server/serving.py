"""Completions and chat completions over any loaded model: admission, choices, responses, SSE.

The model is reached only through the contract (``agenerate``/``achat`` and the result
each stream carries), so every backend is served the same way: finish reasons and
usage come from each call's own ``TokenStream`` result, never from the model's
"last call" state that concurrent requests would share.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import ContextLengthExceeded, InferenceError, ModelClosed
from ..protocols import TextModel
from ..results import AsyncTokenStream
from ..types import Message, Token
from .logprobs import Scored, chat_format, completion_format, score
from .metrics import ServerMetrics
from .protocol import ChatRequest, CompletionRequest, ProtocolError, Sampling, error_body, finish_reason


class Admission:
    """At most ``slots`` choices run at once; up to ``queue`` requests wait, in order; past that, 429.

    A request holding ``n`` choices takes ``n`` slots, so the model (loaded with as many
    parallel slots) never queues a request of its own: the wait is here, where it is
    bounded, visible in ``/metrics`` and cancellable when the client leaves.
    """

    def __init__(self, slots: int, queue: int, metrics: ServerMetrics) -> None:
        self.slots = slots
        self.queue = queue
        self.free = slots
        self.metrics = metrics
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    async def acquire(self, weight: int) -> Lease:
        """Wait for ``weight`` slots; ``ProtocolError`` 429 when the queue is full."""
        if weight > self.slots:
            raise ProtocolError(f"n: this server runs at most {self.slots} choices at once, "
                                f"the request asks for {weight}", "n")
        if not self._waiters and self.free >= weight:
            self.free -= weight
        else:
            if len(self._waiters) >= self.queue:
                raise ProtocolError(
                    f"the server is busy: {self.slots} slots in use and {len(self._waiters)} requests "
                    "waiting; retry later", status=429, type="server_busy", code="rate_limit_exceeded")
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            entry = (weight, fut)
            self._waiters.append(entry)
            self.metrics.waiting += 1
            try:
                await fut
            except BaseException:
                if fut.done() and not fut.cancelled():  # granted just as we were cancelled
                    self._give(weight)
                else:
                    self._waiters.remove(entry)
                    self._wake()  # a smaller request behind us may fit now
                raise
            finally:
                self.metrics.waiting -= 1
        self.metrics.running += 1
        return Lease(self, weight)

    def _give(self, weight: int) -> None:
        self.free += weight
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self._waiters[0][0] <= self.free:
            weight, fut = self._waiters.popleft()
            self.free -= weight
            fut.set_result(None)

    @property
    def in_use(self) -> int:
        """Slots held now."""
        return self.slots - self.free


class Lease:
    """Slots held by one request; ``release`` is idempotent."""

    def __init__(self, admission: Admission, weight: int) -> None:
        self._admission: Admission | None = admission
        self.weight = weight

    def release(self) -> None:
        """Give the slots back (once)."""
        admission, self._admission = self._admission, None
        if admission is not None:
            admission.metrics.running -= 1
            admission._give(self.weight)


@dataclass
class Served:
    """The served model and how the server runs it."""

    model: TextModel
    name: str
    metrics: ServerMetrics
    admission: Admission
    chat_max_tokens: int = 256
    created: int = field(default_factory=lambda: int(time.time()))
    vocab_size: int = 0  # 0: unknown

    def __post_init__(self) -> None:
        if not self.vocab_size:
            try:
                self.vocab_size = self.model.info().vocab_size
            except Exception:  # a model that cannot describe itself: ids are not checked here
                self.vocab_size = 0

    def model_card(self) -> dict[str, Any]:
        """The model's entry in ``/v1/models``."""
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "core-inference",
                "max_model_len": self.model.context_len or None}

    def check_model(self, sampling: Sampling) -> None:
        """A request naming another model is a 404, as OpenAI and vLLM answer."""
        self.check_model_name(sampling.model)

    def check_model_name(self, name: str | None) -> None:
        """``model`` must be the served one (or absent)."""
        if name is not None and name != self.name:
            raise ProtocolError(f"model: the model {name!r} does not exist; this server serves "
                                f"{self.name!r}", "model", status=404, code="model_not_found")


class Choice:
    """One choice of a request: its token stream, primed with its first token."""

    def __init__(self, index: int, prompt: int, stream: AsyncTokenStream) -> None:
        self.index = index
        self.prompt = prompt  # which prompt it answers (completions take several)
        self.stream = stream
        self.first: Token | None = None
        self.got: list[Token] = []  # what it has yielded so far

    async def prime(self) -> None:
        """Wait for the first token (or the end), so errors before it become HTTP statuses."""
        try:
            self.first = await self.stream.__anext__()
        except StopAsyncIteration:
            self.first = None

    async def tokens(self) -> AsyncIterator[Token]:
        """The tokens, the primed one first."""
        if self.first is not None:
            yield self.first
            async for token in self.stream:
                yield token

    async def scored(self, job: Job) -> AsyncIterator[tuple[Token, Scored | None]]:
        """The tokens, each scored as it comes when the request asks for logprobs."""
        async for token in self.tokens():
            entry = None
            if job.logprobs is not None:
                (entry,) = await score(job.served.model, job.bases[self.prompt], [token], job.logprobs,
                                       before=self.got)
            self.got.append(token)
            yield token, entry

    @property
    def finish_reason(self) -> str | None:
        return finish_reason(self.stream.finish_reason)

    @property
    def completion_tokens(self) -> int:
        return self.stream.metrics.generated_tokens


class Job:
    """A running request: its choices and its lease; ``close`` stops what runs and frees the slots."""

    def __init__(self, served: Served, lease: Lease, arrived: float, kind: str,
                 logprobs: int | None = None, bases: Sequence[str] = ()) -> None:
        self.served = served
        self.lease = lease
        self.arrived = arrived
        self.kind = kind
        self.logprobs = logprobs  # alternatives per token when logprobs are asked for
        self.return_ids = False  # vLLM's return_token_ids
        self.bases = list(bases)  # each prompt's text, which the logprobs' prefixes begin with
        self._names: dict[int, str] = {}
        self.choices: list[Choice] = []
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.finished = False
        self._closed = False

    async def close(self) -> None:
        """Stop every unfinished choice (its engine stops at the next token), count tokens, free slots."""
        if self._closed:
            return
        self._closed = True
        try:
            for choice in self.choices:
                if not choice.stream.done:
                    await choice.stream.aclose()
            for choice in self.choices:
                await _ended(choice.stream)
            if not self.finished and self.choices:
                self.served.metrics.disconnect()
            for choice in self.choices:
                self.served.metrics.tokens(choice.stream.prompt_tokens, choice.completion_tokens)
        finally:
            self.lease.release()

    def token_name(self, token_id: int) -> str:
        """A token id's text (for the alternatives in logprobs)."""
        name = self._names.get(token_id)
        if name is None:
            name = self._names[token_id] = self.served.model.detokenize([token_id])
        return name

    def logprobs_json(self, items: Sequence[Scored], offset: int = 0) -> dict[str, Any] | None:
        """The ``logprobs`` field of a choice or chunk for ``items`` (None when not asked for)."""
        if self.logprobs is None:
            return None
        if self.kind == "chat":
            return chat_format(items, self.token_name)
        return completion_format(items, self.token_name, offset)

    def usage(self) -> dict[str, int]:
        """OpenAI's usage: each prompt's tokens once (n choices share it), every choice's tokens."""
        prompts: dict[int, int] = {}
        for c in self.choices:
            prompts[c.prompt] = max(prompts.get(c.prompt, 0), c.stream.prompt_tokens)
        prompt = sum(prompts.values())
        completion = sum(c.completion_tokens for c in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _ended(stream: AsyncTokenStream, timeout: float = 60.0) -> None:
    """Wait until a closed stream's engine has stopped (a sync engine stops in its worker
    thread at its next token), so its counts are final and its slot is free again."""
    deadline = time.monotonic() + timeout
    while not stream.done and time.monotonic() < deadline:
        await asyncio.sleep(0.005)


# -- starting a request ---------------------------------------------------------------------


def error_for(exc: BaseException, param: str) -> ProtocolError:
    """The HTTP error for an exception raised before the first token."""
    if isinstance(exc, ProtocolError):
        return exc
    if isinstance(exc, ContextLengthExceeded):
        return ProtocolError(str(exc), param, code="context_length_exceeded")
    if isinstance(exc, ModelClosed):
        return ProtocolError("the server is shutting down", status=503, type="server_error")
    if isinstance(exc, (ValueError, TypeError)):
        text = str(exc)
        return ProtocolError(text, text.split(":", 1)[0] if ":" in text[:40] else param)
    if isinstance(exc, InferenceError):
        return ProtocolError(str(exc), status=500, type="server_error")
    return ProtocolError(f"{type(exc).__name__}: {exc}", status=500, type="server_error")


async def start(served: Served, kind: str, payloads: Sequence[Any], sampling: Sampling,
                arrived: float) -> Job:
    """Admit the request, open its choices and wait for each one's first token.

    Anything that fails before the first token (a prompt too long for the context, a
    conversation the chat template refuses) is raised as a ``ProtocolError``; the slots
    are freed on every way out.
    """
    served.check_model(sampling)
    model = served.model
    param = "messages" if kind == "chat" else "prompt"
    bases: list[str] = []
    weight = len(payloads) * sampling.n
    if sampling.return_token_ids and not model.capabilities.token_ids:
        raise ProtocolError("return_token_ids: this model's backend gives no token ids", "return_token_ids")
    if sampling.logprobs is not None:
        if not model.capabilities.logits:
            raise ProtocolError("logprobs: this model's backend gives no logits", "logprobs")
        try:
            bases = [model.chat_prompt(p) if kind == "chat" else p for p in payloads]
        except Exception as exc:
            raise error_for(exc, param) from exc
        if sampling.stream:
            weight *= 2  # a stream scores each token while it holds its own slot
    lease = await served.admission.acquire(weight)
    job = Job(served, lease, arrived, kind, sampling.logprobs, bases)
    job.return_ids = sampling.return_token_ids
    try:
        for p, payload in enumerate(payloads):
            for j in range(sampling.n):
                cfg = sampling.config_for(j)
                stream = model.achat(payload, cfg) if kind == "chat" else model.agenerate(payload, cfg)
                job.choices.append(Choice(len(job.choices), p, stream))
        results = await asyncio.gather(*(c.prime() for c in job.choices), return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r
        served.metrics.first_token(time.monotonic() - arrived)
    except BaseException as exc:
        job.finished = True  # not a disconnect: the request failed (or its task was cancelled)
        await job.close()
        if isinstance(exc, Exception):
            raise error_for(exc, param) from exc
        raise
    return job


async def start_completion(served: Served, req: CompletionRequest, arrived: float) -> Job:
    """Start a ``/v1/completions`` request."""
    return await start(served, "generate", req.prompts, req.sampling, arrived)


async def start_chat(served: Served, req: ChatRequest, arrived: float) -> Job:
    """Start a ``/v1/chat/completions`` request."""
    messages: list[Message] = list(req.messages)
    return await start(served, "chat", [messages], req.sampling, arrived)


# -- answers ----------------------------------------------------------------------------------


async def answer(job: Job, echo_prompts: Sequence[str] = ()) -> dict[str, Any]:
    """Run every choice to its end and build the whole (non-streaming) response."""
    try:
        async def drain(choice: Choice) -> None:
            async for token in choice.tokens():
                choice.got.append(token)

        results = await asyncio.gather(*(drain(c) for c in job.choices), return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise error_for(r, "prompt") from r
        scored: list[list[Scored]] = [[] for _ in job.choices]
        if job.logprobs is not None:  # the streams have ended and freed their slots: score in batches
            for i, c in enumerate(job.choices):
                scored[i] = await score(job.served.model, job.bases[c.prompt], c.got, job.logprobs)
        job.finished = True
    finally:
        await job.close()
    choices = []
    for c, items in zip(job.choices, scored, strict=True):
        text = "".join(t.text for t in c.got)
        if job.kind == "chat":
            choice: dict[str, Any] = {"index": c.index, "message": {"role": "assistant", "content": text},
                                      "logprobs": job.logprobs_json(items), "finish_reason": c.finish_reason}
        else:
            echo = echo_prompts[c.prompt] if echo_prompts else ""
            choice = {"index": c.index, "text": echo + text, "finish_reason": c.finish_reason,
                      "logprobs": job.logprobs_json(items, len(echo))}
        if job.return_ids:
            choice["token_ids"] = [t.id for t in c.got]
        choices.append(choice)
    return {
        "id": job.id,
        "object": "chat.completion" if job.kind == "chat" else "text_completion",
        "created": job.created,
        "model": job.served.name,
        "choices": choices,
        "usage": job.usage(),
    }


def sse(data: dict[str, Any] | str) -> bytes:
    """One server-sent event."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return b"data: " + text.encode("utf-8") + b"\n\n"


_END = object()


async def events(job: Job, include_usage: bool, echo_prompts: Sequence[str] = ()) -> AsyncIterator[bytes]:
    """The streaming response: one chunk per token, a last chunk per choice with its finish
    reason, the usage chunk when asked for, then ``[DONE]``.

    Closing this generator (the client left: the response task is cancelled at its next
    await) closes every choice's stream, so each engine stops at its next token.
    """
    chat = job.kind == "chat"
    obj = "chat.completion.chunk" if chat else "text_completion"
    usage_field: dict[str, Any] = {"usage": None} if include_usage else {}

    offsets = [len(echo_prompts[c.prompt]) if echo_prompts else 0 for c in job.choices]

    def chunk(index: int, text: str | None, reason: str | None, role: bool = False,
              entry: Scored | None = None, token: Token | None = None) -> bytes:
        logprobs = None
        if entry is not None:
            logprobs = job.logprobs_json([entry], offsets[index])
            offsets[index] += len(entry.token.text)
        if chat:
            delta: dict[str, Any] = {}
            if role:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            body: dict[str, Any] = {"index": index, "delta": delta, "logprobs": logprobs,
                                    "finish_reason": reason}
        else:
            body = {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": reason}
        if token is not None and job.return_ids:
            body["token_ids"] = [token.id]
        return sse({"id": job.id, "object": obj, "created": job.created, "model": job.served.name,
                    "choices": [body], **usage_field})

    try:
        for c in job.choices:
            if chat:
                yield chunk(c.index, "", None, role=True)
            elif echo_prompts:
                yield chunk(c.index, echo_prompts[c.prompt], None)
        if len(job.choices) == 1:
            only = job.choices[0]
            async for token, entry in only.scored(job):
                if token.text or entry is not None or job.return_ids:
                    yield chunk(only.index, token.text, None, entry=entry, token=token)
            yield chunk(only.index, None if chat else "", only.finish_reason)
        else:
            async for index, item in _merged(job):
                if item is _END:
                    yield chunk(index, None if chat else "", job.choices[index].finish_reason)
                elif isinstance(item, tuple):
                    token, entry = item
                    if token.text or entry is not None or job.return_ids:
                        yield chunk(index, token.text, None, entry=entry, token=token)
        job.finished = True
        if include_usage:
            yield sse({"id": job.id, "object": obj, "created": job.created, "model": job.served.name,
                       "choices": [], "usage": job.usage()})
    except (InferenceError, ValueError, TypeError) as exc:  # the engine failed mid-stream
        job.finished = True
        err = error_for(exc, "prompt")
        yield sse({"error": err.body()["error"] | {"code": err.code or err.status}})
    finally:
        await job.close()
    yield sse("[DONE]")


async def _merged(job: Job) -> AsyncIterator[tuple[int, object]]:
    """(token, scored) of several choices as they come, each choice's end marked by ``_END``."""
    queue: asyncio.Queue[tuple[int, object]] = asyncio.Queue()
    choices = job.choices

    async def pump(c: Choice) -> None:
        try:
            async for pair in c.scored(job):
                await queue.put((c.index, pair))
        except BaseException as exc:
            await queue.put((c.index, exc))
            raise
        await queue.put((c.index, _END))

    tasks = [asyncio.create_task(pump(c)) for c in choices]
    try:
        left = len(choices)
        while left:
            index, item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            if item is _END:
                left -= 1
            yield index, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


__all__ = ["Admission", "Job", "Served", "answer", "error_body", "events", "start_chat", "start_completion"]
