"""token_bytes: the bytes behind byte-level BPE and SentencePiece token strings."""

from __future__ import annotations

import pytest

from core_inference.token_bytes import BYTE_LEVEL, SENTENCEPIECE, byte_decoder, token_bytes


def test_the_byte_alphabet_covers_every_byte_once() -> None:
    table = byte_decoder()
    assert sorted(table.values()) == list(range(256))
    assert table["!"] == ord("!") and table["\u0120"] == ord(" ")  # "Ġ" is GPT-2's space


def test_it_is_gpt2s_alphabet() -> None:
    gpt2 = pytest.importorskip("transformers.convert_slow_tokenizer")
    assert {c: b for b, c in gpt2.bytes_to_unicode().items()} == byte_decoder()


def test_byte_level_tokens() -> None:
    assert token_bytes("\u0120hello", BYTE_LEVEL) == b" hello"
    emoji = "🙂".encode()  # four bytes, each written as one alphabet character
    inverse = {b: c for c, b in byte_decoder().items()}
    assert token_bytes("".join(inverse[b] for b in emoji[:2]), BYTE_LEVEL) == emoji[:2]
    assert token_bytes("<|im_end|>", BYTE_LEVEL) == b"<|im_end|>"  # added token, plain text
    assert token_bytes("你好", BYTE_LEVEL) == "你好".encode()  # characters outside the alphabet


def test_sentencepiece_tokens() -> None:
    assert token_bytes("\u2581the", SENTENCEPIECE) == b" the"
    assert token_bytes("<0xE2>", SENTENCEPIECE) == b"\xe2"
    assert token_bytes("<0xE2>", SENTENCEPIECE, byte_fallback=False) == b"<0xE2>"
    assert token_bytes("你好", SENTENCEPIECE) == "你好".encode()


def test_unknown_kind_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown token encoding"):
        token_bytes("x", "wordpiece")
