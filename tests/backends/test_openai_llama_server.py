"""The ``openai`` backend against an independent peer: llama-cpp-python's own server
(``python -m llama_cpp.server``, one thread) on the embedded instruct model, on 127.0.0.1.

It streams text only (no token ids), serves one request at a time, has ``/extras/tokenize``,
and its defaults are not "off" (repeat_penalty 1.1, top_k 40), so greedy runs here also
check that every option is sent to it explicitly.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import core_inference as ci
from core_inference.backends.openai import OpenAIBackend, RemoteConnectError, RemoteHTTPError
from core_inference.protocols import TextModel

pytest.importorskip("httpx2", reason="needs core-inference[openai]")
pytest.importorskip("llama_cpp.server.app", reason="needs llama-cpp-python[server]")
httpx2 = pytest.importorskip("httpx2")

PROMPT = "The capital of France is"
GREETING = [{"role": "user", "content": "Say hello."}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LlamaServer:
    """``python -m llama_cpp.server`` in a subprocess, its stderr and stdout in a temp file."""

    def __init__(self, model: Path) -> None:
        self.log = tempfile.NamedTemporaryFile(prefix="llama-server-", suffix=".log", delete=False)  # noqa: SIM115
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--host", "127.0.0.1",
             "--port", str(self.port), "--n_threads", "1"],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        self.url = f"http://127.0.0.1:{self.port}/v1"
        deadline = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama_cpp.server exited: {self.output()}")
            try:
                if httpx2.get(self.url + "/models", timeout=2).status_code == 200:
                    return
            except httpx2.TransportError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"llama_cpp.server did not answer: {self.output()}")
            time.sleep(0.2)

    def output(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        os.unlink(self.log.name)


@pytest.fixture(scope="module")
def server() -> Iterator[LlamaServer]:
    from core_inference.default_model import chat_model_path

    srv = LlamaServer(chat_model_path())
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def model(server: LlamaServer) -> Iterator[TextModel]:
    with ci.load_model(server.url, timeout=120) as m:
        yield m


def test_loads_the_only_model_text_only_with_tokenize(model: TextModel) -> None:
    caps = model.capabilities
    assert caps.parallel_slots == 1  # it serves one request at a time (and interrupts the older)
    assert not caps.token_ids and not caps.logits and caps.classify == ""
    assert caps.tokenize and caps.chat_template and caps.async_engine
    assert model.info().architecture.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    ids = model.tokenize("Hello world")
    assert ids and model.detokenize(ids).strip() == "Hello world"


def test_generate_is_greedy_and_deterministic(model: TextModel, server: LlamaServer) -> None:
    stream = model.generate(PROMPT, max_tokens=8)
    tokens = list(stream)
    assert len(tokens) == 8 and stream.finish_reason == "length" and stream.err is None
    assert all(t.id == -1 and t.text for t in tokens)  # one text chunk per token, no ids
    assert "Paris" in "".join(t.text for t in tokens)
    assert list(model.generate(PROMPT, max_tokens=8)) == tokens
    assert stream.metrics.generated_tokens == 8 and stream.metrics.total_duration > 0


def test_chat(model: TextModel) -> None:
    stream = model.chat(GREETING, max_tokens=24)
    assert "hello" in stream.text().lower()
    assert stream.finish_reason in ("length", "end_of_text")


def test_stop_strings(model: TextModel) -> None:
    full = model.generate(PROMPT, max_tokens=12).text()
    words = full.split()
    assert len(words) >= 3, full
    stop = words[2]
    stream = model.generate(PROMPT, max_tokens=12, stop=[stop, "never-seen"])
    assert stream.text() == full[: full.index(stop)]
    assert stream.finish_reason == "stop" and stream.stop == stop


def test_cancel_closes_the_request_and_frees_the_server(model: TextModel, server: LlamaServer) -> None:
    ctx = ci.Context.background().with_cancel()
    got = []
    with pytest.raises(ci.Cancelled):
        for tok in model.generate("Count from one to a thousand:", max_tokens=2000, ctx=ctx):
            got.append(tok)
            if len(got) == 2:
                ctx.cancel()
    assert len(got) == 2
    # llama-cpp-python serves one request at a time: had it gone on with the 2,000 tokens,
    # this one would wait behind it; it sees the client leave at its next chunk.
    deadline = time.monotonic() + 60
    while "disconnected" not in server.output() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "disconnected" in server.output()
    assert len(list(model.generate(PROMPT, max_tokens=2))) == 2


def test_break_then_async(model: TextModel) -> None:
    for _tok in model.generate(PROMPT, max_tokens=2000):
        break

    async def run() -> list[str]:
        return [t.text async for t in model.agenerate(PROMPT, max_tokens=4)]

    assert "".join(asyncio.run(run())) == model.generate(PROMPT, max_tokens=4).text()


def test_batch_generate(model: TextModel) -> None:
    """Requests one at a time (the bound is the model's one slot): none interrupts another."""
    prompts = [PROMPT, "One, two, three,"]
    results = model.batch_generate(prompts, max_tokens=5)
    assert [r.text for r in results] == [model.generate(p, max_tokens=5).text() for p in prompts]
    assert all(r.err is None and r.finish_reason == "length" for r in results)


def test_prompt_too_long_is_context_length_exceeded(model: TextModel) -> None:
    stream = model.generate("word " * 3000, max_tokens=2)
    with pytest.raises(ci.ContextLengthExceeded) as info:
        list(stream)
    assert info.value.limit == 2048 and info.value.requested > 2048
    # it answers a stream with 200 and nothing in it; the reason comes from asking again unstreamed
    assert "maximum context length" in str(info.value) and stream.finish_reason == "error"


def test_bad_field_is_the_servers_error(server: LlamaServer) -> None:
    with ci.load_model(server.url, extra_body={"max_tokens": "many"}, token_ids="none") as m:
        with pytest.raises(RemoteHTTPError, match="max_tokens") as info:
            list(m.generate(PROMPT))
        assert info.value.status == 500 and "valid integer" in info.value.server_message


def test_sampling_is_seeded(model: TextModel) -> None:
    one = model.generate(PROMPT, max_tokens=6, temperature=1.0, top_k=20, top_p=0.9, seed=3).text()
    assert model.generate(PROMPT, max_tokens=6, temperature=1.0, top_k=20, top_p=0.9, seed=3).text() == one


def test_a_stopped_server_is_a_connection_error() -> None:
    from core_inference.default_model import chat_model_path

    server = LlamaServer(chat_model_path())  # its own: this test stops it
    try:
        m = OpenAIBackend().load_model(server.url, retries=0, headers={"Connection": "close"})
        try:
            server.proc.terminate()
            server.proc.wait(30)
            with pytest.raises(RemoteConnectError, match="cannot connect"):
                list(m.generate(PROMPT, max_tokens=2))
        finally:
            m.close()
    finally:
        server.stop()
