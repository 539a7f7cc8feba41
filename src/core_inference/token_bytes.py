"""The bytes a tokenizer's token string stands for: shared by the Hugging Face backends.

llama.cpp hands out each token's bytes itself; tokenizers from Hugging Face folders (read
by the MLX, torch and vLLM engines) hold token *strings* in one of two encodings, and a
backend that streams whole UTF-8 text without re-decoding the text so far needs the bytes:

- byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM): every byte is written as one printable
  character of GPT-2's byte-to-unicode alphabet;
- SentencePiece (Gemma, Llama 2): ``▁`` stands for a space, and with byte fallback a
  byte that is no piece of its own is a token ``<0xNN>``.

Standard library only; each backend reads its engine's token table and calls this.
"""

from __future__ import annotations

import re
from functools import lru_cache

BYTE_LEVEL = "bytelevel"
SENTENCEPIECE = "sentencepiece"
SPM_SPACE = "\u2581"
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@lru_cache(maxsize=1)
def byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: the character that stands for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars = list(printable)
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def token_bytes(token: str, kind: str, byte_fallback: bool = True) -> bytes:
    """The bytes ``token`` stands for in a tokenizer of ``kind`` (``BYTE_LEVEL`` or ``SENTENCEPIECE``).

    A byte-level token with a character outside the alphabet (an added token written as
    plain text) is that text's UTF-8.
    """
    if kind == BYTE_LEVEL:
        table = byte_decoder()
        if all(c in table for c in token):
            return bytes(table[c] for c in token)
        return token.encode()
    if kind == SENTENCEPIECE:
        m = _BYTE_TOKEN.fullmatch(token) if byte_fallback else None
        return bytes([int(m.group(1), 16)]) if m else token.replace(SPM_SPACE, " ").encode()
    raise ValueError(f"unknown token encoding {kind!r}")


__all__ = ["BYTE_LEVEL", "SENTENCEPIECE", "SPM_SPACE", "byte_decoder", "token_bytes"]
