"""Check a model path before any backend or engine sees it (standard library only).

``check_model_path`` is what ``load_model`` calls first: a missing path, a corrupt or
truncated GGUF file, or a Hugging Face folder with a broken ``config.json`` (or
tokenizer config, generation config, chat template or shard index: ``formats.hf``) or
``*.safetensors`` header becomes a ``ModelLoadError`` naming the file and what is
wrong, instead of an engine crash, a ``NoBackendAvailable`` or a Python traceback
from deep inside an engine. Only headers are read: a multi-gigabyte model is checked
in milliseconds (GGUF) or microseconds per shard (safetensors).
"""

from __future__ import annotations

import json
import os
import struct
import threading
from collections import OrderedDict
from typing import Any

from ..errors import ModelLoadError
from . import GGUF, GGUF_MAGIC, HF, URL, is_url
from .gguf import GGUFHeader, read_gguf
from .hf import MAX_CONFIG_BYTES as MAX_CONFIG_BYTES
from .hf import HFFolder, json_type, read_hf_folder

MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024  # the safetensors library's own limit

# safetensors dtype -> bits per element
SAFETENSORS_DTYPES: dict[str, int] = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32,
    "I64": 64, "U64": 64, "F64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}

_cache_lock = threading.Lock()
_headers: OrderedDict[tuple[str, int, int, int], GGUFHeader] = OrderedDict()
_CACHE_SIZE = 8


