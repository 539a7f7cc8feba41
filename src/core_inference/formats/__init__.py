"""Model file formats (standard library only).

This module is the cheap sniffing of what a model path is: a GGUF file, a Hugging Face
folder, or a URL. It imports none of its submodules, which do the real reading:

- ``formats.gguf``: the bounded GGUF header reader (``read_gguf``);
- ``formats.hf``: a Hugging Face model folder's config, generation config, tokenizer
  config, chat template and shard list (``read_hf_folder``), shared by the MLX, torch
  and vLLM backends;
- ``formats.validate``: ``check_model_path``, which ``load_model`` calls before any
  backend sees a path.
"""

from __future__ import annotations

import os

GGUF, HF, URL = "gguf", "safetensors", "url"
GGUF_MAGIC = b"GGUF"


def is_gguf(path: str | os.PathLike[str]) -> bool:
    """True if the file starts with the GGUF magic bytes (a cheap sniff, not validation)."""
    try:
        with open(path, "rb") as fh:
            return fh.read(4) == GGUF_MAGIC
    except OSError:
        return False


def is_url(path: str | os.PathLike[str]) -> bool:
    """True for an ``http://`` or ``https://`` address."""
    text = os.fspath(path)
    return text.startswith(("http://", "https://"))


def is_hf_folder(path: str | os.PathLike[str]) -> bool:
    """True for a folder holding ``config.json`` and at least one ``*.safetensors`` file."""
    folder = os.fspath(path)
    if not os.path.isfile(os.path.join(folder, "config.json")):
        return False
    with os.scandir(folder) as entries:
        return any(e.name.endswith(".safetensors") and e.is_file() for e in entries)


def sniff_format(path: str | os.PathLike[str]) -> str | None:
    """"gguf", "safetensors", "url", or None when the path is none of these."""
    if is_url(path):
        return URL
    if os.path.isfile(path):
        return GGUF if is_gguf(path) else None
    if os.path.isdir(path) and is_hf_folder(path):
        return HF
    return None
