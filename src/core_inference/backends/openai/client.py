"""The HTTP side of the ``openai`` backend, on httpx2 (the HTTP stack of the ``openai`` client).

``Remote`` owns one ``httpx2.AsyncClient`` and lives on the model's engine loop. It posts
JSON, reads Server-Sent Events, turns 4xx/5xx answers into ``RemoteHTTPError`` (or
``ContextLengthExceeded``) carrying the server's own message, and says which failures are
worth a retry. ``map_remote_error`` is the one place httpx2's exceptions become the
backend's typed errors, in the shape of httpx's own ``map_httpcore_exceptions``.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
from collections.abc import AsyncGenerator, Mapping
from typing import Any

import httpx2

from ...errors import ContextLengthExceeded, EngineError, InferenceError
from ...openai_wire import WireError, error_fields
from .errors import RemoteConnectError, RemoteError, RemoteHTTPError, RemoteProtocolError, RemoteTimeout

MAX_ERROR_BODY = 64 * 1024  # bytes of an error answer read for its message
RETRY_STATUSES = frozenset({408, 429, 502, 503, 504})
MAX_RETRY_AFTER = 30.0  # seconds: a longer Retry-After is not waited for

# httpx2's exceptions, most specific first -> (our error, what to say).
_TRANSPORT_ERRORS: tuple[tuple[type[Exception], type[RemoteError], str], ...] = (
    (httpx2.ConnectTimeout, RemoteTimeout, "no connection within {connect}s"),
    (httpx2.TimeoutException, RemoteTimeout, "no answer within {read}s"),
    (httpx2.ConnectError, RemoteConnectError, "cannot connect"),
    (httpx2.RemoteProtocolError, RemoteProtocolError, "the server broke off the answer"),
    (httpx2.NetworkError, RemoteConnectError, "the connection failed"),
    (httpx2.SSEError, RemoteProtocolError, "not a Server-Sent Events stream"),
    (httpx2.DecodingError, RemoteProtocolError, "cannot decode the answer"),
    (httpx2.TransportError, RemoteError, "transport failure"),
    (httpx2.InvalidURL, RemoteConnectError, "invalid URL"),
)

# vLLM: "This model's maximum context length is 2048 tokens. However, you requested 2100
# tokens (2000 in the messages, 100 in the completion)."; llama.cpp: "the request exceeds
# the available context size" / "n_ctx" forms.
_CONTEXT_RE = re.compile(
    r"maximum context length is (\d+) tokens.*?(?:requested|resulted in) (\d+) tokens", re.S
)


class Remote:
    """One OpenAI-compatible server, reached from the model's engine loop."""

    def __init__(self, base_url: str, api_key: str | None, timeout: float, connect_timeout: float,
                 retries: int, headers: Mapping[str, str]) -> None:
        self.base_url = base_url.rstrip("/")
        self.root_url = self.base_url[: -len("/v1")] if self.base_url.endswith("/v1") else self.base_url
        self.timeout, self.connect_timeout, self.retries = timeout, connect_timeout, retries
        hdrs = {"Accept": "application/json, text/event-stream", **headers}
        if api_key:
            hdrs["Authorization"] = f"Bearer {api_key}"
        self.client = httpx2.AsyncClient(
            headers=hdrs,
            timeout=httpx2.Timeout(timeout, connect=connect_timeout),
            limits=httpx2.Limits(max_connections=None, max_keepalive_connections=64),
            follow_redirects=False,  # a redirect of a POST is the server's misconfiguration: say so
        )  # HTTP(S)_PROXY and NO_PROXY are honoured, as the openai client does

    def url(self, path: str, root: bool = False) -> str:
        """An address under ``/v1`` (or under the server's root for ``root``)."""
        return (self.root_url if root else self.base_url) + path

    async def aclose(self) -> None:
        await self.client.aclose()

    async def get_json(self, url: str) -> Any:
        """GET ``url`` and return its JSON (4xx/5xx raise ``RemoteHTTPError``)."""
        resp = await self.client.get(url)
        return await self._json(resp, url)

    async def post_json(self, url: str, body: Mapping[str, Any]) -> Any:
        """POST ``body`` and return the JSON answer."""
        resp = await self.client.post(url, json=dict(body))
        return await self._json(resp, url)

    async def _json(self, resp: httpx2.Response, url: str) -> Any:
        if resp.status_code >= 300:
            raise status_error(resp.status_code, resp.content[:MAX_ERROR_BODY], url, resp.headers)
        try:
            return resp.json()
        except ValueError as exc:
            raise RemoteProtocolError(f"{url}: the answer is not JSON: {resp.text[:200]!r}",
                                      url=url, status=resp.status_code) from exc

    async def events(self, url: str, body: Mapping[str, Any]) -> AsyncGenerator[Any, None]:
        """POST ``body`` with streaming and yield each SSE chunk's JSON until ``[DONE]``.

        A JSON answer (a server that does not stream) is yielded whole. A chunk that is
        not JSON, an error sent mid-stream, or a stream that ends without ``[DONE]`` or a
        finish reason raise ``RemoteProtocolError``/``RemoteHTTPError``. Leaving the
        generator closes the connection at once (the server sees the client go).
        """
        async with self.client.stream("POST", url, json=dict(body)) as resp:
            if resp.status_code >= 300:
                raise status_error(resp.status_code, await _read_bounded(resp), url, resp.headers)
            ctype = resp.headers.get("content-type", "").partition(";")[0].strip().lower()
            if ctype == "application/json":
                yield await self._json(resp, url)
                return
            finished = got = False
            async for event in httpx2.EventSource(resp):
                data = event.data
                if data.strip() == "[DONE]":
                    if finished:
                        return
                    break  # llama-cpp-python ends a stream so when a newer request interrupts it
                if not data and event.event != "error":
                    continue
                try:
                    chunk = json.loads(data)
                except ValueError as exc:
                    raise RemoteProtocolError(f"{url}: malformed stream chunk: {data[:200]!r}",
                                              url=url, status=resp.status_code) from exc
                if event.event == "error" or (isinstance(chunk, dict) and "error" in chunk):
                    raise status_error(_stream_error_status(chunk), chunk, url, None, mid_stream=True)
                if _has_finish(chunk):
                    finished = True
                got = True
                yield chunk
            if finished:
                return
        if not got:  # an empty stream: a server that fails after its 200 (llama-cpp-python's
            await self._diagnose(url, body)  # prompt too long); ask again, unstreamed, for why
        raise RemoteProtocolError(f"{url}: the stream ended before its end (no finish reason)"
                                  + ("" if got else ": the server sent nothing"), url=url, status=200)

    async def _diagnose(self, url: str, body: Mapping[str, Any]) -> None:
        """Raise the error the same request gets unstreamed (one token), if it gets one."""
        quiet = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
        quiet["max_tokens"] = 1
        for _ in range(2):  # a server that failed may have closed the kept-alive connection
            try:
                await self.post_json(url, quiet)
                return
            except RemoteProtocolError:
                return
            except httpx2.TransportError:
                continue

    def retry_delay(self, exc: BaseException, attempt: int) -> float | None:
        """Seconds to wait before retry number ``attempt + 1`` after ``exc``, or None for no retry.

        Only failures that happened before the server produced anything come here: a
        refused or reset connection, a connect timeout, a stream cut before its first
        token, and statuses 408/429/502/503/504 (with their ``Retry-After``).
        """
        if attempt >= self.retries:
            return None
        backoff = min(0.25 * 2.0 ** attempt, 8.0) * (0.5 + random.random() / 2)
        if isinstance(exc, RemoteHTTPError):
            if exc.status not in RETRY_STATUSES:
                return None
            after = exc.retry_after
            if after is not None:
                return None if after > MAX_RETRY_AFTER else max(after, 0.0)
            return backoff
        if isinstance(exc, (httpx2.ConnectError, httpx2.ConnectTimeout, httpx2.RemoteProtocolError,
                            httpx2.ReadError, httpx2.WriteError)):
            return backoff
        return None


