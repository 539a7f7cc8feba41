"""The OpenAI wire format the server reads: request bodies parsed and checked into our types.

Standard library only (no pydantic). Every mistake is a ``ProtocolError`` carrying an
OpenAI-style error object that names the field (``param``), so a client learns what to
fix: ``{"error": {"message", "type", "param", "code"}}``. Fields we do not know are
ignored, as OpenAI's and vLLM's servers do; fields we know must have the right type.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from ..openai_wire import FINISH_REASONS, error_body, finish_reason  # noqa: F401  (re-exported)
from ..types import GenerateConfig, Message

MAX_N = 16  # choices a request may ask for (also bounded by --parallel)
MAX_STOP = 16  # stop strings a request may give
MAX_SEED = 2**64 - 1
MAX_TOP_LOGPROBS = 20
ROLE_ALIASES = {"developer": "system"}  # newer OpenAI clients send "developer" for "system"


class ProtocolError(Exception):
    """A request the server refuses, with its HTTP status and OpenAI-style error fields."""

    def __init__(
        self,
        message: str,
        param: str | None = None,
        status: int = 400,
        type: str = "invalid_request_error",
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status
        self.type = type
        self.code = code

    def body(self) -> dict[str, Any]:
        """The JSON object sent to the client."""
        return error_body(self.message, self.type, self.param, self.code)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_json(body: bytes) -> dict[str, Any]:
    """The request body as a JSON object; anything else is a 400 naming what is wrong."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"the request body is not valid UTF-8 (byte {exc.start})") from None
    if not text.strip():
        raise ProtocolError("the request body is empty; expected a JSON object")
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise ProtocolError("the request body is nested too deeply") from None
    except ValueError as exc:  # json.JSONDecodeError is a ValueError
        raise ProtocolError(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ProtocolError(f"the request body must be a JSON object, got a JSON {_json_type(data)}")
    return data


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


# -- field readers: each names its field in the error --------------------------------------


def _bad_type(name: str, want: str, value: object) -> ProtocolError:
    return ProtocolError(f"{name}: expected {want}, got {_json_type(value)}", name)


def get_bool(data: dict[str, Any], name: str, default: bool = False) -> bool:
    """A boolean field (null means the default)."""
    value = data.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _bad_type(name, "a boolean", value)
    return value


def get_int(
    data: dict[str, Any], name: str, default: int | None, low: int | None = None, high: int | None = None
) -> int | None:
    """An integer field within [low, high] (null means the default)."""
    value = data.get(name)
    if value is None:
        return default
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        value = int(value)  # 16.0 is 16, as JavaScript clients send it
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad_type(name, "an integer", value)
    if (low is not None and value < low) or (high is not None and value > high):
        raise ProtocolError(f"{name}: must be {_range(low, high)}, got {value}", name)
    return value


def get_float(
    data: dict[str, Any], name: str, default: float | None, low: float, high: float
) -> float | None:
    """A number field within [low, high] (null means the default)."""
    value = data.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad_type(name, "a number", value)
    if math.isnan(value) or not low <= value <= high:
        raise ProtocolError(f"{name}: must be {_range(low, high)}, got {value}", name)
    return float(value)


def _range(low: float | None, high: float | None) -> str:
    if low is not None and high is not None:
        return f"between {low} and {high}"
    return f">= {low}" if low is not None else f"<= {high}"


def get_stop(data: dict[str, Any]) -> tuple[str, ...]:
    """``stop``: a string or a list of strings, none empty."""
    value = data.get("stop")
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise _bad_type("stop", "a string or an array of strings", value)
    if len(items) > MAX_STOP:
        raise ProtocolError(f"stop: at most {MAX_STOP} stop strings, got {len(items)}", "stop")
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise _bad_type(f"stop[{i}]", "a string", item)
        if not item:
            raise ProtocolError(f"stop[{i}]: must not be empty", f"stop[{i}]")
    return tuple(items)


# -- requests --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sampling:
    """What both endpoints share: the config, how many choices, streaming and logprobs."""

    config: GenerateConfig
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None  # None: not asked; else how many alternatives per token (0..20)
    model: str | None = None
    seeds: tuple[int | None, ...] = field(default=(None,))
    return_token_ids: bool = False  # vLLM's extension: each choice carries its tokens' ids

    def config_for(self, choice: int) -> GenerateConfig:
        """The config of choice ``choice`` (each its own seed, so n > 1 samples differ)."""
        from dataclasses import replace

        seed = self.seeds[choice % len(self.seeds)]
        return self.config if seed == self.config.seed else replace(self.config, seed=seed)


@dataclass(frozen=True)
class CompletionRequest:
    """``POST /v1/completions``: one or more prompts."""

    prompts: tuple[str, ...]
    sampling: Sampling
    echo: bool = False


@dataclass(frozen=True)
class ChatRequest:
    """``POST /v1/chat/completions``: one conversation."""

    messages: tuple[Message, ...]
    sampling: Sampling


def _model(data: dict[str, Any]) -> str | None:
    value = data.get("model")
    if value is not None and not isinstance(value, str):
        raise _bad_type("model", "a string", value)
    return value


def _sampling(data: dict[str, Any], max_tokens_names: tuple[str, ...], logprobs: int | None,
              default_max_tokens: int) -> Sampling:
    max_tokens = default_max_tokens
    for name in max_tokens_names:  # the later name wins (max_completion_tokens over max_tokens)
        given = get_int(data, name, None, 1, 2**31 - 1)
        if given is not None:
            max_tokens = given
    temperature = get_float(data, "temperature", 1.0, 0.0, 2.0)
    top_p = get_float(data, "top_p", 1.0, 0.0, 1.0)
    top_k = get_int(data, "top_k", 0, -1, 2**31 - 1)  # vLLM's extension; -1 and 0 are off
    for name in ("frequency_penalty", "presence_penalty"):
        penalty = get_float(data, name, 0.0, -2.0, 2.0)
        if penalty:
            raise ProtocolError(f"{name}: not supported by this server (only 0); use repetition_penalty",
                                name)
    repetition = get_float(data, "repetition_penalty", 1.0, 0.0, 100.0)  # vLLM's extension
    seed = get_int(data, "seed", None, -(2**63), MAX_SEED)
    n = get_int(data, "n", 1, 1, MAX_N)
    stream = get_bool(data, "stream")
    options = data.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict):
            raise _bad_type("stream_options", "an object", options)
        if not stream:
            raise ProtocolError("stream_options: only allowed when stream is true", "stream_options")
        include_usage = get_bool(options, "include_usage")
        if "include_usage" in options and not isinstance(options["include_usage"], bool | None):
            raise _bad_type("stream_options.include_usage", "a boolean", options["include_usage"])
    if data.get("best_of") not in (None, 1, n):
        raise ProtocolError("best_of: not supported by this server", "best_of")
    if seed is not None and seed < 0:
        seed += 2**64  # OpenAI allows any 64-bit integer; ours are unsigned
    try:
        config = GenerateConfig(
            max_tokens=max_tokens,
            temperature=temperature or 0.0,
            # OpenAI's 1.0 is "off"; ours is 0
            top_p=0.0 if top_p in (None, 1.0) else top_p,
            top_k=max(0, top_k or 0),
            stop=get_stop(data),
            repeat_penalty=0.0 if repetition in (None, 1.0) else repetition,
            seed=seed,
        )
    except (TypeError, ValueError) as exc:  # a bound of ours stricter than OpenAI's
        name = str(exc).split(":", 1)[0]
        raise ProtocolError(str(exc), name) from None
    seeds: tuple[int | None, ...] = (seed,)
    if seed is not None and n and n > 1:
        seeds = tuple((seed + i) % (MAX_SEED + 1) for i in range(n))
    return Sampling(config, n or 1, stream, include_usage, logprobs, _model(data), seeds,
                    get_bool(data, "return_token_ids"))


