"""``OpenAIModel``: a model served by a remote OpenAI-compatible server, as a contract model.

The raw stream is async (``_aengine_generate``/``_aengine_chat``): one SSE request per
call on the model's engine loop, read one chunk at a time, with no thread per token; the
base model gives the sync form, stops, UTF-8, slots, cancellation and the result per
call. Leaving a stream (break, cancel, deadline, close) closes its HTTP connection at
once, which is how vLLM and llama.cpp's servers learn to stop generating.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import time
from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from itertools import pairwise
from typing import Any
from urllib.parse import urlsplit

from ...context import Context
from ...errors import EngineError, InferenceError, ModelLoadError
from ...model import BaseModel
from ...openai_wire import (
    ID_MODES,
    IDS_FIELD,
    IDS_LOGPROBS,
    IDS_NONE,
    Delta,
    chat_body,
    completion_body,
    parse_chunk,
)
from ...streaming import MetricsRecorder, Piece, SlotQueue, TokenFinisher, afinish_tokens
from ...types import (
    BatchResult,
    Capabilities,
    ClassifyResult,
    GenerateConfig,
    LoadConfig,
    Message,
    ModelInfo,
    Token,
)
from .client import Remote, map_remote_error
from .errors import RemoteError, RemoteHTTPError

DEFAULT_SLOTS = 8  # concurrent requests per model: remote servers batch them
NO_ID = -1  # the id of a token from a server that gives text only (capabilities.token_ids is False)
DRAIN_CHUNKS = 8  # after the last token we asked for: chunks read for the usage that follows

# A server's tokenize routes, by flavour: (tokenize path, detokenize path, the detokenize
# answer's text field), all at the server's root, not under /v1.
_TOKENIZERS: dict[str, tuple[str, str, str]] = {
    "vllm": ("/tokenize", "/detokenize", "prompt"),  # vLLM, SGLang, core-inference serve
    "llama.cpp": ("/tokenize", "/detokenize", "content"),  # llama.cpp's llama-server
    "llama-cpp-python": ("/extras/tokenize", "/extras/detokenize", "text"),
}


@dataclass(frozen=True)
class RemoteOptions:
    """The ``openai`` backend's engine options, checked."""

    model: str | None = None
    api_key: str | None = None
    timeout: float = 600.0
    connect_timeout: float = 10.0
    retries: int = 2
    headers: Mapping[str, str] | None = None
    extra_body: Mapping[str, Any] | None = None
    token_ids: str = "auto"

    @classmethod
    def from_options(cls, opts: Mapping[str, Any]) -> RemoteOptions:
        out = cls(**opts)
        for name in ("model", "api_key"):
            value = getattr(out, name)
            if value is not None and not isinstance(value, str):
                raise TypeError(f"{name}: expected str, got {type(value).__name__}")
        for name in ("timeout", "connect_timeout"):
            value = getattr(out, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name}: expected a number of seconds > 0, got {value!r}")
        if isinstance(out.retries, bool) or not isinstance(out.retries, int) or out.retries < 0:
            raise ValueError(f"retries: expected an int >= 0, got {out.retries!r}")
        for name in ("headers", "extra_body"):
            value = getattr(out, name)
            if value is not None and not isinstance(value, Mapping):
                raise TypeError(f"{name}: expected a mapping, got {type(value).__name__}")
        if out.token_ids not in ("auto", *ID_MODES):
            raise ValueError(f"token_ids: expected one of auto, {', '.join(ID_MODES)}; got {out.token_ids!r}")
        return out


def base_url(url: str) -> str:
    """The API's base address: ``http://host:port`` alone means ``http://host:port/v1``."""
    parts = urlsplit(url)
    if not parts.netloc:
        raise ModelLoadError(f"{url}: not a server address (expected http://host:port/v1)", url)
    path = parts.path.rstrip("/")
    return f"{parts.scheme}://{parts.netloc}{path or '/v1'}"


