"""The ``openai`` backend against our own ``core-inference serve`` (a real subprocess on
127.0.0.1, on the model it serves by default): the whole contract suite over HTTP, token ids
(vLLM's ``return_token_ids``), tokenize and classify included; only the rules that need logits
or a local chat template skip."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar

import pytest

pytest.importorskip("httpx2", reason="needs core-inference[openai]")
pytest.importorskip("starlette", reason="needs core-inference[server]")
pytest.importorskip("uvicorn", reason="needs core-inference[server]")

from core_inference.backends.openai import OpenAIBackend
from core_inference.protocols import TextModel
from core_inference.server.process import ServerProcess
from core_inference.testing import BackendContract

_server: dict[str, ServerProcess] = {}


@pytest.fixture(scope="module", autouse=True)
def serve() -> Iterator[ServerProcess]:
    """One ``serve`` for the module; the contract's models all talk to it."""
    with ServerProcess(["--parallel", "4", "--threads", "1"]) as proc:
        _server["proc"] = proc
        try:
            yield proc
        finally:
            alone = _server.pop("alone", None)
            if alone is not None:
                alone.__exit__(None, None, None)
            _server.clear()


ALONE = ["--engine-option", "shared_decode=false", "--engine-option", "prefix_cache=false"]


class TestOpenAIAgainstServe(BackendContract):
    # eight threads against the prompts alone: on a serve that shares nothing, started for that
    # rule (llama.cpp's shared decode may change a greedy answer; see test_llama_cpp_contract)
    alone_kw: ClassVar[dict[str, Any]] = {"engine_options": {"serve": ALONE}}

    def load_model(self, **kw: Any) -> TextModel:
        if kw.pop("engine_options", None) is None:
            return OpenAIBackend().load_model(_server["proc"].url, **kw)
        if "alone" not in _server:
            _server["alone"] = ServerProcess(["--parallel", "4", "--threads", "1", *ALONE]).__enter__()
        return OpenAIBackend().load_model(_server["alone"].url, **kw)


def test_what_serve_gives(serve: ServerProcess) -> None:
    with OpenAIBackend().load_model(serve.url) as m:
        caps = m.capabilities
        # serve answers vLLM's return_token_ids and /tokenize; no server sends logits
        assert (caps.token_ids, caps.logits, caps.tokenize, caps.classify) == (True, False, True, "native")
        assert m.id_mode == "return_token_ids" and m.flavor == "vllm" and m.context_len > 0
        assert caps.batch_generate == "native" and caps.chat_template
        stream = m.chat([{"role": "user", "content": "What is the capital of France?"}], max_tokens=16)
        assert stream.text().strip() and stream.finish_reason in ("length", "end_of_text")
        assert stream.prompt_tokens > 0 and stream.metrics.generated_tokens > 0  # the server's usage
