"""Plain value types shared by every backend: tokens, messages, configs and results."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True, slots=True)
class Token:
    """One generated token: its vocabulary id and its text (always whole UTF-8)."""

    id: int
    text: str


@dataclass(frozen=True, slots=True)
class Message:
    """One turn of a chat conversation."""

    role: str
    content: str

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role: unknown role {self.role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(self.content, str):
            raise TypeError(f"content: expected str, got {type(self.content).__name__}")

    def to_dict(self) -> dict[str, str]:
        """Return the OpenAI-style ``{"role": ..., "content": ...}`` mapping."""
        return {"role": self.role, "content": self.content}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Message:
        """Build a message from an OpenAI-style mapping."""
        try:
            return cls(role=data["role"], content=data["content"])
        except KeyError as exc:
            raise ValueError(f"message is missing the {exc.args[0]!r} key") from None


def _check_int(name: str, value: object, minimum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected int, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}: must be >= {minimum}, got {value}")


def _check_float(name: str, value: object, low: float, high: float | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a number, got {type(value).__name__}")
    if math.isnan(value) or value < low or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name}: must be {bound}, got {value}")
    if math.isinf(value):
        raise ValueError(f"{name}: must be finite, got {value}")


def _as_tuple(name: str, value: object, kind: type) -> tuple[Any, ...]:
    if isinstance(value, (str, bytes)) and kind is str:
        value = (value,)
    if not isinstance(value, (tuple, list)):
        raise TypeError(f"{name}: expected a sequence of {kind.__name__}, got {type(value).__name__}")
    for item in value:
        if isinstance(item, bool) or not isinstance(item, kind):
            raise TypeError(f"{name}: expected {kind.__name__} items, got {type(item).__name__}")
    return tuple(value)


@dataclass(frozen=True, slots=True)
class GenerateConfig:
    """How to sample: built by ``apply_generate_opts`` from options or keywords."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 0.0
    stop_tokens: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    repeat_penalty: float = 0.0
    return_logits: bool = False
    seed: int | None = None

    def __post_init__(self) -> None:
        _check_int("max_tokens", self.max_tokens, 0)
        _check_float("temperature", self.temperature, 0.0, 100.0)
        _check_int("top_k", self.top_k, 0)
        _check_float("top_p", self.top_p, 0.0, 1.0)
        _check_float("repeat_penalty", self.repeat_penalty, 0.0, 100.0)
        object.__setattr__(self, "stop_tokens", _as_tuple("stop_tokens", self.stop_tokens, int))
        stop = _as_tuple("stop", self.stop, str)
        if any(s == "" for s in stop):
            raise ValueError("stop: stop strings must not be empty")
        object.__setattr__(self, "stop", stop)
        if not isinstance(self.return_logits, bool):
            raise TypeError(f"return_logits: expected bool, got {type(self.return_logits).__name__}")
        if self.seed is not None:
            _check_int("seed", self.seed, 0)

    @property
    def greedy(self) -> bool:
        """True when sampling is off (temperature 0)."""
        return self.temperature == 0.0


@dataclass(frozen=True, slots=True)
class LoadConfig:
    """How to load: built by ``apply_load_opts`` from options or keywords."""

    backend: str = ""
    context_len: int = 0
    gpu_layers: int = -1
    parallel_slots: int = 0
    threads: int = 0
    engine_options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.backend, str):
            raise TypeError(f"backend: expected str, got {type(self.backend).__name__}")
        _check_int("context_len", self.context_len, 0)
        _check_int("gpu_layers", self.gpu_layers, -1)
        _check_int("parallel_slots", self.parallel_slots, 0)
        _check_int("threads", self.threads, 0)
        if not isinstance(self.engine_options, Mapping):
            raise TypeError("engine_options: expected a mapping")


@dataclass(frozen=True, slots=True)
class GenerateMetrics:
    """Counts and timings of the last call (durations in seconds, 0 where unknown)."""

    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_duration: float = 0.0
    decode_duration: float = 0.0
    total_duration: float = 0.0
    time_to_first_token: float = 0.0
    prefill_tokens_per_sec: float = 0.0
    decode_tokens_per_sec: float = 0.0
    peak_memory_bytes: int = 0
    active_memory_bytes: int = 0
    cached_prompt_tokens: int = 0  # prompt tokens read from a kept cache, not prefilled again



@dataclass(frozen=True, slots=True)
class ClassifyResult:
    """The token sampled at the last prompt position, with its logits when asked for.

    ``prompt_tokens`` and ``metrics`` are this prompt's (timings are those of the batch
    it was prefilled in); ``err`` holds its own failure, if it had one.
    """

    token: Token
    logits: Sequence[float] | None = None
    prompt_tokens: int = 0
    metrics: GenerateMetrics = field(default=GenerateMetrics(), compare=False)
    err: BaseException | None = None

    @property
    def finish_reason(self) -> str:
        """"length" (one token was asked for and sampled), or "error"."""
        return "error" if self.err is not None else "length"


@dataclass(frozen=True, slots=True)
class BatchResult:
    """One prompt's output from ``batch_generate``; ``err`` holds its own failure.

    ``finish_reason`` and ``stop`` say why this prompt ended, as on a ``TokenStream``;
    ``metrics`` are its own counts with the timings of the batch it ran in.
    """

    tokens: tuple[Token, ...] = ()
    err: BaseException | None = None
    finish_reason: str = ""
    stop: str | int | None = None
    prompt_tokens: int = 0
    metrics: GenerateMetrics = field(default=GenerateMetrics(), compare=False)

    @property
    def text(self) -> str:
        """The generated text, joined."""
        return "".join(t.text for t in self.tokens)


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a loaded model can do; the contract suite runs the rules these allow.

    ``batch_generate`` is "native" (the engine decodes prompts together) or "fallback"
    (one prompt after another); ``classify`` likewise, or "" when it cannot classify.
    ``logits`` is False for engines that only return text or ids (a remote server).
    """

    token_ids: bool = True
    logits: bool = True
    classify: str = "native"
    batch_generate: str = "native"
    chat_template: bool = True
    tokenize: bool = True
    parallel_slots: int = 1
    async_engine: bool = False

@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What a model is: read from its own files, 0 or "" where unknown."""

    architecture: str = ""
    vocab_size: int = 0
    num_layers: int = 0
    hidden_size: int = 0
    context_length: int = 0
    quant_bits: int = 0
    quant_group: int = 0
    quant_type: str = ""
    parameters: int = 0