async def _read_bounded(resp: httpx2.Response) -> bytes:
    out = bytearray()
    async for part in resp.aiter_bytes():
        out += part
        if len(out) >= MAX_ERROR_BODY:
            break
    return bytes(out[:MAX_ERROR_BODY])


def _has_finish(chunk: object) -> bool:
    if not isinstance(chunk, dict):
        return False
    choices = chunk.get("choices")
    if isinstance(choices, list):
        return any(isinstance(c, dict) and c.get("finish_reason") for c in choices)
    return False


def _stream_error_status(chunk: object) -> int:
    err = chunk.get("error") if isinstance(chunk, dict) else None
    code = err.get("code") if isinstance(err, dict) else None
    return code if isinstance(code, int) and 400 <= code < 600 else 500


def status_error(status: int, body: bytes | object, url: str, headers: Mapping[str, str] | None,
                 mid_stream: bool = False) -> InferenceError:
    """The error for a 3xx/4xx/5xx answer (or an error object sent mid-stream), with the server's message."""
    parsed: object = body
    if isinstance(body, bytes):
        text = body.decode("utf-8", "replace")
        try:
            parsed = json.loads(text)
        except ValueError:
            parsed = text
    message, etype, code, param = error_fields(parsed)
    location = headers.get("location") if headers is not None else None
    if status < 400 and location:  # redirects are not followed: a POST would lose its body
        message = f"redirected to {location}: load the model with that address"
    found = _CONTEXT_RE.search(message)
    if found:
        limit, requested = int(found.group(1)), int(found.group(2))
        err: InferenceError = ContextLengthExceeded(requested, limit)
        err.args = (f"{err} (server {url}: {message})",)
        return err
    where = "mid-stream" if mid_stream else f"HTTP {status}"
    after = headers.get("retry-after") if headers is not None else None
    try:
        retry_after = float(after) if after is not None else None
    except ValueError:
        retry_after = None
    return RemoteHTTPError(f"{url}: {where}: {message or '(no message)'}", url=url, status=status,
                           server_message=message, error_type=etype, code=code, param=param,
                           retry_after=retry_after)


def map_remote_error(exc: BaseException, url: str, timeout: float, connect_timeout: float) -> InferenceError:
    """The backend's typed error for an exception raised while talking to the server."""
    if isinstance(exc, InferenceError):
        return exc
    if isinstance(exc, WireError):
        return RemoteProtocolError(f"{url}: malformed answer: {exc}", url=url)
    where = url
    request = getattr(exc, "_request", None)
    if request is not None:
        where = str(request.url)
    for kind, ours, what in _TRANSPORT_ERRORS:
        if isinstance(exc, kind):
            said = what.format(read=timeout, connect=connect_timeout)
            detail = f": {exc}" if str(exc) else f" ({type(exc).__name__})"
            return ours(f"{where}: {said}{detail}", url=where)
    if isinstance(exc, asyncio.TimeoutError):
        return RemoteTimeout(f"{where}: no answer within {timeout}s", url=where)
    return EngineError(f"openai backend ({where}): {type(exc).__name__}: {exc}")
