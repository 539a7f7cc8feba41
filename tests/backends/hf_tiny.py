"""Tiny random Hugging Face models, built in the test run with transformers' own classes.

The MLX, torch and vLLM backends load Hugging Face safetensors folders. Their fast
tests need a real folder that the real engines load (config, tokenizer with a chat
template, weights) without a model hub and without committing blobs: this module
trains a byte-level BPE tokenizer on a few lines of text (so UTF-8 split across
tokens is exercised: the corpus has accents, CJK and emoji), builds a model from
transformers' config class for the architecture with random weights from a fixed
seed, and saves both. A few hundred KB, a couple of seconds.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ("<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>")
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! Bonjour le monde, ça va? Grüße aus Köln.",
    "你好，世界。今日は良い天気です。",  # noqa: RUF001  (CJK punctuation on purpose)
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2026.",
    "Emoji 🙂 🚀 ✨ and symbols: € £ ¥ © ®.",
    "def add(a, b):\n    return a + b\n",
    "User: what is two plus two?\nAssistant: four.",
] * 4
ARCHITECTURES = ("llama", "gemma3_text")


def make_tiny_model(folder: str | os.PathLike[str], arch: str = "llama", *, seed: int = 0) -> Path:
    """Write a tiny random ``arch`` model (``llama`` or ``gemma3_text``) to ``folder``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, GenerationConfig, PreTrainedTokenizerFast

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=list(SPECIALS), initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    raw.train_from_iterator(CORPUS, trainer)
    tok = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=raw, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    tok.chat_template = CHATML
    tok.save_pretrained(out)

    vocab = len(tok)
    ids = {name: tok.convert_tokens_to_ids(name) for name in SPECIALS}
    common: dict[str, Any] = dict(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
        pad_token_id=ids["<pad>"], bos_token_id=ids["<s>"], eos_token_id=ids["</s>"],
        tie_word_embeddings=False,
    )
    if arch == "llama":
        from transformers import LlamaConfig

        config: object = LlamaConfig(**common)
    elif arch == "gemma3_text":
        from transformers import Gemma3TextConfig

        config = Gemma3TextConfig(**common, sliding_window=64, query_pre_attn_scalar=16)
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}; known: {', '.join(ARCHITECTURES)}")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # type: ignore[no-untyped-call]
    # Random weights put every token near-uniform; a larger scale gives peaked, varied
    # greedy output (not one token repeated), which the stop and batch tests need.
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.2)
    model.generation_config = GenerationConfig(  # type: ignore[no-untyped-call]
        bos_token_id=ids["<s>"], eos_token_id=[ids["</s>"], ids["<|im_end|>"]], pad_token_id=ids["<pad>"]
    )
    model.save_pretrained(out, safe_serialization=True)
    return out
