"""The bytes each token stands for, from the tokenizer's own tables (no decode of text so far).

mlx-lm's ``TokenizerWrapper`` builds a table of its tokenizer's tokens once, for its
streaming detokenizer: byte-level BPE token strings (GPT-2's byte-to-unicode alphabet)
or SentencePiece pieces as UTF-8 (``▁`` for a space, ``<0xNN>`` byte fallback already
turned into the byte). This reads the same table and returns raw bytes per token,
which the core's ``TokenFinisher`` turns into whole UTF-8 text. Control tokens stand
for nothing, as in llama.cpp. A tokenizer of another kind falls back to decoding
the single token on its own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ...token_bytes import BYTE_LEVEL, token_bytes

SPM_SPACE = "\u2581".encode()


def token_pieces(tokenizer: Any) -> Callable[[int], bytes]:
    """A function from token id to its bytes for an mlx-lm ``TokenizerWrapper`` (cached per id)."""
    detok = tokenizer.detokenizer
    kind = type(detok).__name__
    table: Any = getattr(detok, "tokenmap", None)
    control = _control_ids(tokenizer)
    cache: dict[int, bytes] = {}

    def bpe(tid: int) -> bytes:
        return token_bytes(table[tid], BYTE_LEVEL)

    def spm(tid: int) -> bytes:
        return bytes(table[tid]).replace(SPM_SPACE, b" ")

    def single(tid: int) -> bytes:
        return str(tokenizer.decode([tid])).encode()

    if kind == "BPEStreamingDetokenizer" and table is not None:
        convert = bpe
    elif kind == "SPMStreamingDetokenizer" and table is not None:
        convert = spm
    else:
        convert = single
    size = len(table) if table is not None else len(tokenizer)

    def piece(tid: int) -> bytes:
        got = cache.get(tid)
        if got is None:
            got = b"" if tid in control or not 0 <= tid < size else convert(tid)
            cache[tid] = got
        return got

    return piece


def _control_ids(tokenizer: Any) -> frozenset[int]:
    """Special tokens (BOS, EOS, pad, chat markers): they render as nothing in a stream."""
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    ids = {int(i) for i, tok in added.items() if getattr(tok, "special", False)}
    ids.update(int(i) for i in (getattr(tokenizer, "all_special_ids", None) or ()))
    return frozenset(ids)


__all__ = ["token_pieces"]
