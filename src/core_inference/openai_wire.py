"""The OpenAI wire format, both ways: what the ``openai`` backend sends and reads, and the
shapes ``core-inference serve`` answers with (finish reasons, error objects).

One module for the two sides, so they cannot drift apart (ARCHITECTURE.md). Pure functions
over JSON-shaped dicts (standard library only), so they are tested without a server. What
a server does not take from the OpenAI API itself goes as the extra body fields that vLLM,
SGLang, llama.cpp's server and llama-cpp-python read (``top_k``,
``repetition_penalty``/``repeat_penalty``, ``return_token_ids``...); a server that rejects
unknown fields answers 400, which the backend raises with the server's message.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .types import GenerateConfig

# How the server gives token ids: vLLM's ``return_token_ids`` (ids beside the text in each
# chunk), vLLM's ``return_tokens_as_token_ids`` (logprobs whose tokens read "token_id:N"),
# or not at all (text only: llama-cpp-python, llama.cpp's server, most others).
IDS_FIELD, IDS_LOGPROBS, IDS_NONE = "return_token_ids", "logprobs", "none"
ID_MODES = (IDS_FIELD, IDS_LOGPROBS, IDS_NONE)

# Servers whose sampling defaults are not "off" (llama.cpp: top_k 40, top_p 0.95, and
# llama-cpp-python's repeat_penalty 1.1): every option is sent to them explicitly.
LLAMA_FLAVORS = ("llama.cpp", "llama-cpp-python")


def sampling_fields(cfg: GenerateConfig, flavor: str = "") -> dict[str, Any]:
    """The request fields for ``cfg``'s sampling options (stops are matched on our side)."""
    body: dict[str, Any] = {"max_tokens": cfg.max_tokens, "temperature": cfg.temperature, "n": 1}
    llama = flavor in LLAMA_FLAVORS
    if not cfg.greedy:  # greedy decoding ignores top_k/top_p on every server
        body["top_p"] = cfg.top_p or 1.0
        if cfg.top_k or llama:
            body["top_k"] = cfg.top_k  # 0 is "off" on llama.cpp and vLLM alike
    if cfg.repeat_penalty or llama:
        penalty = cfg.repeat_penalty or 1.0  # our 0 ("off") is their 1.0 ("no penalty")
        body["repeat_penalty" if llama else "repetition_penalty"] = penalty
    if cfg.seed is not None:
        body["seed"] = cfg.seed
    return body


def id_fields(mode: str, chat: bool) -> dict[str, Any]:
    """The extra fields that ask the server for token ids in ``mode``."""
    if mode == IDS_FIELD:
        return {"return_token_ids": True}
    if mode == IDS_LOGPROBS:
        if chat:
            return {"logprobs": True, "top_logprobs": 0, "return_tokens_as_token_ids": True}
        return {"logprobs": 0, "return_tokens_as_token_ids": True}
    return {}


def stream_fields(flavor: str = "") -> dict[str, Any]:
    """Streaming with usage; vLLM is asked for it in every chunk, so it survives an early close
    (only vLLM: a strict server rejects a ``stream_options`` key it does not know)."""
    options: dict[str, Any] = {"include_usage": True}
    if flavor == "vllm":
        options["continuous_usage_stats"] = True
    return {"stream": True, "stream_options": options}


def completion_body(model: str, prompt: str, cfg: GenerateConfig, mode: str, flavor: str,
                    extra: Mapping[str, Any], stream: bool = True) -> dict[str, Any]:
    """A ``/v1/completions`` request."""
    body: dict[str, Any] = {"model": model, "prompt": prompt}
    body.update(sampling_fields(cfg, flavor))
    body.update(id_fields(mode, chat=False))
    if stream:
        body.update(stream_fields(flavor))
    body.update(extra)
    return body


def chat_body(model: str, messages: list[dict[str, str]], cfg: GenerateConfig, mode: str,
              flavor: str, extra: Mapping[str, Any], stream: bool = True) -> dict[str, Any]:
    """A ``/v1/chat/completions`` request."""
    body: dict[str, Any] = {"model": model, "messages": messages}
    body.update(sampling_fields(cfg, flavor))
    body.update(id_fields(mode, chat=True))
    if stream:
        body.update(stream_fields(flavor))
    body.update(extra)
    return body


class WireError(ValueError):
    """A chunk that is not what the OpenAI format says (the backend raises it as
    ``RemoteProtocolError``)."""


@dataclass
class Delta:
    """What one chunk (or a whole non-streamed answer) says about choice 0."""

    text: str = ""
    ids: list[int] | None = None  # None: the chunk gave no ids (text-only server)
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    timings: dict[str, float] = field(default_factory=dict)


