"""Sampling on torch logits and each token's bytes: the per-token work of the torch backends.

Imported only when a model loads (it imports torch).
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Sequence
from typing import Any

import torch

from ...streaming import engine_seed
from ...token_bytes import token_bytes
from ...types import GenerateConfig

PENALTY_WINDOW = 64  # the last tokens a repeat penalty looks at (llama.cpp's default)


class Sampler:
    """One sequence's sampler for a ``GenerateConfig``, in the order llama.cpp applies them.

    The repeat penalty (over the last ``PENALTY_WINDOW`` tokens, prompt included: a
    positive logit is divided by it, a negative one multiplied), then greedy (argmax), or
    top-k, top-p (both on the untempered distribution), temperature and a draw from the
    sequence's own ``torch.Generator``, seeded from ``engine_seed(seed, 64)`` so a seed
    gives the same tokens on every run (and ``seed=None`` a random one).
    """

    __slots__ = ("_gen", "_window", "greedy", "penalty", "temperature", "top_k", "top_p")

    def __init__(self, cfg: GenerateConfig, history: Sequence[int], device: Any) -> None:
        self.greedy = cfg.temperature == 0.0
        self.penalty = cfg.repeat_penalty if cfg.repeat_penalty not in (0.0, 1.0) else 0.0
        self.temperature = cfg.temperature
        self.top_k = cfg.top_k
        self.top_p = cfg.top_p if 0.0 < cfg.top_p < 1.0 else 0.0
        self._window: deque[int] | None = None
        if self.penalty:
            self._window = deque(history[-PENALTY_WINDOW:], maxlen=PENALTY_WINDOW)
        self._gen: torch.Generator | None = None
        if not self.greedy:
            self._gen = torch.Generator(device=device)
            if cfg.seed is None:
                self._gen.seed()
            else:
                self._gen.manual_seed(engine_seed(cfg.seed, 64))

    @property
    def plain_greedy(self) -> bool:
        """True when sampling is an argmax over the logits (greedy, no penalty)."""
        return self.greedy and self._window is None

    def sample(self, logits: torch.Tensor) -> int:
        """The next token from one position's logits (a 1-D tensor; run under inference mode)."""
        if self._window is not None and self._window:
            logits = logits.float().clone()
            seen = torch.tensor(sorted(set(self._window)), device=logits.device)
            vals = logits[seen]
            logits[seen] = torch.where(vals > 0, vals / self.penalty, vals * self.penalty)
        tid = int(logits.argmax()) if self.greedy else self._draw(logits.float())
        if self._window is not None:
            self._window.append(tid)
        return tid

    def _draw(self, logits: torch.Tensor) -> int:
        vals, idx = logits, None
        if 0 < self.top_k < logits.shape[-1]:
            vals, idx = torch.topk(logits, self.top_k)  # sorted, highest first
        elif self.top_p:
            vals, idx = torch.sort(logits, descending=True)
        if self.top_p:
            probs = torch.softmax(vals, -1)
            keep = (torch.cumsum(probs, -1) - probs) < self.top_p  # the first always stays
            vals = vals[keep]
            if idx is not None:
                idx = idx[keep]
        probs = torch.softmax(vals / self.temperature, -1)
        pick = torch.multinomial(probs, 1, generator=self._gen)
        return int(idx[pick] if idx is not None else pick)


def decoder_kind(tokenizer: Any) -> tuple[str, bool]:
    """How token strings hold bytes: ("bytelevel" | "sentencepiece" | "", byte_fallback)."""
    try:
        spec = json.loads(tokenizer.backend_tokenizer.to_str())
    except (AttributeError, ValueError, TypeError):
        return "", False
    model = spec.get("model") or {}
    fallback = bool(model.get("byte_fallback"))

    def kinds(dec: Any) -> list[str]:
        if not isinstance(dec, dict):
            return []
        if dec.get("type") == "Sequence":
            return [k for d in dec.get("decoders") or [] for k in kinds(d)]
        if dec.get("type") == "ByteLevel":
            return ["bytelevel"]
        if dec.get("type") == "Metaspace":
            return ["sentencepiece"]
        if dec.get("type") == "Replace" and (dec.get("pattern") or {}).get("String") == "\u2581":
            return ["sentencepiece"]
        return []

    found = kinds(spec.get("decoder"))
    return (found[0] if found else ""), fallback


class TokenPieces:
    """Each token id's bytes, computed once per id, for whole-UTF-8 streaming without re-decoding.

    Byte-level BPE tokens (GPT-2, Llama 3, Qwen) map back through the byte alphabet;
    SentencePiece-style tokens (Gemma, Llama 2) turn "▁" into a space and ``<0xAB>`` into
    the byte. Special (control) tokens are b"". Any other tokenizer falls back to its
    own text of the single token (exact for tokens that hold whole characters).
    """

    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer
        self.kind, self._fallback = decoder_kind(tokenizer)
        added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        self._special = {int(i) for i, t in added.items() if getattr(t, "special", False)}
        self._special.update(int(i) for i in getattr(tokenizer, "all_special_ids", []) or [])
        self._added = {int(i): str(t.content) for i, t in added.items() if not getattr(t, "special", False)}
        self._cache: dict[int, bytes] = {}

    @property
    def exact(self) -> bool:
        """True when pieces are the tokenizer's own bytes (so joining them is detokenizing)."""
        return bool(self.kind)

    def __call__(self, tid: int) -> bytes:
        piece = self._cache.get(tid)
        if piece is None:
            piece = self._cache[tid] = self._make(tid)
        return piece

    def _make(self, tid: int) -> bytes:
        if tid in self._special:
            return b""
        if tid in self._added:
            return self._added[tid].encode()
        token = self._tok.convert_ids_to_tokens(tid)
        if not isinstance(token, str):  # an id past the tokenizer's vocabulary (padded embeddings)
            return b""
        if self.kind:
            return token_bytes(token, self.kind, self._fallback)
        return str(self._tok.convert_tokens_to_string([token])).encode()


__all__ = ["PENALTY_WINDOW", "Sampler", "TokenPieces", "decoder_kind"]
