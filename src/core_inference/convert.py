"""GGUF to Hugging Face folder: so a GGUF model (the embedded default) runs on every backend.

The MLX, torch and vLLM engines load Hugging Face safetensors folders, llama.cpp loads
GGUF files. ``convert_gguf`` writes a folder (``config.json``, ``generation_config.json``,
the tokenizer with its chat template, ``model.safetensors`` in float32) from a GGUF file,
using transformers' own GGUF reader (extra ``convert``): it dequantises every tensor, so
the folder holds exactly the weights llama.cpp computes with, at four times their
quantised size (about 1.1 GB for Gemma 3 270M).

A conversion is slow (47 s for Gemma 3 270M on 2 cores, about what transformers itself
takes), so its result is kept: the folder carries a stamp naming the GGUF's SHA-256, and a
second call for the same file returns at once (without even hashing it again while the file's
path, size and modification time are unchanged). The folder is written beside its final
place and renamed into it, so an interrupted conversion leaves nothing half-written; an
existing folder that is not a conversion is never overwritten.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress
from functools import partial
from pathlib import Path
from typing import Any

from .default_model import cache_dir
from .errors import BackendUnavailable, ModelLoadError
from .formats.gguf import read_gguf
from .progress import Bar, Ticker, close, megabytes, reporter

STAMP = "core-inference-convert.json"
EXTRA = "convert"
BLOCK = 1 << 20

# The chat template written where the GGUF has none (the same format as the built-in
# template of core_inference.templates, as Jinja so every engine's tokenizer reads it).
_GEMMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)
_TEMPLATES = {"gemma3": _GEMMA3_TEMPLATE}

def convert_gguf(
    gguf_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str] | None = None,
    *,
    progress: bool = True,
) -> Path:
    """Convert ``gguf_path`` to a Hugging Face folder at ``out_dir`` (default: in the cache).

    Returns the folder. ``progress`` shows each step on stderr: a bar for hashing, transformers'
    own bars for the tensors and the writing, each step's seconds, counted live while the
    tokenizer is built (the step with no bar of its own).
    Raises ``ModelLoadError`` for a file it cannot read or an architecture transformers
    cannot convert, ``BackendUnavailable`` when the ``convert`` extra is missing.
    """
    say = _stderr if progress else _quiet
    source = Path(gguf_path).resolve()
    header = read_gguf(source)  # a bad file fails here, before any engine is imported
    arch = header.architecture
    known = _supported_architectures()
    if arch not in known:
        raise ModelLoadError(
            f"cannot convert a {arch!r} GGUF: transformers converts {', '.join(sorted(known))}", path=source
        )
    st = source.stat()
    if out_dir is None:  # in the cache, one folder per content: <stem>-<first 16 hex of its SHA-256>
        kept = cache_dir() / "converted"
        for folder in sorted(kept.glob(f"{source.stem}-*")) if kept.is_dir() else []:
            if _stamp_matches(folder, source, st):
                return folder  # this very file, unchanged since: no hashing
        sha = _sha256(source, progress)
        target = kept / f"{source.stem}-{sha[:16]}"
    else:
        target = Path(out_dir).resolve()
        if _stamp_matches(target, source, st):
            return target
        sha = _sha256(source, progress)
    if _stamp_sha(target) == sha:  # the same content, moved or touched since
        _write_stamp(target, source, st, sha, arch)
        return target
    _check_target(target)
    started = time.monotonic()
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        _convert_into(source, work, arch, header.chat_template, progress)
        _write_stamp(work, source, st, sha, arch)
        if target.exists():  # a conversion of another version of the file: replaced whole
            shutil.rmtree(target)
        os.replace(work, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    say(f"convert: done in {time.monotonic() - started:.0f} s: {target}")
    return target


def convert_default_with(python: str | os.PathLike[str], timeout: float | None = None) -> Path:
    """The embedded default model converted by another interpreter, ``python``, that has the
    ``convert`` extra (kept in the cache as ``convert_gguf`` keeps it): for an environment
    without the converter, such as vLLM's own, which pins an older transformers.

    Raises ``RuntimeError`` with the end of that interpreter's stderr when it fails.
    """
    code = (
        "from core_inference.convert import convert_gguf;"
        "from core_inference.default_model import default_model_path;"
        "print(convert_gguf(default_model_path(progress=False), progress=False))"
    )
    import subprocess

    done = subprocess.run([os.fspath(python), "-c", code], capture_output=True, text=True, check=False,
                          timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"converting the default model with {python} failed:\n{done.stderr[-3000:]}")
    return Path(done.stdout.strip().splitlines()[-1])


def _convert_into(source: Path, work: Path, arch: str, file_template: str | None, progress: bool) -> None:
    try:
        from transformers.utils import logging as hf_logging
    except ImportError as exc:
        raise _missing(exc) from exc
    with nullcontext() if progress else _transformers_bars_off(hf_logging):
        _convert_steps(source, work, arch, file_template, progress)


def _convert_steps(source: Path, work: Path, arch: str, file_template: str | None, progress: bool) -> None:
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
    except ImportError as exc:
        raise _missing(exc) from exc
    folder, name = str(source.parent), source.name
    say = _stderr if progress else _quiet
    try:
        # dequantize=True: a plain dense float32 model (transformers 5 otherwise keeps the
        # weights in their GGUF blocks, which it cannot save as safetensors). Transformers
        # draws its own bar over the tensors, so this step's seconds come at its end only.
        with _step(f"convert: reading and dequantising {name} (transformers)", progress, live=False):
            model = AutoModelForCausalLM.from_pretrained(
                folder, gguf_file=name, dtype=torch.float32, local_files_only=True,
                quantization_config=GgufConfig(dequantize=True),
            )
        # no count of its own inside transformers (15 s for Gemma's 262k tokens here): the
        # elapsed time shows that it goes on
        with _step("convert: building the tokenizer from the GGUF vocabulary", progress):
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    except ImportError as exc:  # transformers names gguf/accelerate when they are missing
        raise _missing(exc) from exc
    except (ValueError, KeyError, RuntimeError, NotImplementedError) as exc:
        raise ModelLoadError(f"transformers could not convert this GGUF: {exc}", path=source) from exc
    template = getattr(tokenizer, "chat_template", None) or file_template or _TEMPLATES.get(arch)
    if template:
        tokenizer.chat_template = template
    else:
        say(f"convert: no chat template in the file and none built in for {arch!r}: chat will be unavailable")
    with _step("convert: writing safetensors", progress, live=False):  # transformers draws a bar too
        model.save_pretrained(work, safe_serialization=True)
        tokenizer.save_pretrained(work)
    del model


@contextmanager
def _transformers_bars_off(hf_logging: Any) -> Iterator[None]:
    """No transformers progress bar while converting: its own bars follow ``hf_logging``,
    but its GGUF reader draws one with ``tqdm`` directly (``modeling_gguf_pytorch_utils``),
    so that module's ``tqdm`` is swapped for a silent one meanwhile."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    drawn = getattr(gguf_utils, "tqdm", None)
    if drawn is not None:
        setattr(gguf_utils, "tqdm", partial(drawn, disable=True))  # noqa: B010 (not re-exported)
    try:
        yield
    finally:
        if drawn is not None:
            setattr(gguf_utils, "tqdm", drawn)  # noqa: B010
        if bars_were_on:
            hf_logging.enable_progress_bar()