def parse_completion(data: dict[str, Any], default_max_tokens: int = 16) -> CompletionRequest:
    """A ``/v1/completions`` body (OpenAI's default ``max_tokens`` there is 16)."""
    prompt = data.get("prompt")
    if prompt is None:
        raise ProtocolError("prompt: required", "prompt")
    if isinstance(prompt, str):
        prompts: tuple[str, ...] = (prompt,)
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = tuple(prompt)
    elif isinstance(prompt, list) and prompt and all(isinstance(p, int) and not isinstance(p, bool)
                                                     for p in prompt):
        raise ProtocolError("prompt: token id prompts are not supported; send text", "prompt")
    else:
        raise _bad_type("prompt", "a string or a non-empty array of strings", prompt)
    if data.get("suffix") is not None:
        raise ProtocolError("suffix: not supported by this server", "suffix")
    logprobs = get_int(data, "logprobs", None, 0, 5)
    sampling = _sampling(data, ("max_tokens",), logprobs, default_max_tokens)
    return CompletionRequest(prompts, sampling, get_bool(data, "echo"))


def parse_chat(data: dict[str, Any], default_max_tokens: int) -> ChatRequest:
    """A ``/v1/chat/completions`` body."""
    raw = data.get("messages")
    if raw is None:
        raise ProtocolError("messages: required", "messages")
    if not isinstance(raw, list):
        raise _bad_type("messages", "an array of messages", raw)
    if not raw:
        raise ProtocolError("messages: must not be empty", "messages")
    messages = tuple(_message(m, i) for i, m in enumerate(raw))
    logprobs: int | None = None
    if get_bool(data, "logprobs"):
        logprobs = get_int(data, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS)
    elif data.get("top_logprobs") is not None:
        raise ProtocolError("top_logprobs: needs logprobs set to true", "top_logprobs")
    for name in ("tools", "functions"):
        if data.get(name):
            raise ProtocolError(f"{name}: tool calls are not supported by this server", name)
    fmt = data.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") in (None, "text")):
        raise ProtocolError("response_format: only {\"type\": \"text\"} is supported", "response_format")
    sampling = _sampling(data, ("max_tokens", "max_completion_tokens"), logprobs, default_max_tokens)
    return ChatRequest(messages, sampling)


