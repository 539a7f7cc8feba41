"""The ``openai`` backend's wire format: request fields per server and chunk parsing (no server)."""

from __future__ import annotations

import pytest

from core_inference import GenerateConfig
from core_inference.openai_wire import (
    IDS_FIELD,
    IDS_LOGPROBS,
    IDS_NONE,
    WireError,
    chat_body,
    completion_body,
    error_fields,
    parse_chunk,
    sampling_fields,
)


def test_greedy_sends_only_what_greedy_needs() -> None:
    assert sampling_fields(GenerateConfig(max_tokens=5)) == {"max_tokens": 5, "temperature": 0.0, "n": 1}


def test_llama_servers_get_every_option_explicitly() -> None:
    # their defaults are top_k 40, top_p 0.95 and (llama-cpp-python) repeat_penalty 1.1
    got = sampling_fields(GenerateConfig(temperature=0.8), "llama-cpp-python")
    assert got == {"max_tokens": 256, "temperature": 0.8, "n": 1, "top_p": 1.0, "top_k": 0,
                   "repeat_penalty": 1.0}
    assert sampling_fields(GenerateConfig(), "llama.cpp")["repeat_penalty"] == 1.0


def test_vllm_names_and_seed() -> None:
    got = sampling_fields(GenerateConfig(temperature=0.5, top_k=4, top_p=0.5, repeat_penalty=1.3, seed=9))
    assert got == {"max_tokens": 256, "temperature": 0.5, "n": 1, "top_p": 0.5, "top_k": 4,
                   "repetition_penalty": 1.3, "seed": 9}


def test_bodies() -> None:
    cfg = GenerateConfig(max_tokens=3)
    body = completion_body("m", "hi", cfg, IDS_FIELD, "vllm", {"min_p": 0.1})
    assert body["return_token_ids"] is True and body["min_p"] == 0.1 and body["stream"] is True
    assert body["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}
    body = chat_body("m", [{"role": "user", "content": "hi"}], cfg, IDS_LOGPROBS, "", {}, stream=False)
    assert body["logprobs"] is True and body["top_logprobs"] == 0 and "stream" not in body
    assert completion_body("m", "hi", cfg, IDS_NONE, "", {})["stream_options"] == {"include_usage": True}


def test_parse_vllm_chunks() -> None:
    d = parse_chunk({"choices": [{"text": " Paris", "token_ids": [3, 4], "finish_reason": None}],
                     "prompt_token_ids": [1, 2, 5], "usage": None}, chat=False, mode=IDS_FIELD)
    assert (d.text, d.ids, d.prompt_tokens, d.finish_reason) == (" Paris", [3, 4], 3, None)
    d = parse_chunk({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 2}}, False, IDS_FIELD)
    assert (d.prompt_tokens, d.completion_tokens, d.ids) == (7, 2, None)
    d = parse_chunk({"choices": [{"delta": {"role": "assistant"}, "finish_reason": None}]}, True, IDS_FIELD)
    assert (d.text, d.ids) == ("", [])
    d = parse_chunk({"choices": [{"delta": {"content": "x"}, "logprobs": {"content": [
        {"token": "token_id:42", "logprob": -1.0}]}, "finish_reason": "stop"}]}, True, IDS_LOGPROBS)
    assert (d.text, d.ids, d.finish_reason) == ("x", [42], "stop")
    d = parse_chunk({"choices": [{"text": "y"}], "timings": {"prompt_ms": 5, "predicted_ms": 7.5}},
                    False, IDS_NONE)
    assert d.ids is None and d.timings == {"prompt_ms": 5.0, "predicted_ms": 7.5}


@pytest.mark.parametrize("bad", [
    [], {"choices": "no"}, {"choices": [3]}, {"choices": [{"text": 5}]},
    {"choices": [{"text": "a", "token_ids": ["x"]}]},
])
def test_malformed_chunks(bad: object) -> None:
    with pytest.raises(WireError):
        parse_chunk(bad, chat=False, mode=IDS_FIELD)


def test_logprobs_token_must_be_an_id() -> None:
    with pytest.raises(WireError, match="token_id"):
        parse_chunk({"choices": [{"text": "a", "logprobs": {"tokens": ["a"]}}]}, False, IDS_LOGPROBS)


def test_error_fields_of_each_server() -> None:
    assert error_fields({"error": {"message": "bad", "type": "t", "code": 400, "param": "p"}}) == (
        "bad", "t", "400", "p")
    vllm = {"object": "error", "message": "vllm says", "type": "BadRequestError"}
    assert error_fields(vllm)[:2] == ("vllm says", "BadRequestError")
    assert error_fields({"detail": "Not Found"})[0] == "Not Found"
    assert "max_tokens" in error_fields({"detail": [{"loc": ["body", "max_tokens"], "msg": "bad"}]})[0]
    assert error_fields("  plain text\n") == ("plain text", "", "", "")
    assert error_fields(None) == ("", "", "", "")
