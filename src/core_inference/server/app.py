"""The HTTP application: Starlette routes, the gate in front of them, and the uvicorn runner.

The gate (a plain ASGI middleware, outermost) counts every request by status, refuses
everything with 401 when an API key is set and not given, and with 503 once the
server is draining (SIGTERM). Handlers read the body with a size limit (413) and a time
limit (408), parse it (400 naming the field), wait for slots (429 past the queue), and
stop the generation when the client leaves, streaming or not.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import InferenceError
from .metrics import CLIENT_GONE
from .protocol import (
    ProtocolError,
    error_body,
    parse_chat,
    parse_completion,
    parse_detokenize,
    parse_json,
    parse_tokenize,
)
from .serving import Job, Served, answer, events, start_chat, start_completion

_T = TypeVar("_T")
LOG = logging.getLogger("uvicorn.error")  # uvicorn's own log, at its --log-level
MAX_BODY = 4 * 2**20  # bytes; a chat with a long document fits, a 10 MB body does not
BODY_TIMEOUT = 30.0  # seconds for a whole request body to arrive (a body sent a byte a second)
DRAIN_CAP = 64 * 2**20  # bytes of an oversized body read and dropped so the client sees the 413


@dataclass
class ServerState:
    """What the gate and the handlers share."""

    served: Served
    api_key: str | None = None
    max_body: int = MAX_BODY
    body_timeout: float = BODY_TIMEOUT
    draining: bool = False


class ClientGone(Exception):
    """The client disconnected before its answer began."""


def _json(body: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse(body, status_code=status, headers=headers)


def _error(exc: ProtocolError) -> Response:
    headers = {"retry-after": "1"} if exc.status in (429, 503) else None
    return _json(exc.body(), exc.status, headers)


class Gate:
    """Counts every HTTP request by status; 401 without the key; 503 while draining."""

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app = app
        self.state = state
        self._key = state.api_key.encode() if state.api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        status: int | None = None
        metrics = self.state.served.metrics

        async def counted(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start" and status is None:
                status = int(message["status"])
                metrics.request(path, status)
            await send(message)

        try:
            refusal = self._refusal(scope)
            if refusal is not None:
                await refusal(scope, receive, counted)
            else:
                await self.app(scope, receive, counted)
        finally:
            if status is None:  # the client left before any answer (or the app failed without one)
                metrics.request(path, CLIENT_GONE)

    def _refusal(self, scope: Scope) -> Response | None:
        if self._key is not None:
            given = b""
            for name, value in scope.get("headers", []):
                if name == b"authorization":
                    given = value
            scheme, _, token = given.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self._key):
                return _json(error_body("missing or wrong API key: send 'Authorization: Bearer <key>'",
                                        "authentication_error", None, "invalid_api_key"), 401,
                             {"www-authenticate": "Bearer"})
        if self.state.draining:
            return _error(ProtocolError("the server is shutting down", status=503, type="server_error",
                                        code="shutting_down"))
        return None


async def read_body(request: Request, limit: int, timeout: float) -> bytes:
    """The request body: 413 past ``limit`` bytes, 408 when it takes more than ``timeout`` s."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or len(declared) > 18):
        raise ProtocolError("content-length: not a valid length", "content-length")

    async def read() -> bytes:
        chunks: list[bytes] = []
        size = 0
        too_big = declared is not None and int(declared) > limit
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                too_big = True
            if too_big:
                if size > DRAIN_CAP:
                    break
                continue  # read and drop the rest, so the client is still listening for the 413
            chunks.append(chunk)
        if too_big:
            raise ProtocolError(f"the request body is larger than {limit} bytes", status=413,
                                code="request_too_large")
        return b"".join(chunks)

    try:
        return await asyncio.wait_for(read(), timeout)
    except asyncio.TimeoutError:
        raise ProtocolError(f"the request body did not arrive within {timeout:g} s", status=408,
                            type="timeout", code="request_timeout") from None
    except ClientDisconnect:
        raise ClientGone from None