def _message(value: object, i: int) -> Message:
    where = f"messages[{i}]"
    if not isinstance(value, dict):
        raise _bad_type(where, "an object", value)
    role = value.get("role")
    if not isinstance(role, str):
        raise ProtocolError(f"{where}.role: required, a string", f"{where}.role")
    role = ROLE_ALIASES.get(role, role)
    content = value.get("content")
    if isinstance(content, list):  # content parts: text only
        texts = []
        for j, part in enumerate(content):
            text = part.get("text") if isinstance(part, dict) and part.get("type") == "text" else None
            if not isinstance(text, str):
                raise ProtocolError(f"{where}.content[{j}]: only text parts are supported",
                                    f"{where}.content[{j}]")
            texts.append(text)
        content = "".join(texts)
    elif content is None and role == "assistant":
        content = ""
    if not isinstance(content, str):
        raise ProtocolError(f"{where}.content: expected a string or an array of text parts, "
                            f"got {_json_type(content)}", f"{where}.content")
    try:
        return Message(role, content)
    except ValueError as exc:
        raise ProtocolError(f"{where}.{exc}", f"{where}.role") from None


@dataclass(frozen=True)
class TokenizeRequest:
    """vLLM's ``POST /tokenize``: a prompt, or messages through the chat template."""

    prompt: str | None
    messages: tuple[Message, ...]
    model: str | None


def parse_tokenize(data: dict[str, Any]) -> TokenizeRequest:
    """A ``/tokenize`` body: ``{"prompt": str}`` or ``{"messages": [...]}``."""
    prompt = data.get("prompt")
    if prompt is not None:
        if not isinstance(prompt, str):
            raise _bad_type("prompt", "a string", prompt)
        return TokenizeRequest(prompt, (), _model(data))
    if data.get("messages") is None:
        raise ProtocolError("prompt: required (or messages)", "prompt")
    return TokenizeRequest(None, parse_chat(data, 1).messages, _model(data))


def parse_detokenize(data: dict[str, Any]) -> list[int]:
    """A ``/detokenize`` body: ``{"tokens": [int, ...]}``."""
    tokens = data.get("tokens")
    if not isinstance(tokens, list):
        raise _bad_type("tokens", "an array of token ids", tokens)
    for i, t in enumerate(tokens):
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < 2**31:
            raise ProtocolError(f"tokens[{i}]: expected a token id (an integer >= 0), got {t!r}"[:200],
                                f"tokens[{i}]")
    return tokens


__all__ = [
    "ChatRequest",
    "CompletionRequest",
    "ProtocolError",
    "Sampling",
    "error_body",
    "finish_reason",
    "parse_chat",
    "parse_completion",
    "parse_detokenize",
    "parse_json",
    "parse_tokenize",
]
