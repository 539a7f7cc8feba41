"""Functional options (the seed's ``WithX``) and keywords, resolved into configs."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import fields, replace
from typing import Any, TypeVar

from .types import GenerateConfig, LoadConfig

GenerateOption = Callable[[dict[str, Any]], None]
LoadOption = Callable[[dict[str, Any]], None]

_C = TypeVar("_C", GenerateConfig, LoadConfig)

_GENERATE_FIELDS = frozenset(f.name for f in fields(GenerateConfig))
_LOAD_FIELDS = frozenset(f.name for f in fields(LoadConfig))


def _setter(name: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def apply(cfg: dict[str, Any]) -> None:
        cfg[name] = value

    apply.__name__ = f"with_{name}"
    apply.__qualname__ = apply.__name__
    return apply


def with_max_tokens(n: int) -> GenerateOption:
    """Generate at most ``n`` tokens."""
    return _setter("max_tokens", n)


def with_temperature(t: float) -> GenerateOption:
    """Sampling temperature; 0 is greedy."""
    return _setter("temperature", t)


def with_top_k(k: int) -> GenerateOption:
    """Sample from the ``k`` most likely tokens; 0 turns it off."""
    return _setter("top_k", k)


def with_top_p(p: float) -> GenerateOption:
    """Nucleus sampling; 0 turns it off."""
    return _setter("top_p", p)


def with_stop_tokens(*ids: int) -> GenerateOption:
    """Stop when one of these token ids is generated (it is not yielded)."""
    return _setter("stop_tokens", tuple(ids))


def with_stop(*strings: str) -> GenerateOption:
    """Stop before any of these strings; the text before it is yielded."""
    return _setter("stop", tuple(strings))


def with_repeat_penalty(p: float) -> GenerateOption:
    """Penalty for repeated tokens; 1.0 means none, 0 turns it off."""
    return _setter("repeat_penalty", p)


def with_return_logits(on: bool = True) -> GenerateOption:
    """Return logits from ``classify``."""
    return _setter("return_logits", on)


def with_seed(seed: int) -> GenerateOption:
    """Seed for sampling, for reproducible non-greedy output."""
    return _setter("seed", seed)


def with_backend(name: str) -> LoadOption:
    """Load with the named backend instead of choosing one."""
    return _setter("backend", name)


def with_context_len(n: int) -> LoadOption:
    """Context length in tokens; 0 takes the model's default."""
    return _setter("context_len", n)


def with_gpu_layers(n: int) -> LoadOption:
    """Layers to offload to the GPU; -1 is all."""
    return _setter("gpu_layers", n)


def with_parallel_slots(n: int) -> LoadOption:
    """Concurrent calls the model serves at once; 0 takes the backend's default."""
    return _setter("parallel_slots", n)


def with_threads(n: int) -> LoadOption:
    """CPU threads for the engine; 0 uses every core."""
    return _setter("threads", n)


def with_engine_options(**options: Any) -> LoadOption:
    """Engine-specific settings passed through to the backend untouched."""
    return _setter("engine_options", dict(options))


def _apply(
    cls: type[_C], allowed: frozenset[str], opts: Iterable[Any], kw: Mapping[str, Any]
) -> _C:
    values: dict[str, Any] = {}
    base: _C | None = None
    for opt in opts:
        if isinstance(opt, cls):
            base, values = opt, {}
        elif callable(opt):
            opt(values)
        else:
            raise TypeError(f"expected an option or a {cls.__name__}, got {type(opt).__name__}")
    unknown = (set(values) | set(kw)) - allowed
    if unknown:
        raise TypeError(
            f"unknown {cls.__name__} option(s): {', '.join(sorted(unknown))}"
            f" (known: {', '.join(sorted(allowed))})"
        )
    values.update(kw)
    if base is not None:
        return replace(base, **values)
    return cls(**values)


def apply_generate_opts(opts: Iterable[Any] = (), /, **kw: Any) -> GenerateConfig:
    """Resolve options and keywords (keywords win) into a validated ``GenerateConfig``."""
    return _apply(GenerateConfig, _GENERATE_FIELDS, opts, kw)


def apply_load_opts(opts: Iterable[Any] = (), /, **kw: Any) -> LoadConfig:
    """Resolve options and keywords (keywords win) into a validated ``LoadConfig``."""
    return _apply(LoadConfig, _LOAD_FIELDS, opts, kw)
