"""The plain value types: defaults, validation, messages, results."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest

from core_inference import (
    BatchResult,
    ClassifyResult,
    GenerateConfig,
    GenerateMetrics,
    InferenceError,
    LoadConfig,
    Message,
    ModelInfo,
    Token,
)


def test_token_is_frozen_with_slots() -> None:
    tok = Token(5, "hi")
    assert (tok.id, tok.text) == (5, "hi")
    with pytest.raises(dataclasses.FrozenInstanceError):
        tok.text = "no"  # type: ignore[misc]
    assert not hasattr(tok, "__dict__")
    assert Token(5, "hi") == tok and hash(Token(5, "hi")) == hash(tok)


# -- GenerateConfig ----------------------------------------------------------------


def test_generate_config_defaults() -> None:
    cfg = GenerateConfig()
    assert cfg.max_tokens == 256
    assert cfg.temperature == 0.0
    assert cfg.top_k == 0
    assert cfg.top_p == 0.0
    assert cfg.stop_tokens == ()
    assert cfg.stop == ()
    assert cfg.repeat_penalty == 0.0
    assert cfg.return_logits is False
    assert cfg.seed is None
    assert cfg.greedy


def test_generate_config_is_frozen() -> None:
    cfg = GenerateConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.max_tokens = 3  # type: ignore[misc]
    assert not hasattr(cfg, "__dict__")


def test_generate_config_accepts_valid_edges() -> None:
    cfg = GenerateConfig(
        max_tokens=0, temperature=100.0, top_k=1, top_p=1.0, repeat_penalty=1.0, seed=0,
        stop_tokens=[1, 2], stop=["a", "bc"], return_logits=True,  # type: ignore[arg-type]
    )
    assert cfg.stop_tokens == (1, 2) and cfg.stop == ("a", "bc")
    assert not cfg.greedy
    assert GenerateConfig(temperature=1).temperature == 1  # an int is a fine number


def test_single_stop_string_becomes_a_tuple() -> None:
    assert GenerateConfig(stop="###").stop == ("###",)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_tokens", -1),
        ("temperature", -0.1),
        ("temperature", 100.5),
        ("top_k", -1),
        ("top_p", -0.01),
        ("top_p", 1.01),
        ("repeat_penalty", -1.0),
        ("repeat_penalty", 1000.0),
        ("seed", -1),
        ("stop", ("ok", "")),
    ],
)
def test_generate_config_out_of_range_is_value_error_naming_the_field(field: str, value: Any) -> None:
    with pytest.raises(ValueError, match=field) as info:
        GenerateConfig(**{field: value})
    assert not isinstance(info.value, TypeError)


@pytest.mark.parametrize("field", ["temperature", "top_p", "repeat_penalty"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_generate_config_rejects_nan_and_inf(field: str, value: float) -> None:
    kwargs: dict[str, Any] = {field: value}
    with pytest.raises(ValueError, match=field):
        GenerateConfig(**kwargs)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_tokens", 1.5),
        ("max_tokens", "10"),
        ("max_tokens", True),
        ("top_k", False),
        ("top_k", None),
        ("seed", True),
        ("seed", 1.0),
        ("temperature", "0.7"),
        ("temperature", True),
        ("top_p", None),
        ("repeat_penalty", False),
        ("stop_tokens", 5),
        ("stop_tokens", [1, "2"]),
        ("stop_tokens", [True]),
        ("stop", 5),
        ("stop", ["ok", 3]),
        ("stop", b"bytes"),
        ("return_logits", 1),
        ("return_logits", "yes"),
    ],
)
def test_generate_config_wrong_type_is_type_error_naming_the_field(field: str, value: Any) -> None:
    with pytest.raises(TypeError, match=field):
        GenerateConfig(**{field: value})


# -- LoadConfig --------------------------------------------------------------------


def test_load_config_defaults() -> None:
    cfg = LoadConfig()
    assert cfg.backend == ""
    assert cfg.context_len == 0
    assert cfg.gpu_layers == -1
    assert cfg.parallel_slots == 0
    assert cfg.threads == 0
    assert dict(cfg.engine_options) == {}


@pytest.mark.parametrize(
    ("field", "value"),
    [("context_len", -1), ("gpu_layers", -2), ("parallel_slots", -1), ("threads", -1)],
)
def test_load_config_out_of_range_is_value_error_naming_the_field(field: str, value: int) -> None:
    kwargs: dict[str, Any] = {field: value}
    with pytest.raises(ValueError, match=field):
        LoadConfig(**kwargs)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("backend", None),
        ("backend", 3),
        ("context_len", 1.0),
        ("context_len", True),
        ("gpu_layers", "all"),
        ("parallel_slots", True),
        ("threads", 2.0),
        ("engine_options", [("a", 1)]),
    ],
)
def test_load_config_wrong_type_is_type_error_naming_the_field(field: str, value: Any) -> None:
    with pytest.raises(TypeError, match=field):
        LoadConfig(**{field: value})


# -- Message -----------------------------------------------------------------------


@pytest.mark.parametrize("role", ["system", "user", "assistant"])
def test_message_roles_round_trip(role: str) -> None:
    msg = Message(role, "hello")
    assert msg.to_dict() == {"role": role, "content": "hello"}
    assert Message.from_dict(msg.to_dict()) == msg


@pytest.mark.parametrize("role", ["tool", "User", "", "model"])
def test_message_unknown_role_is_value_error(role: str) -> None:
    with pytest.raises(ValueError, match="role"):
        Message(role, "x")
    with pytest.raises(ValueError, match="role"):
        Message.from_dict({"role": role, "content": "x"})


def test_message_content_must_be_str() -> None:
    with pytest.raises(TypeError, match="content"):
        Message("user", None)  # type: ignore[arg-type]


@pytest.mark.parametrize("data", [{"role": "user"}, {"content": "x"}, {}])
def test_message_from_dict_missing_key_is_value_error(data: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="missing"):
        Message.from_dict(data)


def test_message_from_dict_ignores_extra_keys() -> None:
    assert Message.from_dict({"role": "user", "content": "x", "name": "bob"}) == Message("user", "x")


# -- results -----------------------------------------------------------------------


def test_batch_result_text_joins_tokens() -> None:
    res = BatchResult((Token(1, "Hel"), Token(2, "lo"), Token(3, " 🙂")))
    assert res.text == "Hello 🙂"
    assert res.err is None
    assert BatchResult().text == ""


def test_batch_result_carries_its_own_error() -> None:
    err = InferenceError("boom")
    res = BatchResult(err=err)
    assert res.err is err and res.tokens == () and res.text == ""


def test_classify_result_logits_optional() -> None:
    assert ClassifyResult(Token(1, "a")).logits is None
    assert ClassifyResult(Token(1, "a"), [0.5, 0.1]).logits == [0.5, 0.1]


def test_metrics_and_info_default_to_zero() -> None:
    m = GenerateMetrics()
    for f in dataclasses.fields(m):
        assert getattr(m, f.name) == 0
    info = ModelInfo()
    assert info.architecture == "" and info.vocab_size == 0 and info.quant_bits == 0
    assert {f.name for f in dataclasses.fields(GenerateMetrics)} >= {
        "prompt_tokens", "generated_tokens", "prefill_duration", "decode_duration", "total_duration",
        "prefill_tokens_per_sec", "decode_tokens_per_sec", "peak_memory_bytes", "active_memory_bytes",
    }
    assert {f.name for f in dataclasses.fields(ModelInfo)} >= {
        "architecture", "vocab_size", "num_layers", "hidden_size", "context_length", "quant_bits",
        "quant_group",
    }


def test_every_error_pickles_with_its_fields() -> None:
    """Errors cross process boundaries (Ray replicas, worker processes) whole."""
    import pickle

    from core_inference import errors as e

    cases: list[Exception] = [
        e.BackendNotRegistered("x", ["a", "b"]), e.BackendUnavailable("metal", "no GPU", "mlx"),
        e.NoBackendAvailable("none", {"a": "gone"}), e.ModelLoadError("bad file", "/m.gguf"),
        e.ContextLengthExceeded(900, 512), e.EngineError("boom"), e.Cancelled(), e.DeadlineExceeded("late"),
        e.ModelClosed(),
    ]
    for err in cases:
        back = pickle.loads(pickle.dumps(err))
        assert type(back) is type(err) and str(back) == str(err) and vars(back) == vars(err), err
