"""``discover``: find every model under a folder without loading any."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelLoadError
from .formats import is_hf_folder
from .gguf import is_gguf, read_gguf


_NOT_GGUF = (".json", ".safetensors", ".txt", ".md", ".py", ".bin", ".pt", ".model")


@dataclass(frozen=True, slots=True)
class DiscoveredModel:
    """A model found on disk; ``error`` says why it could not be read, if it could not."""

    path: str
    format: str  # "gguf" or "safetensors"
    model_type: str = ""
    quantisation: str = ""
    file_count: int = 0
    size_bytes: int = 0
    error: str | None = None


def discover(base_dir: str | os.PathLike[str]) -> Iterator[DiscoveredModel]:
    """Yield every GGUF file and Hugging Face folder under ``base_dir``, sorted by path."""
    base = Path(base_dir)
    if not base.is_dir():
        raise NotADirectoryError(f"{base}: not a folder")
    for root, dirs, files in os.walk(base, onerror=None):
        dirs.sort()
        folder = Path(root)
        if "config.json" in files and any(f.endswith(".safetensors") for f in files):
            yield _describe_hf(folder)
        for name in sorted(files):
            path = folder / name
            if name.lower().endswith(".gguf") or (
                not name.lower().endswith(_NOT_GGUF) and is_gguf(path)
            ):
                yield _describe_gguf(path)


def _describe_gguf(path: Path) -> DiscoveredModel:
    size = path.stat().st_size
    try:
        header = read_gguf(path)
    except ModelLoadError as exc:
        return DiscoveredModel(str(path), "gguf", file_count=1, size_bytes=size, error=str(exc))
    quant, _ = header.file_type
    return DiscoveredModel(str(path), "gguf", header.architecture, quant, 1, size)


def _describe_hf(folder: Path) -> DiscoveredModel:
    weights = sorted(folder.glob("*.safetensors"))
    size = sum(w.stat().st_size for w in weights)
    config_path = folder / "config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
        if not isinstance(config, dict):
            raise ValueError("config.json is not a JSON object")
    except (OSError, ValueError) as exc:
        return DiscoveredModel(
            str(folder), "safetensors", file_count=len(weights), size_bytes=size,
            error=f"{config_path}: unreadable config: {exc}",
        )
    return DiscoveredModel(
        str(folder), "safetensors", str(config.get("model_type", "")),
        hf_quantisation(config), len(weights), size,
    )


def hf_quantisation(config: dict[str, object]) -> str:
    """A short quantisation label from a Hugging Face config ("" when unquantised)."""
    q = config.get("quantization_config") or config.get("quantization")
    if not isinstance(q, dict):
        return str(config.get("torch_dtype", "") or "")
    method = str(q.get("quant_method", "") or "")
    bits = q.get("bits")
    group = q.get("group_size")
    label = f"{method}-{bits}bit" if method and bits else (f"{bits}bit" if bits else method)
    return f"{label}-g{group}" if group else label


__all__ = ["DiscoveredModel", "discover", "hf_quantisation", "is_hf_folder"]
