"""Options in both styles, with_x(...) and keywords, resolve to one config."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pytest

import core_inference as ci
from core_inference import GenerateConfig, LoadConfig
from core_inference.testing import FakeModel

if TYPE_CHECKING:  # the lazy re-exports are typed ``object``; give mypy their real signatures
    from core_inference.options import apply_generate_opts, apply_load_opts
else:
    from core_inference import apply_generate_opts, apply_load_opts

GENERATE_OPTIONS: list[tuple[Callable[[], Any], str, Any]] = [
    (lambda: ci.with_max_tokens(64), "max_tokens", 64),
    (lambda: ci.with_temperature(0.7), "temperature", 0.7),
    (lambda: ci.with_top_k(40), "top_k", 40),
    (lambda: ci.with_top_p(0.9), "top_p", 0.9),
    (lambda: ci.with_stop_tokens(1, 2, 3), "stop_tokens", (1, 2, 3)),
    (lambda: ci.with_stop("###", "\n\n"), "stop", ("###", "\n\n")),
    (lambda: ci.with_repeat_penalty(1.1), "repeat_penalty", 1.1),
    (lambda: ci.with_return_logits(), "return_logits", True),
    (lambda: ci.with_return_logits(False), "return_logits", False),
    (lambda: ci.with_seed(42), "seed", 42),
]

LOAD_OPTIONS: list[tuple[Callable[[], Any], str, Any]] = [
    (lambda: ci.with_backend("llama_cpp"), "backend", "llama_cpp"),
    (lambda: ci.with_context_len(2048), "context_len", 2048),
    (lambda: ci.with_gpu_layers(0), "gpu_layers", 0),
    (lambda: ci.with_parallel_slots(4), "parallel_slots", 4),
    (lambda: ci.with_threads(2), "threads", 2),
    (lambda: ci.with_engine_options(flash_attn=True), "engine_options", {"flash_attn": True}),
]


@pytest.mark.parametrize(("make", "field", "value"), GENERATE_OPTIONS)
def test_each_generate_option_sets_its_field(make: Callable[[], Any], field: str, value: Any) -> None:
    cfg = apply_generate_opts([make()])
    assert getattr(cfg, field) == value
    # every other field keeps its default
    default = GenerateConfig()
    for other in ("max_tokens", "temperature", "top_k", "top_p", "stop_tokens", "stop", "seed"):
        if other != field:
            assert getattr(cfg, other) == getattr(default, other)


@pytest.mark.parametrize(("make", "field", "value"), GENERATE_OPTIONS)
def test_generate_option_equals_keyword(make: Callable[[], Any], field: str, value: Any) -> None:
    assert apply_generate_opts([make()]) == apply_generate_opts(**{field: value})


@pytest.mark.parametrize(("make", "field", "value"), LOAD_OPTIONS)
def test_each_load_option_sets_its_field(make: Callable[[], Any], field: str, value: Any) -> None:
    cfg = apply_load_opts([make()])
    assert getattr(cfg, field) == value
    assert cfg == apply_load_opts(**{field: value})


def test_no_options_give_the_defaults() -> None:
    assert apply_generate_opts() == GenerateConfig()
    assert apply_load_opts() == LoadConfig()


def test_seed_style_and_keyword_style_are_equal() -> None:
    seed = apply_generate_opts(
        [ci.with_max_tokens(64), ci.with_temperature(0.7), ci.with_top_k(20), ci.with_top_p(0.95),
         ci.with_stop("END"), ci.with_stop_tokens(7), ci.with_repeat_penalty(1.1), ci.with_seed(3)]
    )
    kw = apply_generate_opts(
        max_tokens=64, temperature=0.7, top_k=20, top_p=0.95, stop=["END"], stop_tokens=[7],
        repeat_penalty=1.1, seed=3,
    )
    assert seed == kw
    assert isinstance(seed.stop, tuple) and isinstance(kw.stop_tokens, tuple)

    load_seed = apply_load_opts(
        [ci.with_backend("fake"), ci.with_context_len(512), ci.with_gpu_layers(0), ci.with_parallel_slots(2)]
    )
    assert load_seed == apply_load_opts(backend="fake", context_len=512, gpu_layers=0, parallel_slots=2)


def test_later_option_wins_and_keywords_win_over_options() -> None:
    assert apply_generate_opts([ci.with_max_tokens(5), ci.with_max_tokens(9)]).max_tokens == 9
    cfg = apply_generate_opts([ci.with_max_tokens(5), ci.with_temperature(0.5)], max_tokens=7)
    assert cfg.max_tokens == 7 and cfg.temperature == 0.5
    assert apply_load_opts([ci.with_backend("a")], backend="b").backend == "b"


def test_config_as_positional_option_is_the_base() -> None:
    base = GenerateConfig(max_tokens=10, temperature=0.3, stop=("x",))
    assert apply_generate_opts([base]) == base
    cfg = apply_generate_opts([base, ci.with_top_k(5)], temperature=0.9)
    assert (cfg.max_tokens, cfg.top_k, cfg.temperature, cfg.stop) == (10, 5, 0.9, ("x",))

    load_base = LoadConfig(backend="fake", context_len=128)
    merged = apply_load_opts([load_base, ci.with_parallel_slots(3)])
    assert (merged.backend, merged.context_len, merged.parallel_slots) == ("fake", 128, 3)


def test_unknown_keyword_is_type_error() -> None:
    with pytest.raises(TypeError, match="max_tokenz"):
        apply_generate_opts(max_tokenz=3)
    with pytest.raises(TypeError, match="gpu"):
        apply_load_opts(gpu=1)


def test_option_of_the_other_kind_is_type_error() -> None:
    with pytest.raises(TypeError, match="backend"):
        apply_generate_opts([ci.with_backend("x")])
    with pytest.raises(TypeError, match="max_tokens"):
        apply_load_opts([ci.with_max_tokens(3)])
    with pytest.raises(TypeError):
        apply_generate_opts([LoadConfig()])
    with pytest.raises(TypeError):
        apply_load_opts([GenerateConfig()])


@pytest.mark.parametrize("bad", [3, "max_tokens=3", None])
def test_non_option_positional_is_type_error(bad: Any) -> None:
    with pytest.raises(TypeError):
        apply_generate_opts([bad])


@pytest.mark.parametrize(
    ("opt", "field"),
    [
        (lambda: ci.with_max_tokens(-1), "max_tokens"),
        (lambda: ci.with_temperature(-1.0), "temperature"),
        (lambda: ci.with_top_p(2.0), "top_p"),
        (lambda: ci.with_top_k(-3), "top_k"),
        (lambda: ci.with_repeat_penalty(math.nan), "repeat_penalty"),
        (lambda: ci.with_seed(-5), "seed"),
        (lambda: ci.with_stop(""), "stop"),
    ],
)
def test_option_values_are_validated(opt: Callable[[], Any], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        apply_generate_opts([opt()])


@pytest.mark.parametrize(
    ("opt", "field", "exc"),
    [
        (lambda: ci.with_context_len(-1), "context_len", ValueError),
        (lambda: ci.with_gpu_layers(-2), "gpu_layers", ValueError),
        (lambda: ci.with_parallel_slots(-1), "parallel_slots", ValueError),
        (lambda: ci.with_parallel_slots(True), "parallel_slots", TypeError),
        (lambda: ci.with_backend(None), "backend", TypeError),  # type: ignore[arg-type]
    ],
)
def test_load_option_values_are_validated(opt: Callable[[], Any], field: str, exc: type) -> None:
    with pytest.raises(exc, match=field):
        apply_load_opts([opt()])


def test_model_generate_takes_both_styles_alike() -> None:
    with FakeModel() as model:
        seed = list(model.generate("The quick fox", ci.with_max_tokens(4), ci.with_stop_tokens(99)))
        kw = list(model.generate("The quick fox", max_tokens=4, stop_tokens=[99]))
        assert seed == kw and len(seed) == 4
        with pytest.raises(TypeError, match="bogus"):
            model.generate("x", bogus=1)
        with pytest.raises(ValueError, match="max_tokens"):
            model.generate("x", max_tokens=-1)
