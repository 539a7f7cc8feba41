"""``core-inference serve`` as a real subprocess on 127.0.0.1, driven by the official ``openai`` client.

One server per module (``--parallel 2 --queue 2``) on the embedded instruct model; the
auth and SIGTERM cases start their own. No timed assertions: counts, statuses and
finish reasons, with generous waits where a process has to react.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("starlette", reason="needs core-inference[server]")
pytest.importorskip("uvicorn", reason="needs core-inference[server]")
openai = pytest.importorskip("openai", reason="the official openai client")
httpx2 = pytest.importorskip("httpx2")

from core_inference.server.metrics import parse as parse_metrics  # noqa: E402
from core_inference.server.process import ServerProcess  # noqa: E402

CHAT = [{"role": "user", "content": "Name three colours."}]
PARALLEL, QUEUE = 2, 2


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    with ServerProcess(["--parallel", str(PARALLEL), "--queue", str(QUEUE), "--threads", "1",
                        "--max-body", str(2**20)]) as proc:
        yield proc


@pytest.fixture(scope="module")
def model_id(server: ServerProcess) -> str:
    data = httpx2.get(server.url + "/models").json()
    return str(data["data"][0]["id"])


@pytest.fixture
def client(server: ServerProcess) -> Iterator[Any]:
    with openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0) as c:
        yield c


def metrics(server: ServerProcess) -> dict[str, float]:
    return parse_metrics(httpx2.get(server.base + "/metrics").text)


def wait_idle(server: ServerProcess, timeout: float = 30.0) -> dict[str, float]:
    """The metrics once no request runs or waits (a generous bound: the server must react)."""
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(server)
        if m["core_inference_requests_running"] == 0 and m["core_inference_requests_waiting"] == 0:
            return m
        assert time.monotonic() < deadline, f"slots still held: {m}"
        time.sleep(0.05)


def post_root(server: ServerProcess, path: str, body: dict[str, Any]) -> Any:
    return httpx2.post(server.base + path, json=body, timeout=60)


def post(server: ServerProcess, path: str, body: bytes | dict[str, Any], **kw: Any) -> Any:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx2.post(server.url + path, content=content, headers={"content-type": "application/json"},
                       timeout=60, **kw)


# -- the openai client, sync and async, streaming and not -----------------------------------------


def test_models_and_health(server: ServerProcess, client: Any, model_id: str) -> None:
    assert [m.id for m in client.models.list()] == [model_id]
    assert httpx2.get(server.base + "/health").json() == {"status": "ok"}


def test_chat_not_streaming_usage_and_length(client: Any, model_id: str) -> None:
    out = client.chat.completions.create(model=model_id, messages=CHAT, max_tokens=8, temperature=0)
    assert out.object == "chat.completion"
    choice = out.choices[0]
    assert choice.finish_reason == "length"
    assert choice.message.role == "assistant" and choice.message.content
    assert out.usage.completion_tokens == 8
    assert out.usage.prompt_tokens > 5
    assert out.usage.total_tokens == out.usage.prompt_tokens + 8


def test_chat_ends_on_its_own_with_stop(client: Any, model_id: str) -> None:
    out = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "Say hi"}],
                                         max_completion_tokens=200, temperature=0)
    assert out.choices[0].finish_reason == "stop"
    assert 0 < out.usage.completion_tokens < 200


def test_chat_streaming_with_usage(client: Any, model_id: str) -> None:
    whole = client.chat.completions.create(model=model_id, messages=CHAT, max_tokens=12, temperature=0)
    stream = client.chat.completions.create(model=model_id, messages=CHAT, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content  # greedy: the same answer either way
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert reasons == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert all(c.usage is None for c in chunks[:-1])


def test_completions_stop_string(client: Any, model_id: str) -> None:
    prompt = "List of fruits: apple, banana,"
    full = client.completions.create(model=model_id, prompt=prompt, max_tokens=24, temperature=0)
    text = full.choices[0].text
    assert full.object == "text_completion" and full.usage.completion_tokens == 24
    cut = text.strip().split()[2]  # a word from the middle of the greedy answer
    stopped = client.completions.create(model=model_id, prompt=prompt, max_tokens=24, temperature=0,
                                        stop=[cut])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == text[: text.index(cut)]


def test_n_choices_with_seed(client: Any, model_id: str) -> None:
    args = dict(model=model_id, prompt="Once upon a time", max_tokens=10, temperature=1.0, n=2, seed=7)
    first = client.completions.create(**args)
    again = client.completions.create(**args)
    assert sorted(c.index for c in first.choices) == [0, 1]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]  # the seed decides
    assert first.usage.completion_tokens == 20


def test_async_client_streaming_and_not(server: ServerProcess, model_id: str) -> None:
    async def main() -> tuple[str, str, list[str | None]]:
        async with openai.AsyncOpenAI(base_url=server.url, api_key="unused", max_retries=0) as c:
            whole = await c.completions.create(model=model_id, prompt="The sky is", max_tokens=10,
                                               temperature=0)
            stream = await c.completions.create(model=model_id, prompt="The sky is", max_tokens=10,
                                                temperature=0, stream=True)
            parts, reasons = [], []
            async for chunk in stream:
                parts.append(chunk.choices[0].text)
                reasons.append(chunk.choices[0].finish_reason)
            return whole.choices[0].text, "".join(parts), reasons

    whole, streamed, reasons = asyncio.run(main())
    assert streamed == whole
    assert reasons[-1] == "length" and set(reasons[:-1]) == {None}


def test_async_chat_concurrent(server: ServerProcess, model_id: str) -> None:
    async def main() -> list[Any]:
        async with openai.AsyncOpenAI(base_url=server.url, api_key="unused", max_retries=0) as c:
            calls = [c.chat.completions.create(model=model_id, messages=CHAT, max_tokens=6, temperature=0)
                     for _ in range(PARALLEL)]
            return list(await asyncio.gather(*calls))

    outs = asyncio.run(main())
    assert len({o.choices[0].message.content for o in outs}) == 1  # outputs never mix
    assert all(o.usage.completion_tokens == 6 for o in outs)


def test_logprobs_completions_stream_and_not(client: Any, model_id: str) -> None:
    args = dict(model=model_id, prompt="The capital of France is", max_tokens=4, temperature=0, logprobs=2)
    whole = client.completions.create(**args).choices[0]
    lp = whole.logprobs
    assert "".join(lp.tokens) == whole.text and len(lp.token_logprobs) == 4
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        assert len(top) == 2 and chosen <= 0
        assert chosen == pytest.approx(max(top.values()), abs=1e-6)  # greedy: the likeliest token
    streamed = [c.choices[0] for c in client.completions.create(**args, stream=True)]
    values = [v for c in streamed if c.logprobs for v in c.logprobs.token_logprobs]
    assert values == pytest.approx(lp.token_logprobs, abs=1e-3)


def test_logprobs_chat(client: Any, model_id: str) -> None:
    out = client.chat.completions.create(model=model_id, messages=CHAT, max_tokens=3, temperature=0,
                                         logprobs=True, top_logprobs=3)
    content = out.choices[0].logprobs.content
    assert "".join(t.token for t in content) == out.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 3 and t.top_logprobs[0].logprob == pytest.approx(t.logprob, abs=1e-6)
        assert bytes(t.bytes).decode() == t.token


def test_tokenize_detokenize_and_token_ids(server: ServerProcess, model_id: str) -> None:
    """vLLM's /tokenize, /detokenize and return_token_ids (what the openai backend reads)."""
    tok = post_root(server, "/tokenize", {"model": model_id, "prompt": "Hello world"}).json()
    assert tok["count"] == len(tok["tokens"]) > 0 and tok["max_model_len"] > 0
    assert post_root(server, "/detokenize", {"tokens": tok["tokens"]}).json() == {"prompt": "Hello world"}
    chat = post_root(server, "/tokenize", {"messages": CHAT}).json()
    assert chat["count"] > len(tok["tokens"])
    out = post(server, "/completions", {"prompt": "The sky is", "max_tokens": 6, "temperature": 0,
                                        "return_token_ids": True}).json()["choices"][0]
    assert len(out["token_ids"]) == 6
    assert post_root(server, "/detokenize", {"tokens": out["token_ids"]}).json()["prompt"] == out["text"]
    body = {"prompt": "The sky is", "max_tokens": 6, "temperature": 0, "return_token_ids": True,
            "stream": True}
    with httpx2.stream("POST", server.url + "/completions", json=body, timeout=60) as r:
        ids = [i for line in r.iter_lines() if line.startswith("data: {")
               for i in json.loads(line[6:])["choices"][0].get("token_ids", [])]
    assert ids == out["token_ids"]