def check_model_path(path: str | os.PathLike[str]) -> str:
    """Validate a model path; return its format: ``"gguf"``, ``"safetensors"`` or ``"url"``.

    URLs are not checked (a remote server answers for itself). A file must be a valid
    GGUF file (header, metadata and tensor table, with the tensor data inside the file);
    a folder must hold a ``config.json`` that is a JSON object and ``*.safetensors``
    files whose headers parse and describe tensors that lie inside the file.
    Raises ``ModelLoadError`` naming the file and the problem; ``TypeError`` for a
    path that is not a string or ``os.PathLike``.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"model path: expected str or os.PathLike, got {type(path).__name__}")
    name = os.fspath(path)
    if not isinstance(name, str):
        raise TypeError(f"model path: expected a str path, got {type(name).__name__}")
    if is_url(name):
        return URL
    if "\0" in name:
        raise ModelLoadError(f"{name!r}: invalid path (contains a NUL character)", path=name)
    if not os.path.exists(name):
        raise ModelLoadError(f"{name}: no such file or folder", path=name)
    if os.path.isdir(name):
        check_hf_folder(name)
        return HF
    if not os.path.isfile(name):
        raise ModelLoadError(f"{name}: not a regular file or folder (a device, pipe or socket?)", path=name)
    if name.endswith(".safetensors") and not _starts_with(name, GGUF_MAGIC):
        raise ModelLoadError(
            f"{name}: a lone .safetensors file cannot be loaded; pass the Hugging Face folder "
            "that holds it with its config.json",
            path=name,
        )
    gguf_header(name)
    return GGUF


def gguf_header(path: str | os.PathLike[str]) -> GGUFHeader:
    """``read_gguf(path)``, remembered for the same unchanged file.

    ``load_model`` checks a GGUF file and the ``llama_cpp`` backend then needs its
    header: this reads it once. The key is the file's path, size, modification time
    and inode, so a file replaced or rewritten in between is read again.
    """
    name = os.fspath(path)
    try:
        st = os.stat(name)
    except OSError as exc:
        raise ModelLoadError(f"{name}: cannot read model file: {exc}", path=name) from exc
    key = (name, st.st_size, st.st_mtime_ns, st.st_ino)
    with _cache_lock:
        header = _headers.get(key)
        if header is not None:
            _headers.move_to_end(key)
            return header
    header = read_gguf(name)
    with _cache_lock:
        _headers[key] = header
        while len(_headers) > _CACHE_SIZE:
            _headers.popitem(last=False)
    return header


def check_hf_folder(folder: str | os.PathLike[str]) -> HFFolder:
    """Validate a Hugging Face model folder; return what ``read_hf_folder`` read from it.

    ``read_hf_folder`` checks ``config.json``, the generation and tokenizer configs, the
    chat template files and the shard list (index included); then every shard's
    safetensors header is checked here.
    """
    hf = read_hf_folder(folder)
    for shard in hf.shards:
        check_safetensors(shard)
    return hf


def check_safetensors(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Validate a ``.safetensors`` file's header; return it (tensor name -> entry).

    The file starts with an 8-byte little-endian header length, then that many bytes
    of a UTF-8 JSON object mapping tensor names to ``{"dtype", "shape",
    "data_offsets"}`` (plus an optional ``"__metadata__"`` of strings); each tensor's
    byte range must lie inside the data that follows and match its dtype and shape.
    """
    name = os.fspath(path)
    try:
        with open(name, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size < 8:
                raise _st_fail(name, f"only {size} bytes, too short for the 8-byte header length")
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > size - 8:
                raise _st_fail(
                    name, f"header length {n} runs past the end of the file ({size} bytes); truncated?"
                )
            if n > MAX_SAFETENSORS_HEADER:
                raise _st_fail(name, f"absurd header length {n} (limit {MAX_SAFETENSORS_HEADER})")
            raw = fh.read(n)
    except ModelLoadError:
        raise
    except OSError as exc:
        raise ModelLoadError(f"{name}: cannot read model file: {exc}", path=name) from exc
    try:
        header = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise _st_fail(name, f"header is not valid UTF-8 ({exc.reason})") from None
    except (ValueError, RecursionError) as exc:
        raise _st_fail(name, f"header is not valid JSON ({str(exc)[:120]})") from None
    if not isinstance(header, dict):
        raise _st_fail(name, f"header is a JSON {json_type(header)}, not an object")
    data_size = size - 8 - n
    for key, entry in header.items():
        if key == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                raise _st_fail(name, "__metadata__ must be an object of strings")
            continue
        _check_tensor_entry(name, key, entry, data_size)
    return header


def _check_tensor_entry(name: str, key: str, entry: object, data_size: int) -> None:
    if not isinstance(entry, dict):
        raise _st_fail(name, f"tensor {key!r}: entry is not an object")
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in entry]
    if missing:
        raise _st_fail(name, f"tensor {key!r}: missing {', '.join(missing)}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
        raise _st_fail(name, f"tensor {key!r}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise _st_fail(name, f"tensor {key!r}: shape must be a list of non-negative integers, got {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_count(o) for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise _st_fail(name, f"tensor {key!r}: data_offsets must be [begin, end] with begin <= end")
    begin, end = offsets
    if end > data_size:
        raise _st_fail(
            name,
            f"tensor {key!r}: data_offsets [{begin}, {end}] run past the end of the data "
            f"({data_size} bytes); truncated?",
        )
    elements = 1
    for d in shape if 0 not in shape else ():
        elements *= d
        if elements > (end - begin) * 2:  # more than even 4-bit data of this size holds
            raise _st_fail(
                name, f"tensor {key!r}: shape {shape} does not fit its {end - begin} bytes of data"
            )
    bits = elements * SAFETENSORS_DTYPES[dtype] if 0 not in shape else 0
    if end - begin != (bits + 7) // 8:  # sub-byte dtypes (F4, F6) round up to whole bytes
        raise _st_fail(
            name,
            f"tensor {key!r}: {end - begin} bytes of data for shape {shape} of {dtype} "
            f"(expected {(bits + 7) // 8})",
        )


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _st_fail(name: str, what: str) -> ModelLoadError:
    return ModelLoadError(f"{name}: not a valid safetensors file: {what}", path=name)


def _starts_with(name: str, magic: bytes) -> bool:
    try:
        with open(name, "rb") as fh:
            return fh.read(len(magic)) == magic
    except OSError:
        return False


__all__ = ["check_hf_folder", "check_model_path", "check_safetensors", "gguf_header"]