async def until_disconnect(receive: Receive, work: Awaitable[_T]) -> _T:
    """Await ``work`` (after the body was read); cancel it and raise ``ClientGone`` if the client leaves."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
        watcher.cancel()
        await asyncio.gather(task, watcher, return_exceptions=True)
    if task.cancelled():
        raise ClientGone
    return task.result()


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class EventStream:
    """A ``text/event-stream`` response that closes its generator when the client leaves.

    Starlette's ``StreamingResponse`` notices a disconnect only at its next write under
    some ASGI versions and leaves the generator to the garbage collector; this one
    listens for the disconnect while streaming, cancels the stream at once (its
    generation stops at the next token) and always frees the request's slots.
    """

    def __init__(self, body: AsyncIterator[bytes], job: Job) -> None:
        self.body = body
        self.job = job

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def stream() -> None:
            await send({"type": "http.response.start", "status": 200, "headers": [
                (b"content-type", b"text/event-stream; charset=utf-8"),
                (b"cache-control", b"no-cache"),
                (b"x-accel-buffering", b"no"),
            ]})
            async for chunk in self.body:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        writer = asyncio.ensure_future(stream())
        watcher = asyncio.ensure_future(_disconnected(receive))
        try:
            await asyncio.wait({writer, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (writer, watcher):
                t.cancel()
            await asyncio.gather(writer, watcher, return_exceptions=True)
            aclose = getattr(self.body, "aclose", None)
            if aclose is not None:
                await aclose()
            await self.job.close()
        failure = writer.exception() if writer.done() and not writer.cancelled() else None
        if failure is not None and not isinstance(failure, OSError):  # OSError: the client went away
            LOG.error("stream %s failed: %s: %s", self.job.id, type(failure).__name__, failure,
                      exc_info=failure)


Handler = Callable[[Request, ServerState], Awaitable[Any]]


def endpoint(handler: Handler, state: ServerState) -> Callable[[Request], Awaitable[Any]]:
    """A route: protocol errors become their status, a client that left gets nothing."""

    async def route(request: Request) -> Any:
        try:
            return await handler(request, state)
        except ProtocolError as exc:
            return _error(exc)
        except ClientGone:
            return _Nothing()

    return route


class _Nothing:
    """No response at all: the client has gone (the gate counts a 499)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        return None


async def _models(request: Request, state: ServerState) -> Response:
    return _json({"object": "list", "data": [state.served.model_card()]})


async def _health(request: Request, state: ServerState) -> Response:
    return _json({"status": "ok"})


async def _metrics(request: Request, state: ServerState) -> Response:
    return PlainTextResponse(state.served.metrics.render(), media_type="text/plain; version=0.0.4")


async def _completions(request: Request, state: ServerState) -> Any:
    arrived = time.monotonic()
    req = parse_completion(parse_json(await read_body(request, state.max_body, state.body_timeout)))
    job = await until_disconnect(request.receive, start_completion(state.served, req, arrived))
    echo = req.prompts if req.echo else ()
    if req.sampling.stream:
        return EventStream(events(job, req.sampling.include_usage, echo), job)
    return _json(await until_disconnect(request.receive, answer(job, echo)))


async def _chat(request: Request, state: ServerState) -> Any:
    arrived = time.monotonic()
    body = parse_json(await read_body(request, state.max_body, state.body_timeout))
    req = parse_chat(body, state.served.chat_max_tokens)
    job = await until_disconnect(request.receive, start_chat(state.served, req, arrived))
    if req.sampling.stream:
        return EventStream(events(job, req.sampling.include_usage), job)
    return _json(await until_disconnect(request.receive, answer(job)))


async def _tokenize(request: Request, state: ServerState) -> Response:
    """vLLM's ``/tokenize``: ``{"count", "max_model_len", "tokens"}``."""
    req = parse_tokenize(parse_json(await read_body(request, state.max_body, state.body_timeout)))
    served = state.served
    served.check_model_name(req.model)
    model = served.model
    if not model.capabilities.tokenize:
        raise ProtocolError("this model's backend cannot tokenize", status=501, code="not_implemented")
    try:
        text = req.prompt if req.prompt is not None else model.chat_prompt(list(req.messages))
        ids = await asyncio.to_thread(model.tokenize, text)
    except (ValueError, TypeError) as exc:
        raise ProtocolError(str(exc), "prompt" if req.prompt is not None else "messages") from exc
    return _json({"count": len(ids), "max_model_len": model.context_len or None, "tokens": ids})