def test_detokenize_past_the_vocabulary_is_400_not_a_crash(server: ServerProcess) -> None:
    r = post_root(server, "/detokenize", {"tokens": [1, 10**9]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tokens[1]"
    assert post_root(server, "/detokenize", {"tokens": "abc"}).status_code == 400
    assert httpx2.get(server.base + "/health").status_code == 200


# -- bad requests ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("body", "param"), [
    ({"messages": "hi"}, "messages"),
    ({"messages": []}, "messages"),
    ({}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": CHAT, "max_tokens": "many"}, "max_tokens"),
    ({"messages": CHAT, "max_tokens": 10**30}, "max_tokens"),
    ({"messages": CHAT, "temperature": 7}, "temperature"),
    ({"messages": CHAT, "top_p": -1}, "top_p"),
    ({"messages": CHAT, "n": 0}, "n"),
    ({"messages": CHAT, "n": PARALLEL + 1}, "n"),
    ({"messages": CHAT, "stop": [""]}, "stop[0]"),
    ({"messages": CHAT, "stop": 3}, "stop"),
    ({"messages": CHAT, "stream": "yes"}, "stream"),
    ({"messages": CHAT, "stream_options": {"include_usage": True}}, "stream_options"),
    ({"messages": CHAT, "seed": 1.5}, "seed"),
    ({"messages": CHAT, "top_logprobs": 2}, "top_logprobs"),
    ({"messages": CHAT, "logprobs": True, "top_logprobs": 99}, "top_logprobs"),
])
def test_bad_field_is_400_naming_it(server: ServerProcess, body: dict[str, Any], param: str) -> None:
    r = post(server, "/chat/completions", body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error"
    assert param.split("[")[0] in err["message"]


@pytest.mark.parametrize("body", [b"{", b"", b"[1, 2]", b"\xff\xfe{}", b'{"prompt": NaN}', b"[" * 100_000])
def test_malformed_body_is_400(server: ServerProcess, body: bytes) -> None:
    r = post(server, "/completions", body)
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_openai_client_sees_the_field(client: Any, model_id: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=model_id, prompt="x", max_tokens=-3)
    assert info.value.body["param"] == "max_tokens"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="x", max_tokens=2)


def test_prompt_too_long_is_400(server: ServerProcess, model_id: str) -> None:
    r = post(server, "/completions", {"model": model_id, "prompt": "word " * 20_000, "max_tokens": 2})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "prompt"


def test_body_too_large_is_413(server: ServerProcess) -> None:
    before = metrics(server)
    r = post(server, "/chat/completions", b'{"messages": "' + b"x" * (2**20 + 10) + b'"}')
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "request_too_large"
    key = 'core_inference_requests_total{endpoint="/v1/chat/completions",status="413"}'
    assert metrics(server)[key] == before.get(key, 0) + 1


def test_unknown_route_and_method(server: ServerProcess) -> None:
    assert httpx2.get(server.url + "/nothing").status_code == 404
    assert httpx2.get(server.url + "/completions").status_code == 405


# -- disconnects and overload ---------------------------------------------------------------------


def test_disconnect_mid_stream_frees_the_slot(server: ServerProcess, model_id: str) -> None:
    wait_idle(server)
    before = metrics(server)
    body = {"model": model_id, "prompt": "Count to a thousand: 1, 2, 3,", "max_tokens": 2000,
            "temperature": 0, "stream": True}
    with httpx2.Client(timeout=60) as c, c.stream("POST", server.url + "/completions", json=body) as r:
        assert r.status_code == 200
        events = 0
        for line in r.iter_lines():
            if line.startswith("data: "):
                events += 1
                if events == 3:
                    break  # leaving the block closes the connection mid-stream
    after = wait_idle(server)
    gone, tokens = "core_inference_client_disconnects_total", "core_inference_generation_tokens_total"
    assert after[gone] == before[gone] + 1
    generated = after[tokens] - before[tokens]
    assert 3 <= generated < 100, generated  # stopped long before max_tokens
    # the slot is free: a request after it is served at once
    assert post(server, "/completions", {"prompt": "Hi", "max_tokens": 2}).status_code == 200


def _raw_post(server: ServerProcess, path: str, body: dict[str, Any]) -> socket.socket:
    """A request sent on a raw socket, left unread (closing the socket is the client leaving)."""
    host, port = server.base.removeprefix("http://").rsplit(":", 1)
    data = json.dumps(body).encode()
    sock = socket.create_connection((host, int(port)))
    sock.sendall(f"POST /v1{path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def wait_for(server: ServerProcess, name: str, value: float, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while metrics(server)[name] != value:
        assert time.monotonic() < deadline, f"{name} never became {value}: {metrics(server)}"
        time.sleep(0.02)


def test_disconnect_during_a_whole_answer_stops_it(server: ServerProcess, model_id: str) -> None:
    wait_idle(server)
    before = metrics(server)
    sock = _raw_post(server, "/completions", {"prompt": "Count: 1, 2, 3,", "max_tokens": 2000,
                                              "temperature": 0})
    wait_for(server, "core_inference_requests_running", 1)
    sock.close()
    after = wait_idle(server)
    gone = 'core_inference_requests_total{endpoint="/v1/completions",status="499"}'
    assert after[gone] == before.get(gone, 0) + 1
    tokens = "core_inference_generation_tokens_total"
    assert after[tokens] - before[tokens] < 1000  # stopped, not run to max_tokens


def test_disconnect_while_queued_leaves_the_queue(server: ServerProcess, model_id: str) -> None:
    wait_idle(server)
    before = metrics(server)
    long = {"model": model_id, "prompt": "Count: 1, 2, 3,", "max_tokens": 2000, "stream": True}
    holders = [_raw_post(server, "/completions", long) for _ in range(PARALLEL)]
    try:
        for sock in holders:  # their answers have begun (200): they hold their slots
            sock.settimeout(60)
            assert sock.recv(12) == b"HTTP/1.1 200"
        queued = _raw_post(server, "/completions", {"prompt": "Hi", "max_tokens": 2})
        wait_for(server, "core_inference_requests_waiting", 1)
        queued.close()
        wait_for(server, "core_inference_requests_waiting", 0)
    finally:
        for sock in holders:
            sock.close()
    after = wait_idle(server)
    gone = 'core_inference_requests_total{endpoint="/v1/completions",status="499"}'
    assert after[gone] == before.get(gone, 0) + 1  # the queued one; the streams had begun (200)
    assert post(server, "/completions", {"prompt": "Hi", "max_tokens": 2}).status_code == 200


def test_overload_queues_then_429(server: ServerProcess, model_id: str) -> None:
    wait_idle(server)
    total = PARALLEL + QUEUE + 2
    body = {"model": model_id, "prompt": "Write a long story:", "max_tokens": 48, "temperature": 0}

    async def main() -> list[int]:
        async with httpx2.AsyncClient(timeout=120, limits=httpx2.Limits(max_connections=total)) as c:
            async def one(i: int) -> int:
                await asyncio.sleep(0.05 * i)  # in order: the first ones take the slots, then the queue
                r = await c.post(server.url + "/completions", json=body)
                if r.status_code == 429:
                    assert r.json()["error"]["code"] == "rate_limit_exceeded"
                    assert r.headers["retry-after"]
                return int(r.status_code)

            return list(await asyncio.gather(*(one(i) for i in range(total))))

    before = metrics(server)
    statuses = asyncio.run(main())
    assert statuses.count(200) == PARALLEL + QUEUE and statuses.count(429) == total - PARALLEL - QUEUE
    after = wait_idle(server)
    key = 'core_inference_requests_total{endpoint="/v1/completions",status="429"}'
    assert after[key] == before.get(key, 0) + total - PARALLEL - QUEUE
    assert post(server, "/completions", {"prompt": "Hi", "max_tokens": 2}).status_code == 200


def test_metrics_page(server: ServerProcess) -> None:
    text = httpx2.get(server.base + "/metrics").text
    for name in ("requests_total", "prompt_tokens_total", "generation_tokens_total",
                 "time_to_first_token_seconds_bucket", "requests_running", "requests_waiting"):
        assert f"core_inference_{name}" in text
    m = parse_metrics(text)
    assert m['core_inference_requests_total{endpoint="/v1/chat/completions",status="400"}'] >= 1
    assert m["core_inference_time_to_first_token_seconds_count"] >= 1


# -- a server of its own: the API key, then SIGTERM with a stream in flight ------------------------


def test_api_key_then_sigterm_with_a_stream_in_flight() -> None:
    key = "s3cret-key"
    server = ServerProcess(["--parallel", "2", "--threads", "1", "--api-key", key])
    try:
        for path in ("/health", "/metrics", "/v1/models"):
            assert httpx2.get(server.base + path).status_code == 401
            r = httpx2.get(server.base + path, headers={"authorization": "Bearer wrong"})
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        with openai.OpenAI(base_url=server.url, api_key="wrong", max_retries=0) as bad, \
                pytest.raises(openai.AuthenticationError):
            bad.models.list()
        auth = {"authorization": f"Bearer {key}"}
        assert httpx2.get(server.base + "/health", headers=auth).status_code == 200

        with openai.OpenAI(base_url=server.url, api_key=key, max_retries=0) as c:
            model = c.models.list().data[0].id
            stream = c.chat.completions.create(model=model, messages=CHAT, max_tokens=40, temperature=0,
                                               stream=True, stream_options={"include_usage": True})
            chunks = [next(stream)]
            server.proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)  # let the server stop listening before the next request
            try:
                r = httpx2.get(server.base + "/health", headers=auth)
            except (httpx2.ConnectError, httpx2.RemoteProtocolError, httpx2.ReadError):
                pass  # refused: the server no longer listens
            else:
                assert r.status_code == 503, "a new request while draining must be refused"
            chunks += list(stream)  # the stream in flight finishes
        assert chunks[-1].usage.completion_tokens == 40
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
        assert server.proc.wait(60) == 0
    finally:
        server.kill()


def test_any_backend_an_async_engine_behind_serve(server: ServerProcess, model_id: str) -> None:
    """serve over the openai backend (an async engine) pointed at the module's server."""
    import core_inference as ci

    if "openai" not in ci.list_backends() or ci.get("openai").why_unavailable():
        pytest.skip("the openai backend is not available")
    direct = post(server, "/completions", {"prompt": "The sky is", "max_tokens": 6, "temperature": 0})
    with ServerProcess(["--model", server.url, "--backend", "openai", "--parallel", "2"]) as front, \
            openai.OpenAI(base_url=front.url, api_key="unused", max_retries=0) as c:
        assert [m.id for m in c.models.list()] == [model_id]
        out = c.completions.create(model=model_id, prompt="The sky is", max_tokens=6, temperature=0)
        assert out.choices[0].text == direct.json()["choices"][0]["text"]
        assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 6
        chunks = list(c.chat.completions.create(model=model_id, messages=CHAT, max_tokens=5, temperature=0,
                                                stream=True, stream_options={"include_usage": True}))
        assert chunks[-1].usage.completion_tokens == 5
        with pytest.raises(openai.BadRequestError) as info:  # a remote model gives no logits
            c.completions.create(model=model_id, prompt="x", max_tokens=2, logprobs=1)
        assert info.value.body["param"] == "logprobs"
        # a client leaving the front stops the back's generation too
        before = metrics(server)
        body = {"prompt": "Count: 1, 2, 3,", "max_tokens": 2000, "temperature": 0, "stream": True}
        with httpx2.stream("POST", front.url + "/completions", json=body, timeout=60) as r:
            for n, _line in enumerate(r.iter_lines()):
                if n == 6:
                    break
        after = wait_idle(server)
        tokens = "core_inference_generation_tokens_total"
        assert after[tokens] - before[tokens] < 200


# -- the command's own failures --------------------------------------------------------------------


def test_serve_fails_cleanly_on_a_port_in_use_and_a_missing_model(tmp_path: Any) -> None:
    import subprocess
    import sys

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "core_inference", "serve", "--port", str(port)],
                           capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "core_inference", "serve", "--port", "0", "--model",
                        str(tmp_path / "missing.gguf")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "missing.gguf" in r.stderr and "Traceback" not in r.stderr


