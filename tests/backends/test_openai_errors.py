"""The ``openai`` backend against a hostile server written here (stdlib ``http.server`` on
127.0.0.1): error statuses with their bodies, malformed and cut streams, a server that never
answers, retries before the first token only, a refused port, and vLLM's token-id forms.

The server's behaviour is chosen by the prompt (or the chat's last message): ``"ok"`` streams
numbered words, ``"status 503"`` answers 503, ``"cut"`` breaks the stream, and so on.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

import core_inference as ci
from core_inference.backends.openai import (
    OpenAIBackend,
    RemoteConnectError,
    RemoteHTTPError,
    RemoteProtocolError,
    RemoteTimeout,
)
from core_inference.protocols import TextModel

pytest.importorskip("httpx2", reason="needs core-inference[openai]")

WORDS = [f" w{i}" for i in range(1000)]
BASE_ID = 1000  # the id of WORDS[i] is BASE_ID + i


class Hostile(ThreadingHTTPServer):
    """The server and what it saw."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.seen: Counter[str] = Counter()  # scenario -> requests
        self.bodies: list[dict[str, Any]] = []
        self.gone = threading.Event()  # a streaming client left
        self.models = ["m"]
        self.token_ids = True  # answer return_token_ids as vLLM does
        self.api_key = ""  # when set, completions need it
        self.flavor = "vllm"  # or "llama.cpp": its /tokenize, /props and /v1/models meta
        self.lock = threading.Lock()
        self.running = self.most = 0  # "busy" requests running now, and at most
        self.stop = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class Handler(BaseHTTPRequestHandler):
    server: Hostile
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def _send_json(self, status: int, body: object, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        llama = self.server.flavor == "llama.cpp"
        if llama and self.path == "/props":
            self._send_json(200, {"default_generation_settings": {"n_ctx": 1024}, "total_slots": 4})
        elif llama and self.path == "/v1/models":
            self._send_json(200, {"object": "list", "data": [
                {"id": m, "object": "model", "meta": {"n_ctx_train": 8192, "n_vocab": 262144}}
                for m in self.server.models]})
        elif self.path == "/v1/models":
            self._send_json(200, {"object": "list", "data": [
                {"id": m, "object": "model", "max_model_len": 4096} for m in self.server.models]})
        else:
            self._send_json(404, {"detail": "Not Found"})

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        body = json.loads(self.rfile.read(length) or b"{}")
        self.server.bodies.append(body)
        if self.path == "/tokenize" and self.server.flavor == "llama.cpp":
            # llama-server: "content" (no "prompt"), no BOS unless add_special
            bos = [1] if body.get("add_special") else []
            self._send_json(200, {"tokens": bos + [len(w) for w in body.get("content", "").split()]})
            return
        if self.path == "/detokenize" and self.server.flavor == "llama.cpp":
            self._send_json(200, {"content": " ".join("x" * i for i in body["tokens"][1:])})
            return
        if self.path == "/tokenize":  # vLLM's form
            words = body.get("prompt", "").split()
            self._send_json(200, {"tokens": [1] + [len(w) for w in words], "count": len(words) + 1,
                                  "max_model_len": 4096})
            return
        if self.path == "/detokenize":
            self._send_json(200, {"prompt": " ".join("x" * i for i in body["tokens"][1:])})
            return
        if self.path not in ("/v1/completions", "/v1/chat/completions"):
            self._send_json(404, {"detail": "Not Found"})
            return
        if self.server.api_key and self.headers.get("Authorization") != f"Bearer {self.server.api_key}":
            self._send_json(401, {"error": {"message": "Incorrect API key provided",
                                            "code": "invalid_api_key"}})
            return
        if body.get("model") not in self.server.models:
            self._send_json(404, {"error": {"message": f"The model `{body.get('model')}` does not exist.",
                                            "type": "NotFoundError", "code": "model_not_found"}})
            return
        chat = self.path.endswith("chat/completions")
        prompt = body["messages"][-1]["content"] if chat else body["prompt"]
        scenario = prompt.split()[0] if prompt != "Hello" else "ok"
        self.server.seen[scenario] += 1
        getattr(self, "scenario_" + scenario.replace(" ", "_").replace("-", "_"))(body, chat, prompt)

    # -- streams -------------------------------------------------------------------

    def _start_sse(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True

    def _event(self, data: object) -> None:
        text = data if isinstance(data, str) else json.dumps(data)
        self.wfile.write(f"data: {text}\n\n".encode())
        self.wfile.flush()

    def _chunk(self, body: dict[str, Any], chat: bool, i: int | None, reason: str | None = None,
               n_prompt: int = 3) -> dict[str, Any]:
        text = WORDS[i] if i is not None else ""
        choice: dict[str, Any] = {"index": 0, "finish_reason": reason, "logprobs": None}
        if chat:
            choice["delta"] = {"content": text} if i is not None else {}
        else:
            choice["text"] = text
        if body.get("return_token_ids") and self.server.token_ids:
            choice["token_ids"] = [BASE_ID + i] if i is not None else []
        out: dict[str, Any] = {"object": "chunk", "choices": [choice]}
        if (body.get("stream_options") or {}).get("continuous_usage_stats"):
            out["usage"] = {"prompt_tokens": n_prompt, "completion_tokens": 0 if i is None else i + 1}
        return out

    def scenario_ok(self, body: dict[str, Any], chat: bool, prompt: str) -> None:
        n = body.get("max_tokens", 16)
        if not body.get("stream"):
            self._send_json(200, {"choices": [self._chunk(body, chat, 0, "length")["choices"][0]],
                                  "usage": {"prompt_tokens": 3, "completion_tokens": 1}})
            return
        self._start_sse()
        for i in range(n):
            self._event(self._chunk(body, chat, i))
        self._event(self._chunk(body, chat, None, "length"))
        self._event({"object": "chunk", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": n}})
        self._event("[DONE]")

    def scenario_eos(self, body: dict[str, Any], chat: bool, prompt: str) -> None:
        """Three words, then the model's end (finish_reason "stop")."""
        self._start_sse()
        for i in range(3):
            self._event(self._chunk(body, chat, i))
        self._event(self._chunk(body, chat, None, "stop"))
        self._event("[DONE]")

    def scenario_full(self, body: dict[str, Any], chat: bool, prompt: str) -> None:
        """Two words, then "length" well before max_tokens: the server's context is full."""
        self._start_sse()
        for i in range(2):
            self._event(self._chunk(body, chat, i))
        self._event(self._chunk(body, chat, None, "length"))
        self._event("[DONE]")

    def scenario_multi(self, body: dict[str, Any], chat: bool, prompt: str) -> None:
        """Chunks of several tokens each (vLLM under load), one of them with no ids at all."""
        self._start_sse()
        self._event({"choices": [{"index": 0, "text": " a", "token_ids": [], "finish_reason": None}]})
        self._event({"choices": [{"index": 0, "text": "bc", "token_ids": [7, 8], "finish_reason": None}]})
        self._event({"choices": [{"index": 0, "text": "d", "token_ids": [9], "finish_reason": "stop"}]})
        self._event("[DONE]")

    def scenario_logprob_ids(self, body: dict[str, Any], chat: bool, prompt: str) -> None:
        """vLLM's ``return_tokens_as_token_ids``: ids as logprobs tokens "token_id:N"."""
        self._start_sse()
        for i in range(3):
            tok = f"token_id:{BASE_ID + i}"
            lp = {"content": [{"token": tok, "logprob": -0.1}]} if chat else {"tokens": [tok]}
            choice: dict[str, Any] = {"index": 0, "logprobs": lp, "finish_reason": None}
            choice.update({"delta": {"content": WORDS[i]}} if chat else {"text": WORDS[i]})
            self._event({"choices": [choice]})
        self._event(self._chunk(body, chat, None, "stop"))
        self._event("[DONE]")

    def scenario_busy(self, body: dict[str, Any], chat: bool, prompt: str) -> None:
        """A normal stream that takes 0.2 s, counting how many run at once."""
        with self.server.lock:
            self.server.running += 1
            self.server.most = max(self.server.most, self.server.running)
        try:
            time.sleep(0.2)
            self.scenario_ok(body, chat, prompt)
        finally:
            with self.server.lock:
                self.server.running -= 1

    def scenario_slow(self, body: dict[str, Any], chat: bool, prompt: str) -> None:
        """A word every 20 ms until the client leaves (noticed when a write fails)."""
        self._start_sse()
        try:
            for i in range(100_000):
                self._event(self._chunk(body, chat, i % len(WORDS)))
                time.sleep(0.02)
        except OSError:
            self.server.gone.set()

    # -- failures ------------------------------------------------------------------

    def scenario_status(self, body: dict[str, Any], chat: bool, prompt: str) -> None:
        """``status N`` answers N with an OpenAI error object (``status N fastapi``: FastAPI's form)."""
        parts = prompt.split()
        code = int(parts[1])
        if "fastapi" in parts:
            self._send_json(code, {"detail": f"fastapi says {code}"})
        else:
            self._send_json(code, {"error": {"message": f"server says {code}", "type": "bad_thing",
                                             "param": "temperature", "code": code}},
                            {"Retry-After": "0"} if code in (429, 503) else None)

    def scenario_flaky(self, body: dict[str, Any], chat: bool, prompt: str) -> None:
        """503 twice, then a normal stream."""
        if self.server.seen["flaky"] <= 2:
            self._send_json(503, {"error": {"message": "warming up"}})
        else:
            self.scenario_ok(body, chat, prompt)

    def scenario_reset(self, body: dict[str, Any], chat: bool, prompt: str) -> None:
        """The connection dropped before any answer, once; then a normal stream."""
        if self.server.seen["reset"] == 1:
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
        else:
            self.scenario_ok(body, chat, prompt)

    def scenario_context(self, body: dict[str, Any], chat: bool, prompt: str) -> None:
        self._send_json(400, {"object": "error", "message": (
            "This model's maximum context length is 4096 tokens. However, you requested 5000 tokens "
            "(4000 in the messages, 1000 in the completion). Please reduce the length."),
            "type": "BadRequestError", "param": None, "code": 400})

    def scenario_malformed(self, body: dict[str, Any], chat: bool, prompt: str) -> None:
        self._start_sse()
        self._event(self._chunk(body, chat, 0))
        self.wfile.write(b"data: {this is not json\n\n")

    def scenario_midstream_error(self, body: dict[str, Any], chat: bool, prompt: str) -> None:
        self._start_sse()
        self._event(self._chunk(body, chat, 0))
        self._event({"error": {"message": "the engine fell over", "type": "InternalError", "code": 500}})
        self._event("[DONE]")

    def scenario_cut(self, body: dict[str, Any], chat: bool, prompt: str) -> None:
        """Two words, then the connection closes: no finish reason, no [DONE]."""
        self._start_sse()
        for i in range(2):
            self._event(self._chunk(body, chat, i))

    def scenario_cut_chunked(self, body: dict[str, Any], chat: bool, prompt: str) -> None:
        """Chunked transfer encoding broken off inside a chunk."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        event = f"data: {json.dumps(self._chunk(body, chat, 0))}\n\n".encode()
        self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
        self.wfile.write(b"400\r\ndata: {\"cho")  # promises 1024 bytes, sends 15
        self.wfile.flush()
        self.close_connection = True

    def scenario_interrupted(self, body: dict[str, Any], chat: bool, prompt: str) -> None:
        """Two words, then [DONE] with no finish reason (llama-cpp-python, interrupted)."""
        self._start_sse()
        for i in range(2):
            self._event(self._chunk(body, chat, i))
        self._event("[DONE]")

    def scenario_empty(self, body: dict[str, Any], chat: bool, prompt: str) -> None:
        """An empty stream; asked again unstreamed, the reason as a 400."""
        if body.get("stream"):
            self._start_sse()
        else:
            self._send_json(400, {"error": {"message": "the prompt is bad", "type": "invalid_request_error"}})

    def scenario_moved(self, body: dict[str, Any], chat: bool, prompt: str) -> None:
        self.send_response(307)
        self.send_header("Location", "https://elsewhere.example/v1/completions")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def scenario_hang(self, body: dict[str, Any], chat: bool, prompt: str) -> None:
        """Never answers (until the test ends)."""
        self.server.stop.wait(30)

    def scenario_html(self, body: dict[str, Any], chat: bool, prompt: str) -> None:
        """A proxy's HTML error page with status 502."""
        data = b"<html><body>502 Bad Gateway</body></html>"
        self.send_response(502)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture(scope="module")
def hostile() -> Iterator[Hostile]:
    server = Hostile()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.stop.set()
        server.shutdown()
        server.server_close()
        thread.join(10)


@pytest.fixture
def model(hostile: Hostile) -> Iterator[TextModel]:
    hostile.seen.clear()
    with OpenAIBackend().load_model(hostile.url, timeout=10, retries=2) as m:
        yield m


# -- loading -------------------------------------------------------------------------


def test_url_loads_through_the_registry_with_the_only_model(hostile: Hostile) -> None:
    with ci.load_model(hostile.url) as m:
        assert m.model_type == "openai"
        assert m.info().architecture == "openai:m" and m.context_len == 4096
        caps = m.capabilities
        assert caps.token_ids and caps.tokenize and not caps.logits and caps.async_engine
        assert m.tokenize("a bb ccc") == [1, 1, 2, 3]


def test_model_and_api_key_keywords_reach_the_server(hostile: Hostile) -> None:
    with ci.load_model(hostile.url, model="m", api_key="sk-test", token_ids="none") as m:
        assert not m.capabilities.token_ids
        assert [t.id for t in m.generate("ok", max_tokens=2)] == [-1, -1]
    assert hostile.bodies[-1]["model"] == "m"


def test_several_models_need_a_name(hostile: Hostile) -> None:
    hostile.models = ["a", "b"]
    try:
        with pytest.raises(ci.ModelLoadError, match=r"'a', 'b'.*model="):
            ci.load_model(hostile.url)
        with ci.load_model(hostile.url, model="b") as m:
            assert m.info().architecture == "openai:b"
    finally:
        hostile.models = ["m"]


def test_a_wrong_model_or_key_fails_at_load_with_the_servers_message(hostile: Hostile) -> None:
    with pytest.raises(ci.ModelLoadError, match="The model `nope` does not exist") as info:
        ci.load_model(hostile.url, model="nope")
    assert isinstance(info.value.__cause__, RemoteHTTPError) and info.value.__cause__.status == 404
    hostile.api_key = "sk-right"
    try:
        with pytest.raises(ci.ModelLoadError, match="Incorrect API key"):
            ci.load_model(hostile.url, api_key="sk-wrong")
        with ci.load_model(hostile.url, api_key="sk-right") as m:
            assert m.generate("ok", max_tokens=1).text() == WORDS[0]
    finally:
        hostile.api_key = ""


def test_a_llama_cpp_server(hostile: Hostile) -> None:
    hostile.flavor = "llama.cpp"
    try:
        with ci.load_model(hostile.url) as m:
            assert m.context_len == 1024 and m.info().vocab_size == 262144  # /props: the loaded context
            assert m.capabilities.parallel_slots == 4  # its -np
            assert m.tokenize("a bb") == [1, 1, 2]  # with its BOS (add_special)
            assert m.detokenize([1, 1, 2]) == "x xx"
            list(m.generate("ok", max_tokens=1, temperature=0.5))
            sent = hostile.bodies[-1]  # its defaults are not "off": every option is sent
            assert (sent["top_k"], sent["top_p"], sent["repeat_penalty"]) == (0, 1.0, 1.0)
            assert "repetition_penalty" not in sent and "continuous_usage_stats" not in sent["stream_options"]
        with ci.load_model(hostile.url, parallel_slots=2, context_len=512) as m:
            assert (m.capabilities.parallel_slots, m.context_len) == (2, 512)  # asked for: kept
    finally:
        hostile.flavor = "vllm"


def test_unknown_keyword_is_still_a_type_error(hostile: Hostile) -> None:
    with pytest.raises(TypeError, match="modle"):
        ci.load_model(hostile.url, modle="m")
    with pytest.raises(TypeError, match="modle"):
        OpenAIBackend().load_model(hostile.url, modle="m")
    with pytest.raises(ValueError, match="timeout"):
        OpenAIBackend().load_model(hostile.url, timeout=-1)


def test_refused_port_is_a_load_error_naming_the_cause() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    with pytest.raises(ci.ModelLoadError) as info:
        OpenAIBackend().load_model(f"http://127.0.0.1:{port}/v1", retries=0)
    assert isinstance(info.value.__cause__, RemoteConnectError)
    assert "cannot connect" in str(info.value) and info.value.path == f"http://127.0.0.1:{port}/v1"


def test_a_bare_host_means_its_v1(hostile: Hostile) -> None:
    with OpenAIBackend().load_model(hostile.url[: -len("/v1")]) as m:
        assert "".join(t.text for t in m.generate("ok", max_tokens=2)) == " w0 w1"


# -- streams and token ids -----------------------------------------------------------


def test_token_ids_text_and_usage(model: TextModel, hostile: Hostile) -> None:
    stream = model.generate("ok", max_tokens=5)
    tokens = list(stream)
    assert [(t.id, t.text) for t in tokens] == [(BASE_ID + i, WORDS[i]) for i in range(5)]
    assert stream.finish_reason == "length" and stream.prompt_tokens == 3
    assert stream.metrics.generated_tokens == 5 and stream.metrics.prompt_tokens == 3
    sent = hostile.bodies[-1]
    assert sent["return_token_ids"] is True and sent["stream"] is True and sent["max_tokens"] == 5
    assert sent["temperature"] == 0.0 and "top_k" not in sent and "repetition_penalty" not in sent


def test_sampling_options_are_sent(model: TextModel, hostile: Hostile) -> None:
    list(model.generate("ok", max_tokens=2, temperature=0.7, top_k=5, top_p=0.9, repeat_penalty=1.2, seed=7))
    sent = hostile.bodies[-1]
    assert (sent["temperature"], sent["top_k"], sent["top_p"], sent["repetition_penalty"], sent["seed"]) == (
        0.7, 5, 0.9, 1.2, 7)


def test_extra_body_goes_with_every_request(hostile: Hostile) -> None:
    with OpenAIBackend().load_model(hostile.url, extra_body={"min_p": 0.1}) as m:
        list(m.generate("ok", max_tokens=1))
    assert hostile.bodies[-1]["min_p"] == 0.1


def test_stop_strings_and_stop_ids(model: TextModel) -> None:
    stream = model.generate("ok", max_tokens=10, stop=["w3"])
    assert "".join(t.text for t in stream) == " w0 w1 w2 "
    assert stream.finish_reason == "stop" and stream.stop == "w3"
    stream = model.generate("ok", max_tokens=10, stop_tokens=[BASE_ID + 2])
    assert [t.id for t in stream] == [BASE_ID, BASE_ID + 1]
    assert stream.finish_reason == "stop" and stream.stop == BASE_ID + 2


def test_finish_reasons_from_the_server(model: TextModel) -> None:
    stream = model.generate("eos", max_tokens=10)
    assert len(list(stream)) == 3 and stream.finish_reason == "end_of_text"
    stream = model.generate("full", max_tokens=10)
    assert len(list(stream)) == 2 and stream.finish_reason == "context_full"


def test_chat_streams_with_ids(model: TextModel, hostile: Hostile) -> None:
    stream = model.chat([{"role": "user", "content": "ok"}], max_tokens=3)
    assert [(t.id, t.text) for t in stream] == [(BASE_ID + i, WORDS[i]) for i in range(3)]
    assert hostile.bodies[-1]["messages"] == [{"role": "user", "content": "ok"}]
    with pytest.raises(NotImplementedError, match="chat"):
        model.chat_prompt([{"role": "user", "content": "ok"}])


def test_several_ids_in_one_chunk(model: TextModel) -> None:
    tokens = list(model.generate("multi", max_tokens=10))
    assert [(t.id, t.text) for t in tokens] == [(7, ""), (8, " abc"), (9, "d")]


@pytest.mark.parametrize("chat", [False, True])
def test_ids_from_logprobs_tokens(hostile: Hostile, chat: bool) -> None:
    with OpenAIBackend().load_model(hostile.url, token_ids="logprobs") as m:
        stream = m.chat([{"role": "user", "content": "logprob-ids"}]) if chat else m.generate("logprob-ids")
        assert [(t.id, t.text) for t in stream] == [(BASE_ID + i, WORDS[i]) for i in range(3)]
    sent = hostile.bodies[-1]
    assert sent["return_tokens_as_token_ids"] is True
    assert sent["logprobs"] is True if chat else sent["logprobs"] == 0


def test_text_only_server(hostile: Hostile) -> None:
    hostile.token_ids = False
    try:
        with OpenAIBackend().load_model(hostile.url) as m:
            assert not m.capabilities.token_ids and m.capabilities.classify == ""
            assert [(t.id, t.text) for t in m.generate("ok", max_tokens=2)] == [(-1, " w0"), (-1, " w1")]
            with pytest.raises(ValueError, match="stop_tokens"):
                list(m.generate("ok", stop_tokens=[5]))
    finally:
        hostile.token_ids = True


def test_agenerate_streams(model: TextModel) -> None:
    import asyncio

    async def run() -> list[str]:
        return [t.text async for t in model.agenerate("ok", max_tokens=3)]

    assert asyncio.run(run()) == WORDS[:3]


def test_batch_generate_and_classify_are_concurrent_requests(model: TextModel, hostile: Hostile) -> None:
    results = model.batch_generate(["ok", "status 400", "eos"], max_tokens=4)
    assert [r.text for r in results] == ["".join(WORDS[:4]), "", "".join(WORDS[:3])]
    assert [r.finish_reason for r in results] == ["length", "error", "end_of_text"]
    assert isinstance(results[1].err, RemoteHTTPError) and results[1].err.status == 400
    out = model.classify(["ok", "ok"])
    assert [(r.token.id, r.token.text, r.prompt_tokens) for r in out] == [(BASE_ID, WORDS[0], 3)] * 2
    assert "stream" not in hostile.bodies[-1] and hostile.bodies[-1]["max_tokens"] == 1
    with pytest.raises(ValueError, match="logits"):
        model.classify(["ok"], return_logits=True)


def test_batch_and_classify_requests_are_bounded_by_the_slots(hostile: Hostile) -> None:
    with OpenAIBackend().load_model(hostile.url, parallel_slots=3) as m:
        hostile.most = 0
        results = m.batch_generate(["busy"] * 9, max_tokens=2)
        assert [r.text for r in results] == [WORDS[0] + WORDS[1]] * 9
        assert 1 < hostile.most <= 3  # concurrent, never more than the model's slots
        hostile.most = 0
        assert [r.token.id for r in m.classify(["busy"] * 9)] == [BASE_ID] * 9
        assert 1 < hostile.most <= 3


# -- cancellation --------------------------------------------------------------------


def test_break_closes_the_http_stream(model: TextModel, hostile: Hostile) -> None:
    hostile.gone.clear()
    for tok in model.generate("slow", max_tokens=10_000):
        assert tok.text
        break
    assert hostile.gone.wait(5), "the server still streams to a client that left"


def test_cancel_closes_the_http_stream(model: TextModel, hostile: Hostile) -> None:
    hostile.gone.clear()
    ctx = ci.Context.background().with_cancel()
    got = []
    with pytest.raises(ci.Cancelled):
        for tok in model.generate("slow", max_tokens=10_000, ctx=ctx):
            got.append(tok)
            if len(got) == 2:
                ctx.cancel()
    assert len(got) == 2
    assert hostile.gone.wait(5), "the server still streams to a cancelled call"


def test_async_break_closes_the_http_stream(model: TextModel, hostile: Hostile) -> None:
    import asyncio

    hostile.gone.clear()

    async def first() -> None:
        async for _tok in model.agenerate("slow", max_tokens=10_000):
            break

    asyncio.run(first())
    assert hostile.gone.wait(5)


# -- errors --------------------------------------------------------------------------


@pytest.mark.parametrize("status", [400, 401, 404, 422, 500])
def test_error_statuses_carry_the_servers_message(model: TextModel, hostile: Hostile, status: int) -> None:
    stream = model.generate(f"status {status}")
    with pytest.raises(RemoteHTTPError) as info:
        list(stream)
    err = info.value
    assert err.status == status and err.server_message == f"server says {status}"
    assert err.error_type == "bad_thing" and err.param == "temperature"
    assert f"server says {status}" in str(err) and isinstance(err, ci.EngineError)
    assert stream.finish_reason == "error" and stream.err is err and model.err() is err
    assert hostile.seen["status"] == 1  # never retried


def test_fastapi_error_body(model: TextModel) -> None:
    with pytest.raises(RemoteHTTPError, match="fastapi says 500") as info:
        list(model.chat([{"role": "user", "content": "status 500 fastapi"}]))
    assert info.value.status == 500


def test_html_error_page(model: TextModel) -> None:
    with pytest.raises(RemoteHTTPError, match="502 Bad Gateway") as info:
        list(model.generate("html"))
    assert info.value.status == 502


def test_a_redirect_names_the_new_address(model: TextModel) -> None:
    with pytest.raises(RemoteHTTPError, match=r"redirected to https://elsewhere\.example") as info:
        list(model.generate("moved"))
    assert info.value.status == 307


def test_retries_before_the_first_token(model: TextModel, hostile: Hostile) -> None:
    assert "".join(t.text for t in model.generate("flaky", max_tokens=2)) == " w0 w1"
    assert hostile.seen["flaky"] == 3
    assert "".join(t.text for t in model.generate("reset", max_tokens=2)) == " w0 w1"
    assert hostile.seen["reset"] == 2


def test_retries_give_up(model: TextModel, hostile: Hostile) -> None:
    with pytest.raises(RemoteHTTPError, match="server says 503") as info:
        list(model.generate("status 503"))
    assert info.value.status == 503 and info.value.retry_after == 0
    assert hostile.seen["status"] == 3  # the first try and two retries


def test_no_retry_after_the_first_token(model: TextModel, hostile: Hostile) -> None:
    got = []
    with pytest.raises(RemoteProtocolError, match="before its end"):
        for tok in model.generate("cut", max_tokens=10):
            got.append(tok.text)
    assert got == WORDS[:2] and hostile.seen["cut"] == 1


def test_a_cut_after_the_last_token_asked_for_is_no_error(model: TextModel) -> None:
    stream = model.generate("cut", max_tokens=2)
    assert [t.text for t in stream] == WORDS[:2] and stream.finish_reason == "length"


def test_done_without_a_finish_reason_is_a_cut_stream(model: TextModel) -> None:
    got = []
    with pytest.raises(RemoteProtocolError, match="no finish reason"):
        for tok in model.generate("interrupted", max_tokens=10):
            got.append(tok.text)
    assert got == WORDS[:2]


def test_an_empty_stream_is_asked_again_for_its_reason(model: TextModel, hostile: Hostile) -> None:
    with pytest.raises(RemoteHTTPError, match="the prompt is bad") as info:
        list(model.generate("empty", max_tokens=10))
    assert info.value.status == 400 and hostile.seen["empty"] == 2
    assert hostile.bodies[-1]["max_tokens"] == 1 and "stream" not in hostile.bodies[-1]


def test_chunked_stream_cut_midway(model: TextModel, hostile: Hostile) -> None:
    got = []
    with pytest.raises(RemoteProtocolError) as info:
        for tok in model.generate("cut-chunked", max_tokens=10):
            got.append(tok.text)
    assert got == WORDS[:1] and hostile.seen["cut-chunked"] == 1
    assert info.value.url.endswith("/v1/completions")


def test_malformed_stream_line(model: TextModel) -> None:
    stream = model.generate("malformed", max_tokens=10)
    with pytest.raises(RemoteProtocolError, match=r"malformed stream chunk.*this is not json"):
        list(stream)
    assert stream.finish_reason == "error"


def test_error_sent_mid_stream(model: TextModel) -> None:
    with pytest.raises(RemoteHTTPError, match="the engine fell over") as info:
        list(model.generate("midstream-error", max_tokens=10))
    assert info.value.status == 500


def test_context_length_error_is_typed(model: TextModel) -> None:
    with pytest.raises(ci.ContextLengthExceeded) as info:
        list(model.generate("context"))
    assert (info.value.limit, info.value.requested) == (4096, 5000)


def test_a_server_that_never_answers_times_out(hostile: Hostile) -> None:
    with OpenAIBackend().load_model(hostile.url, timeout=0.5) as m:
        stream = m.generate("hang")
        with pytest.raises(RemoteTimeout, match=r"no answer within 0\.5s") as info:
            list(stream)
        assert isinstance(info.value, TimeoutError) and stream.finish_reason == "error"


def test_a_server_that_went_away(hostile: Hostile) -> None:
    server = Hostile()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    # no keep-alive: a kept connection's handler thread would outlive the server
    m = OpenAIBackend().load_model(server.url, retries=1, headers={"Connection": "close"})
    try:
        server.shutdown()
        server.server_close()
        thread.join(10)
        with pytest.raises(RemoteConnectError, match="cannot connect"):
            list(m.generate("ok"))
    finally:
        m.close()


def test_tokenize_errors_are_mapped(hostile: Hostile) -> None:
    server = Hostile()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    m = OpenAIBackend().load_model(server.url, retries=0, headers={"Connection": "close"})
    try:
        server.shutdown()
        server.server_close()
        thread.join(10)
        with pytest.raises(RemoteConnectError):
            m.tokenize("a b")
    finally:
        m.close()
