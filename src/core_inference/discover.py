"""``discover``: find every model under a folder without loading any.

``core_inference`` imports this module eagerly (so ``core_inference.discover`` is always
the function, never this module), so what is heavy here is imported only when used.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import ModelLoadError
from .formats import is_gguf, is_hf_folder

if TYPE_CHECKING:
    from collections.abc import Mapping
    from pathlib import Path

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
    """Yield every GGUF file and Hugging Face folder under ``base_dir``, sorted by path.

    A model that cannot be read is yielded with ``error`` set; nothing is raised for it.
    """
    from pathlib import Path

    base = Path(base_dir)
    if not base.is_dir():
        raise NotADirectoryError(f"{base}: not a folder")
    if _is_hf(base):
        yield _describe_hf(base)
    yield from _scan(base)


def _is_hf(folder: Path) -> bool:
    try:
        return is_hf_folder(folder)
    except OSError:
        return False


def _scan(folder: Path) -> Iterator[DiscoveredModel]:
    """Depth first, entries in name order, so paths come out sorted (part by part)."""
    try:
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError:  # unreadable folder: skip it, as os.walk would
        return
    for entry in entries:
        path = folder / entry.name
        try:
            is_dir = entry.is_dir(follow_symlinks=False)
            is_file = entry.is_file()
        except OSError:
            continue
        if is_dir:
            if _is_hf(path):
                yield _describe_hf(path)
            yield from _scan(path)
        elif is_file or entry.is_symlink():  # a dangling link is reported, not skipped
            lower = entry.name.lower()
            if lower.endswith(".gguf") or (not lower.endswith(_NOT_GGUF) and is_gguf(path)):
                yield _describe_gguf(path)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _describe_gguf(path: Path) -> DiscoveredModel:
    from .formats.gguf import read_gguf

    size = _size(path)
    try:
        header = read_gguf(path)
    except ModelLoadError as exc:
        return DiscoveredModel(str(path), "gguf", file_count=1, size_bytes=size, error=str(exc))
    quant, _ = header.file_type
    return DiscoveredModel(str(path), "gguf", header.architecture, quant, 1, size)


def _describe_hf(folder: Path) -> DiscoveredModel:
    from .formats.hf import read_hf_folder

    try:
        hf = read_hf_folder(folder)
    except ModelLoadError as exc:
        weights = sorted(folder.glob("*.safetensors"))
        return DiscoveredModel(
            str(folder), "safetensors", file_count=len(weights),
            size_bytes=sum(_size(w) for w in weights), error=str(exc),
        )
    return DiscoveredModel(
        str(folder), "safetensors", hf.model_type, hf.quantisation, len(hf.shards), hf.size_bytes
    )


def hf_quantisation(config: Mapping[str, object]) -> str:
    """A short quantisation label from a Hugging Face config ("" when unquantised).

    Kept here for callers of 0.1; it is ``core_inference.formats.hf.hf_quantisation``.
    """
    from .formats.hf import hf_quantisation as label

    return label(config)


__all__ = ["DiscoveredModel", "discover", "hf_quantisation", "is_hf_folder"]