async def _detokenize(request: Request, state: ServerState) -> Response:
    """vLLM's ``/detokenize``: ``{"prompt": text}``."""
    data = parse_json(await read_body(request, state.max_body, state.body_timeout))
    ids = parse_detokenize(data)
    model_name = data.get("model")
    state.served.check_model_name(model_name if isinstance(model_name, str) else None)
    model = state.served.model
    if not model.capabilities.tokenize:
        raise ProtocolError("this model's backend cannot detokenize", status=501, code="not_implemented")
    vocab = state.served.vocab_size
    for i, t in enumerate(ids):
        if vocab and t >= vocab:  # the model refuses it too; here the error names the request's field
            raise ProtocolError(f"tokens[{i}]: {t} is not in the vocabulary (size {vocab})", f"tokens[{i}]")
    try:
        text = await asyncio.to_thread(model.detokenize, ids)
    except (ValueError, TypeError, IndexError) as exc:
        raise ProtocolError(f"tokens: {exc}", "tokens") from exc
    except InferenceError as exc:
        raise ProtocolError(f"tokens: {exc}", "tokens") from exc
    return _json({"prompt": text})


async def _not_found(request: Request, exc: Exception) -> Response:
    return _json(error_body(f"no route {request.url.path}", "not_found_error", None, None), 404)


async def _not_allowed(request: Request, exc: Exception) -> Response:
    return _json(error_body(f"method {request.method} is not allowed on {request.url.path}",
                            "invalid_request_error", None, None), 405)


async def _server_error(request: Request, exc: Exception) -> Response:
    return _json(error_body(f"internal error: {type(exc).__name__}: {exc}", "server_error", None, None), 500)


def build_app(state: ServerState, on_ready: Callable[[], None] | None = None) -> ASGIApp:
    """The ASGI application serving ``state.served``."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if on_ready is not None:
            on_ready()
        yield

    routes = [
        Route("/v1/models", endpoint(_models, state), methods=["GET"]),
        Route("/v1/completions", endpoint(_completions, state), methods=["POST"]),
        Route("/v1/chat/completions", endpoint(_chat, state), methods=["POST"]),
        Route("/tokenize", endpoint(_tokenize, state), methods=["POST"]),
        Route("/detokenize", endpoint(_detokenize, state), methods=["POST"]),
        Route("/health", endpoint(_health, state), methods=["GET"]),
        Route("/metrics", endpoint(_metrics, state), methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={
        404: _not_found, 405: _not_allowed, 500: _server_error,
    })
    return Gate(app, state)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (port 0: one the OS picks)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto must be IPPROTO_TCP: asyncio sets TCP_NODELAY only on such sockets, and without
    # it every keep-alive answer waits ~40 ms for a delayed ACK (headers and body go apart)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def run(state: ServerState, sock: socket.socket, log_level: str = "warning",
        announce: Callable[[str], None] | None = None) -> bool:
    """Serve on ``sock`` until SIGTERM or Ctrl-C; True after a graceful stop.

    On the first SIGTERM or SIGINT the server stops accepting connections, answers any
    request that still reaches it with 503, lets the requests and streams in flight
    finish, and returns (so the process exits 0: uvicorn would re-raise the signal and
    die of it). A second signal stops at once.
    """
    import uvicorn

    host, port = sock.getsockname()[:2]
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}/v1"

    def ready() -> None:
        if announce is not None:
            announce(url)

    class _Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            if self.should_exit:  # a second signal: stop now
                self.force_exit = True
                return
            state.draining = True
            self.should_exit = True

    config = uvicorn.Config(build_app(state, ready), log_level=log_level, access_log=False,
                            timeout_graceful_shutdown=None, lifespan="on", server_header=False)
    server = _Server(config)
    server.run(sockets=[sock])
    return bool(server.started)


def print_ready(url: str) -> None:
    """Say where the server listens (one line on stderr; tests wait for it)."""
    print(f"core-inference serve: listening on {url}", file=sys.stderr, flush=True)


__all__ = ["ServerState", "bind", "build_app", "print_ready", "run"]