def _step(label: str, progress: bool, live: bool = True) -> AbstractContextManager[object]:
    return Ticker(label, live=live) if progress else nullcontext()


def _supported_architectures() -> frozenset[str]:
    try:
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES
    except ImportError as exc:
        raise _missing(exc) from exc
    return frozenset(a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer"))


def _missing(exc: ImportError) -> BackendUnavailable:
    """The converter is transformers (the ``torch`` backend's engine) with gguf and accelerate."""
    return BackendUnavailable("torch", f"converting a GGUF needs transformers, torch and gguf ({exc})", EXTRA)


def _check_target(target: Path) -> None:
    """Never overwrite a folder that is not one of our conversions."""
    if not target.exists():
        return
    if not target.is_dir():
        raise ModelLoadError("the output exists and is not a folder", path=target)
    if any(target.iterdir()) and not (target / STAMP).is_file():
        raise ModelLoadError(
            "the output folder is not empty and is not a conversion: choose a new or empty folder",
            path=target,
        )


def _sha256(path: Path, progress: bool) -> str:
    size = path.stat().st_size
    report = reporter(progress, lambda: Bar(f"convert: hashing {path.name}", megabytes))
    digest = hashlib.sha256()
    done = 0
    try:
        report(0, size)
        with path.open("rb") as fh:
            while block := fh.read(BLOCK):
                digest.update(block)
                done += len(block)
                report(done, size)
    finally:
        close(report)
    return digest.hexdigest()


def _read_stamp(target: Path) -> dict[str, Any] | None:
    with suppress(OSError, ValueError):
        data = json.loads((target / STAMP).read_text(encoding="utf-8"))
        if isinstance(data, dict) and isinstance(data.get("sha256"), str):
            return data
    return None


def _stamp_sha(target: Path) -> str | None:
    """The SHA-256 of the GGUF the folder was converted from, if it is one of ours."""
    data = _read_stamp(target)
    return data["sha256"] if data is not None else None


def _stamp_matches(target: Path, source: Path, st: os.stat_result) -> bool:
    """True when the stamp names this very file, unchanged (path, size, mtime)."""
    data = _read_stamp(target)
    return data is not None and (data.get("source"), data.get("size"), data.get("mtime_ns")) == (
        str(source), st.st_size, st.st_mtime_ns
    )


def _write_stamp(target: Path, source: Path, st: os.stat_result, sha: str, arch: str) -> None:
    import importlib.metadata

    record = {
        "sha256": sha, "source": str(source), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
        "architecture": arch, "transformers": importlib.metadata.version("transformers"),
    }
    (target / STAMP).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def _stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _quiet(text: str) -> None:
    return None