def test_batch_invariant_server_answers_each_prompt_as_alone_whatever_else_it_serves() -> None:
    """``--engine-option batch_invariant=true``: a request's greedy answer does not depend on
    the requests generated beside it (here up to 4 at once, prompts of a few to ~300 tokens)."""
    import threading

    words = ["river", "valley", "green", "stone", "house", "light", "morning", "quiet", "market", "bread"]
    prompts = ["The capital of France is", "Name three colours:",
               " ".join(words[i % 10] for i in range(60)) + ". So",
               " ".join(words[(i * 3) % 10] for i in range(300)) + ". Then"]
    args = ["--parallel", "4", "--threads", "2", "--engine-option", "batch_invariant=true"]
    with ServerProcess(args) as srv, openai.OpenAI(base_url=srv.url, api_key="unused", max_retries=0) as c:
        model = c.models.list().data[0].id

        def ask(p: str) -> str:
            r = c.completions.create(model=model, prompt=p, max_tokens=12, temperature=0)
            return str(r.choices[0].text)

        alone = [ask(p) for p in prompts]
        together: dict[int, str] = {}

        def run(i: int) -> None:
            together[i] = ask(prompts[i % len(prompts)])

        for _ in range(2):
            pool = [threading.Thread(target=run, args=(i,)) for i in range(8)]
            for t in pool:
                t.start()
            for t in pool:
                t.join()
            assert [together[i] for i in range(8)] == alone * 2
