"""A tiny random llama folder that vLLM's CPU build loads (its attention wants head_dim >= 32).

``tests/backends/hf_tiny.py`` makes the tokenizer, chat template and a head_dim-16 model;
this rebuilds the model in the same folder with head_dim 32 by the same recipe
(transformers' own classes, a fixed seed, weights scaled for varied greedy output).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from backends.hf_tiny import make_tiny_model


def make_vllm_tiny(folder: str | os.PathLike[str], *, seed: int = 0) -> Path:
    """Write a tiny random llama (hidden 128, 4 heads of 32, 2 layers) that vLLM can run."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig

    out = make_tiny_model(folder, "llama", seed=seed)
    config: Any = LlamaConfig.from_pretrained(out)
    config.hidden_size, config.intermediate_size, config.head_dim = 128, 256, 32
    torch.manual_seed(seed)
    model: Any = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # type: ignore[no-untyped-call]
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.2)
    model.generation_config = GenerationConfig.from_pretrained(out)  # its end-of-text ids
    model.save_pretrained(out, safe_serialization=True)
    return out