def _token_id(token: object) -> int:
    if isinstance(token, str) and token.startswith("token_id:"):
        try:
            return int(token[len("token_id:"):])
        except ValueError:
            pass
    raise WireError(f"expected a logprobs token 'token_id:N', got {token!r}")


def _int_list(value: object, what: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
        raise WireError(f"{what}: expected a list of int, got {value!r}")
    return value


def parse_chunk(data: object, chat: bool, mode: str) -> Delta:
    """Read one JSON chunk of a completions or chat stream (or a whole answer)."""
    if not isinstance(data, dict):
        raise WireError(f"expected a JSON object, got {type(data).__name__}")
    out = Delta()
    usage = data.get("usage")
    if isinstance(usage, dict):
        pt, ct = usage.get("prompt_tokens"), usage.get("completion_tokens")
        out.prompt_tokens = pt if isinstance(pt, int) else None
        out.completion_tokens = ct if isinstance(ct, int) else None
    timings = data.get("timings")  # llama.cpp's server: its own prompt/predict times
    if isinstance(timings, dict):
        out.timings = {k: float(v) for k, v in timings.items() if isinstance(v, (int, float))}
    choices = data.get("choices")
    if choices is None and out.prompt_tokens is not None:
        return out
    if not isinstance(choices, list):
        raise WireError(f"expected 'choices' to be a list, got {choices!r}")
    if out.prompt_tokens is None and isinstance(data.get("prompt_token_ids"), list):
        out.prompt_tokens = len(data["prompt_token_ids"])
    if not choices:  # the usage chunk at the end of a stream
        return out
    choice = choices[0]
    if not isinstance(choice, dict):
        raise WireError(f"expected a choice object, got {choice!r}")
    if chat:
        delta = choice.get("delta")
        if delta is None:
            delta = choice.get("message")  # a non-streamed answer
        text = delta.get("content") if isinstance(delta, dict) else None
    else:
        text = choice.get("text")
    if text is not None and not isinstance(text, str):
        raise WireError(f"expected text to be a string, got {text!r}")
    out.text = text or ""
    reason = choice.get("finish_reason")
    out.finish_reason = reason if isinstance(reason, str) else None
    if out.prompt_tokens is None and isinstance(choice.get("prompt_token_ids"), list):
        out.prompt_tokens = len(choice["prompt_token_ids"])
    if mode == IDS_FIELD and "token_ids" in choice and choice["token_ids"] is not None:
        out.ids = _int_list(choice["token_ids"], "token_ids")
    elif mode == IDS_LOGPROBS and isinstance(choice.get("logprobs"), dict):
        lp = choice["logprobs"]
        tokens = [c.get("token") if isinstance(c, dict) else c for c in lp.get("content") or []] \
            if chat else lp.get("tokens") or []
        out.ids = [_token_id(t) for t in tokens]
    elif mode != IDS_NONE:
        out.ids = []  # an id-giving server sent a chunk with no tokens (a role-only delta)
    return out


def error_fields(body: object) -> tuple[str, str, str, str]:
    """(message, type, code, param) of an error body: OpenAI's ``{"error": {...}}``,
    FastAPI's ``{"detail": ...}``, llama.cpp's, or plain text."""
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict):
            msg = err.get("message") or err.get("detail") or err.get("msg")
            if msg is None and "detail" in body:
                msg = body["detail"]
            if not isinstance(msg, str):
                import json

                msg = json.dumps(msg if msg is not None else body)[:2000]
            return (msg, str(err.get("type") or ""), str(err.get("code") or ""), str(err.get("param") or ""))
        if isinstance(err, str):
            return err, "", "", ""
    if isinstance(body, str):
        return body.strip()[:2000], "", "", ""
    return "", "", "", ""


# -- the server's side: our finish reasons in OpenAI's words, and its error object ----------

FINISH_REASONS = {  # our finish_reason -> OpenAI's
    "length": "length",
    "context_full": "length",
    "stop": "stop",
    "end_of_text": "stop",
    "cancelled": "abort",
    "error": "error",
}


def finish_reason(ours: str | None) -> str | None:
    """OpenAI's finish reason for ours (None while running)."""
    return None if ours is None else FINISH_REASONS.get(ours, ours)


def error_body(
    message: str, type: str = "invalid_request_error", param: str | None = None,
    code: str | None = None,
) -> dict[str, Any]:
    """An OpenAI-style error object: ``{"error": {"message", "type", "param", "code"}}``
    (what ``error_fields`` reads back)."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


__all__ = [
    "FINISH_REASONS", "Delta", "ID_MODES", "IDS_FIELD", "IDS_LOGPROBS", "IDS_NONE", "WireError",
    "chat_body", "completion_body", "error_body", "error_fields", "finish_reason", "id_fields",
    "parse_chunk", "sampling_fields",
]