@dataclass
class _Call:
    """One request's running state (what its chunks have said so far)."""

    carry: str = ""  # text that came in a chunk without ids, for the next token
    ids: list[int] = field(default_factory=list)  # every id streamed so far (for splitting text)
    emitted: int = 0
    finish: str | None = None
    completion_tokens: int | None = None


class OpenAIModel(BaseModel):
    """A model behind an OpenAI-compatible server (vLLM, SGLang, llama.cpp, ``core-inference serve``)."""

    model_type = "openai"

    def __init__(self, url: str, cfg: LoadConfig) -> None:
        self.options = RemoteOptions.from_options(cfg.engine_options)
        self.url = base_url(url)
        super().__init__(cfg.parallel_slots or DEFAULT_SLOTS)
        self._asked_slots = cfg.parallel_slots
        self._asked_ctx = cfg.context_len
        self.model_id = ""
        self.flavor = ""  # "vllm", "llama.cpp", "llama-cpp-python" or "" (from its tokenize route)
        self.id_mode = IDS_NONE
        self.context_len = cfg.context_len
        self._vocab = 0
        self._extra: Mapping[str, Any] = dict(self.options.extra_body or {})
        self._remote: Remote | None = None
        try:
            self.engine_loop().run(self._connect())
        except BaseException as exc:
            self.close()
            if isinstance(exc, (ModelLoadError, TypeError, ValueError)) or not isinstance(exc, Exception):
                raise
            mapped = self._mapped(exc)
            raise ModelLoadError(f"{self.url}: cannot load the served model: {mapped}", url) from mapped

    # -- loading -------------------------------------------------------------------

    async def _connect(self) -> None:
        opts = self.options
        api_key = opts.api_key if opts.api_key is not None else os.environ.get("OPENAI_API_KEY")
        self._remote = remote = Remote(self.url, api_key, opts.timeout, opts.connect_timeout,
                                       opts.retries, dict(opts.headers or {}))
        entry = await self._pick_model(remote)
        ctx_len = entry.get("max_model_len")
        found = entry.get("meta")
        meta: dict[str, Any] = found if isinstance(found, dict) else {}
        if not isinstance(ctx_len, int):
            ctx_len = meta.get("n_ctx") or meta.get("n_ctx_train")  # llama.cpp's server
        if isinstance(ctx_len, int) and not self.context_len:
            self.context_len = ctx_len
        if isinstance(meta.get("n_vocab"), int):
            self._vocab = meta["n_vocab"]
        await self._probe_tokenizer(remote)
        if self.flavor == "llama-cpp-python" and not self._asked_slots:
            # It serves one request at a time and, by default, ends a running stream when
            # another request comes in: one request at a time from here too.
            self._slots = SlotQueue(1)
        if self.flavor == "llama.cpp":
            await self._read_props(remote)
        self.id_mode = opts.token_ids if opts.token_ids != "auto" else await self._probe_ids(remote)

    async def _pick_model(self, remote: Remote) -> dict[str, Any]:
        """The served model's ``/v1/models`` entry: ``model=`` if given, else the only one served."""
        wanted = self.options.model
        try:
            listing = await remote.get_json(remote.url("/models"))
        except RemoteHTTPError as exc:
            if wanted is None or exc.status not in (404, 405, 501):
                raise
            self.model_id = wanted
            return {}
        data = listing.get("data") if isinstance(listing, dict) else None
        entries = [e for e in data if isinstance(e, dict) and isinstance(e.get("id"), str)] \
            if isinstance(data, list) else []
        if wanted is not None:
            self.model_id = wanted
            return next((e for e in entries if e["id"] == wanted), {})
        if len(entries) != 1:
            names = ", ".join(repr(e["id"]) for e in entries) or "none"
            raise ModelLoadError(
                f"{self.url}: the server lists {len(entries)} models ({names}); pass model='name' to choose",
                self.url,
            )
        self.model_id = entries[0]["id"]
        return entries[0]

    async def _probe_tokenizer(self, remote: Remote) -> None:
        """Find the server's tokenize route (vLLM's, llama.cpp's or llama-cpp-python's), if any."""
        for flavor in _TOKENIZERS:
            try:
                ids, limit = await self._atokenize_as(flavor, "Hello")
            except RemoteError:
                continue
            if ids:
                self.flavor = flavor
                if limit and not self.context_len:
                    self.context_len = limit
                return

    async def _read_props(self, remote: Remote) -> None:
        """llama.cpp's ``/props``: the context it runs with and its parallel slots (``-np``)."""
        try:
            props = await remote.get_json(remote.url("/props", root=True))
        except RemoteError:
            return
        if not isinstance(props, dict):
            return
        settings = props.get("default_generation_settings")
        n_ctx = settings.get("n_ctx") if isinstance(settings, dict) else None
        if isinstance(n_ctx, int) and n_ctx > 0:
            self.context_len = self._asked_ctx or n_ctx  # the loaded context, not the trained one
        slots = props.get("total_slots")
        if isinstance(slots, int) and slots > 0 and not self._asked_slots:
            self._slots = SlotQueue(slots)

    async def _probe_ids(self, remote: Remote) -> str:
        """Which way, if any, this server gives token ids (one token generated per try)."""
        cfg = GenerateConfig(max_tokens=1)
        for mode in (IDS_FIELD, IDS_LOGPROBS):
            body = completion_body(self.model_id, "Hello", cfg, mode, self.flavor, self._extra, stream=False)
            try:
                answer = await remote.post_json(remote.url("/completions"), body)
                delta = parse_chunk(answer, chat=False, mode=mode)
            except RemoteHTTPError as exc:
                wrong_model = exc.status == 404 and (
                    exc.code == "model_not_found" or "model" in exc.server_message.lower())
                if exc.status in (401, 403) or wrong_model:  # a wrong key or model: say so at load
                    raise
                continue  # this form is not understood here (or there is no /completions)
            except (RemoteError, ValueError):
                continue
            if delta.ids:
                return mode
        return IDS_NONE

    # -- the raw streams -----------------------------------------------------------

    def _client(self) -> Remote:
        if self._remote is None:
            raise EngineError("the openai backend's client is not connected")
        return self._remote

    def _aengine_generate(
        self, prompt: str, cfg: GenerateConfig, ctx: Context, rec: MetricsRecorder
    ) -> AsyncGenerator[Piece, None]:
        body = completion_body(self.model_id, prompt, cfg, self.id_mode, self.flavor, self._extra)
        return self._astream("/completions", body, cfg, rec, chat=False)

    def _prepare_chat(self, messages: list[Message]) -> list[dict[str, str]]:
        return [m.to_dict() for m in messages]  # the server applies the model's chat template

    def _aengine_chat(
        self, prepared: Any, cfg: GenerateConfig, ctx: Context, rec: MetricsRecorder
    ) -> AsyncGenerator[Piece, None]:
        body = chat_body(self.model_id, prepared, cfg, self.id_mode, self.flavor, self._extra)
        return self._astream("/chat/completions", body, cfg, rec, chat=True)

    def _render_chat(self, messages: list[Message]) -> str:
        raise NotImplementedError(
            "the openai backend sends conversations to the server, which applies the model's "
            "chat template: use chat(), not chat_prompt()"
        )

    async def _astream(self, path: str, body: dict[str, Any], cfg: GenerateConfig,
                       rec: MetricsRecorder, chat: bool) -> AsyncGenerator[Piece, None]:
        """Stream one request's pieces, retrying with backoff only until the first piece."""
        if cfg.stop_tokens and self.id_mode == IDS_NONE:
            raise ValueError(
                f"stop_tokens: the server at {self.url} gives no token ids, so stop ids cannot be "
                "matched; use stop strings"
            )
        remote = self._client()
        url = remote.url(path)
        attempt = 0
        while True:
            call = _Call()
            try:
                # aclosing: a consumer that leaves closes the HTTP stream now, not at GC
                async with contextlib.aclosing(self._read(remote, url, body, cfg, rec, chat, call)) as pieces:
                    async for piece in pieces:
                        yield piece
                return
            except Exception as exc:
                delay = None if call.emitted else remote.retry_delay(exc, attempt)
                if delay is None:
                    raise
            await asyncio.sleep(delay)
            attempt += 1

    async def _read(self, remote: Remote, url: str, body: dict[str, Any], cfg: GenerateConfig,
                    rec: MetricsRecorder, chat: bool, call: _Call) -> AsyncGenerator[Piece, None]:
        events = remote.events(url, body)
        mode = self.id_mode
        try:
            async for chunk in events:
                delta = parse_chunk(chunk, chat, mode)
                self._note(delta, rec, call)
                pieces = self._pieces(delta, call)
                if len(pieces) > 1 and self.flavor:
                    pieces = await self._split(pieces, call)
                if delta.ids:
                    call.ids.extend(delta.ids)
                for piece in pieces:
                    call.emitted += 1
                    if call.emitted >= cfg.max_tokens:
                        # The last token asked for: read the usage the server sends after it
                        # before handing it over (the consumer stops pulling after this one).
                        with contextlib.suppress(Exception):  # what was asked for has come
                            for _ in range(DRAIN_CHUNKS):
                                nxt = await anext(events, None)
                                if nxt is None:
                                    break
                                self._note(parse_chunk(nxt, chat, mode), rec, call)
                    yield piece
        finally:
            await events.aclose()
        if call.carry:
            yield NO_ID, call.carry
        if call.finish == "length":
            made = call.completion_tokens if call.completion_tokens is not None else call.emitted
            rec.finish_reason = "length" if made >= cfg.max_tokens else "context_full"
        elif call.finish in ("abort", "error"):
            raise EngineError(f"{url}: the server ended the request with finish_reason {call.finish!r}")

    @staticmethod
    def _note(delta: Delta, rec: MetricsRecorder, call: _Call) -> None:
        """Take what a chunk says about the call: usage, the server's own timings, why it ended."""
        if delta.prompt_tokens is not None:
            rec.prompt_tokens = delta.prompt_tokens
        if delta.completion_tokens is not None:
            call.completion_tokens = delta.completion_tokens
        if delta.finish_reason:
            call.finish = delta.finish_reason
        t = delta.timings
        if "prompt_ms" in t and "predicted_ms" in t:  # llama.cpp's server times itself
            rec.prefill_duration = t["prompt_ms"] / 1000
            rec.decode_duration = t["predicted_ms"] / 1000

    @staticmethod
    def _pieces(delta: Delta, call: _Call) -> list[Piece]:
        if delta.ids is None:  # a text-only server: one chunk is one token
            return [(NO_ID, delta.text)] if delta.text else []
        text = call.carry + delta.text
        if not delta.ids:
            call.carry = text
            return []
        call.carry = ""
        # Several ids in one chunk: their text cannot be split, so it goes with the last
        # (as a token that ends mid-character carries "" and the next one the character).
        pieces: list[Piece] = [(i, "") for i in delta.ids[:-1]]
        pieces.append((delta.ids[-1], text))
        return pieces

    async def _split(self, pieces: list[Piece], call: _Call) -> list[Piece]:
        """Each id of a chunk that carried several (a server that fell behind its reader) with
        its own text, from the server's detokenizer over the stream so far, so a stream's tokens
        do not depend on how the server happened to chunk them. Where the texts do not add up
        (a character split across ids, a detokenizer that trims), the chunk's text stays on
        its last id."""
        ids = [tid for tid, _ in pieces]
        whole = b"".join(text if isinstance(text, bytes) else str(text).encode() for _, text in pieces)
        try:
            texts = [await self._adetokenize(call.ids + ids[:j]) if call.ids or j else ""
                     for j in range(len(ids) + 1)]
        except (InferenceError, OSError):
            return pieces
        if any(t.endswith("\ufffd") for t in texts) or not all(
            b.startswith(a) for a, b in pairwise(texts)
        ):
            return pieces
        split: list[Piece] = [(tid, texts[j + 1][len(texts[j]):]) for j, tid in enumerate(ids)]
        if "".join(texts[j + 1][len(texts[j]):] for j in range(len(ids))).encode() != whole:
            return pieces
        return split

    # -- classify and batch: concurrent requests with a bound -------------------------

    def _classify(
        self, prompts: list[str], cfg: GenerateConfig, ctx: Context, rec: MetricsRecorder
    ) -> list[ClassifyResult]:
        if cfg.return_logits:
            raise ValueError("return_logits: a remote server gives no logits (capabilities.logits is False)")
        if self.id_mode == IDS_NONE:
            raise NotImplementedError(f"classify: the server at {self.url} gives no token ids")
        return self.engine_loop().run(self._aclassify(prompts, cfg, rec), ctx, self._closed)

    async def _aclassify(self, prompts: list[str], cfg: GenerateConfig,
                         rec: MetricsRecorder) -> list[ClassifyResult]:
        remote = self._client()
        url = remote.url("/completions")
        one_token = replace(cfg, max_tokens=1, stop=(), stop_tokens=())
        bound = asyncio.Semaphore(self._slots.size)

        async def one(prompt: str) -> ClassifyResult:
            body = completion_body(self.model_id, prompt, one_token, self.id_mode, self.flavor,
                                   self._extra, stream=False)
            async with bound:
                sub = MetricsRecorder()
                try:
                    delta = parse_chunk(await self._post(remote, url, body), False, self.id_mode)
                except Exception as exc:
                    return ClassifyResult(Token(NO_ID, ""), err=self._mapped(exc), metrics=sub.finish())
                sub.prompt_tokens = delta.prompt_tokens or 0
                sub.generated_tokens = 1
                sub.first_token = sub.end = time.perf_counter()
                rec.prompt_tokens += sub.prompt_tokens
                rec.generated_tokens += 1
                tid = delta.ids[-1] if delta.ids else NO_ID
                return ClassifyResult(Token(tid, delta.text), None, sub.prompt_tokens, sub.finish())

        return list(await asyncio.gather(*(one(p) for p in prompts)))

    async def _post(self, remote: Remote, url: str, body: Mapping[str, Any]) -> Any:
        """POST with the same retries as a stream before its first token."""
        attempt = 0
        while True:
            try:
                return await remote.post_json(url, body)
            except Exception as exc:
                delay = remote.retry_delay(exc, attempt)
                if delay is None:
                    raise
            await asyncio.sleep(delay)
            attempt += 1

    def _batch_generate(
        self, prompts: list[str], cfg: GenerateConfig, ctx: Context, rec: MetricsRecorder
    ) -> list[BatchResult]:
        return self.engine_loop().run(self._abatch(prompts, cfg, ctx, rec), ctx, self._closed)

    async def _abatch(self, prompts: list[str], cfg: GenerateConfig, ctx: Context,
                      rec: MetricsRecorder) -> list[BatchResult]:
        bound = asyncio.Semaphore(self._slots.size)

        async def one(prompt: str) -> BatchResult:
            async with bound:
                sub = MetricsRecorder()
                fin = TokenFinisher(cfg, sub)
                raw = self._aengine_generate(prompt, cfg, ctx, sub)
                try:
                    tokens = tuple([t async for t in afinish_tokens(raw, cfg, ctx, sub, self._closed, fin)])
                    return BatchResult(tokens, None, fin.finish_reason or "", fin.stop,
                                       sub.prompt_tokens, sub.finish())
                except Exception as exc:  # one bad prompt does not sink the batch
                    if ctx.err() is not None or self._closed.is_set():
                        raise  # ... but a cancelled call or a closed model does
                    return BatchResult(err=self._mapped(exc), finish_reason="error",
                                       prompt_tokens=sub.prompt_tokens, metrics=sub.finish())
                finally:
                    await raw.aclose()
                    rec.prompt_tokens += sub.prompt_tokens
                    rec.generated_tokens += sub.generated_tokens
                    rec.first_token = rec.first_token or sub.first_token

        return list(await asyncio.gather(*(one(p) for p in prompts)))

    # -- tokenize ------------------------------------------------------------------

    async def _atokenize_as(self, flavor: str, text: str) -> tuple[list[int], int]:
        remote = self._client()
        path = _TOKENIZERS[flavor][0]
        if flavor == "vllm":
            body: dict[str, Any] = {"model": self.model_id, "prompt": text}
        elif flavor == "llama.cpp":
            body = {"content": text, "add_special": True}
        else:
            body = {"model": self.model_id, "input": text}
        answer = await remote.post_json(remote.url(path, root=True), body)
        tokens = answer.get("tokens") if isinstance(answer, dict) else None
        if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
            raise RemoteError(f"{path}: no token list in the answer", url=remote.url(path, True))
        limit = answer.get("max_model_len")
        return tokens, limit if isinstance(limit, int) else 0

    async def _adetokenize(self, ids: list[int]) -> str:
        remote = self._client()
        _, path, key = _TOKENIZERS[self.flavor]
        url = remote.url(path, root=True)
        body: dict[str, Any] = {"tokens": ids}
        if self.flavor != "llama.cpp":
            body["model"] = self.model_id
        answer = await remote.post_json(url, body)
        text = answer.get(key) if isinstance(answer, dict) else None
        if not isinstance(text, str):
            raise RemoteError(f"{url}: no text in the answer", url=url)
        return text

    def _tokenize(self, text: str) -> list[int]:
        if not self.flavor:
            raise NotImplementedError(f"tokenize: the server at {self.url} has no tokenize route")
        ids: list[int] = self._on_loop(self._atokenize_as(self.flavor, text))[0]
        return ids

    def _detokenize(self, ids: Sequence[int]) -> str:
        if not self.flavor:
            raise NotImplementedError(f"detokenize: the server at {self.url} has no detokenize route")
        text: str = self._on_loop(self._adetokenize(list(ids)))
        return text

    def _on_loop(self, coro: Any) -> Any:
        try:
            return self.engine_loop().run(coro, None, self._closed)
        except Exception as exc:
            mapped = self._mapped(exc)
            if mapped is exc:
                raise
            raise mapped from exc

    # -- the rest ------------------------------------------------------------------

    @property
    def capabilities(self) -> Capabilities:
        ids = self.id_mode != IDS_NONE
        return Capabilities(
            token_ids=ids,
            logits=False,
            classify="native" if ids else "",
            batch_generate="native",  # concurrent requests: the server batches them
            chat_template=True,  # applied by the server
            tokenize=bool(self.flavor),
            parallel_slots=self._slots.size,
            async_engine=True,
        )

    def _describe(self) -> ModelInfo:
        return ModelInfo(architecture=f"openai:{self.model_id}", vocab_size=self._vocab,
                         context_length=self.context_len)

    def _map_engine_error(self, exc: Exception) -> InferenceError:
        return map_remote_error(exc, self.url, self.options.timeout, self.options.connect_timeout)

    def _close_engine(self) -> None:
        remote, self._remote = self._remote, None
        if remote is not None and self._loop is not None:
            with contextlib.suppress(Exception, concurrent.futures.TimeoutError):
                self._loop.submit(remote.aclose()).result(timeout=5)

    def __repr__(self) -> str:
        return f"<OpenAIModel {self.model_id!r} at {self.url}>"


__all__ = ["OpenAIModel", "RemoteOptions", "base_url"]
