"""A bounded, stdlib-only GGUF header reader: validates a file before any engine sees it.

llama.cpp can abort the whole process on a malformed file, so every length and count
is checked against the file's real size here, and any problem is a ``ModelLoadError``
that names the file and what is wrong.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass, field
from typing import Any

from ..errors import ModelLoadError
from . import GGUF_MAGIC as GGUF_MAGIC
from . import is_gguf as is_gguf  # kept importable from here

MAX_COUNT = 1 << 24  # keys or tensors: far beyond any real model
MAX_DIMS = 4
KEEP_ARRAY_ITEMS = 64  # arrays longer than this are skipped, not decoded
MAX_ARRAY_DEPTH = 8  # arrays of arrays nest no deeper than this (real files: 1 or 2)

# value type id -> struct format of a scalar
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
_U64 = struct.Struct("<Q")

# ggml tensor type id -> (name, elements per block, bytes per block)
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 36),
    10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50), 20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2),
    26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66), 39: ("MXFP4", 32, 17),
}

# general.file_type -> (name, bits)
FILE_TYPES: dict[int, tuple[str, int]] = {
    0: ("F32", 32), 1: ("F16", 16), 2: ("Q4_0", 4), 3: ("Q4_1", 4), 7: ("Q8_0", 8),
    8: ("Q5_0", 5), 9: ("Q5_1", 5), 10: ("Q2_K", 2), 11: ("Q3_K_S", 3), 12: ("Q3_K_M", 3),
    13: ("Q3_K_L", 3), 14: ("Q4_K_S", 4), 15: ("Q4_K_M", 4), 16: ("Q5_K_S", 5),
    17: ("Q5_K_M", 5), 18: ("Q6_K", 6), 19: ("IQ2_XXS", 2), 20: ("IQ2_XS", 2),
    21: ("Q2_K_S", 2), 22: ("IQ3_XS", 3), 23: ("IQ3_XXS", 3), 24: ("IQ1_S", 1),
    25: ("IQ4_NL", 4), 26: ("IQ3_S", 3), 27: ("IQ3_M", 3), 28: ("IQ2_S", 2),
    29: ("IQ2_M", 2), 30: ("IQ4_XS", 4), 31: ("IQ1_M", 1), 32: ("BF16", 16),
    36: ("TQ1_0", 1), 37: ("TQ2_0", 2), 38: ("MXFP4_MOE", 4),
}


@dataclass(frozen=True, slots=True)
class SkippedArray:
    """A metadata array too long to keep: its element type and length only."""

    item_type: int
    length: int


@dataclass(frozen=True, slots=True)
class GGUFHeader:
    """A validated GGUF header: version, metadata and tensor layout."""

    path: str
    version: int
    tensor_count: int
    metadata: dict[str, Any] = field(default_factory=dict)
    file_size: int = 0
    data_offset: int = 0
    data_size: int = 0

    @property
    def architecture(self) -> str:
        """``general.architecture``, e.g. "gemma3"."""
        return str(self.metadata.get("general.architecture", ""))

    def arch_value(self, key: str, default: Any = 0) -> Any:
        """``<architecture>.<key>`` from the metadata."""
        return self.metadata.get(f"{self.architecture}.{key}", default)

    @property
    def file_type(self) -> tuple[str, int]:
        """(quantisation name, bits) from ``general.file_type``, or ("", 0)."""
        ft = self.metadata.get("general.file_type")
        return FILE_TYPES.get(ft, (f"type {ft}", 0)) if isinstance(ft, int) else ("", 0)

    @property
    def chat_template(self) -> str | None:
        """``tokenizer.chat_template`` if the file carries one."""
        value = self.metadata.get("tokenizer.chat_template")
        return value if isinstance(value, str) and value.strip() else None

    @property
    def vocab_size(self) -> int:
        """Number of tokens in ``tokenizer.ggml.tokens``."""
        tokens = self.metadata.get("tokenizer.ggml.tokens")
        if isinstance(tokens, SkippedArray):
            return tokens.length
        return len(tokens) if isinstance(tokens, list) else 0


class _Reader:
    __slots__ = ("buf", "path", "pos", "size")

    def __init__(self, buf: bytes | mmap.mmap, size: int, path: str) -> None:
        self.buf, self.pos, self.size, self.path = buf, 0, size, path

    def fail(self, what: str) -> ModelLoadError:
        return ModelLoadError(
            f"{self.path}: not a valid GGUF file: {what} (at byte {self.pos})", path=self.path
        )

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(f"{what} runs past the end of the file ({self.size} bytes); truncated?")

    def scalar(self, fmt: str, what: str) -> Any:
        n = struct.calcsize("<" + fmt)
        self.need(n, what)
        (value,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += n
        return value

    def string_bytes(self, what: str) -> bytes:
        n = self.scalar("Q", f"length of {what}")
        self.need(n, what)
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return raw

    def string(self, what: str) -> str:
        raw = self.string_bytes(what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise self.fail(f"{what} is not valid UTF-8 ({exc.reason})") from None

    def skip_string(self, what: str) -> None:
        n = self.scalar("Q", f"length of {what}")
        self.need(n, what)
        self.pos += n

    def skip_strings(self, count: int, what: str) -> None:
        """``skip_string`` ``count`` times, as one tight loop: a vocabulary has 100k-260k strings."""
        buf, pos, size, unpack = self.buf, self.pos, self.size, _U64.unpack_from
        for _ in range(count):
            if pos + 8 > size:
                self.pos = pos
                self.need(8, f"length of {what}")  # raises, as skip_string would
            (n,) = unpack(buf, pos)
            pos += 8 + n
            if pos > size:
                self.pos = pos - n
                self.need(n, what)  # raises, as skip_string would
        self.pos = pos

    def value(self, vtype: int, key: str) -> Any:
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype], f"value of {key!r}")
        if vtype == _STRING:
            return self.string(f"value of {key!r}")
        if vtype == _ARRAY:
            return self.array(key)
        raise self.fail(f"key {key!r} has unknown value type {vtype}")

    def array(self, key: str, depth: int = 1) -> Any:
        if depth > MAX_ARRAY_DEPTH:
            raise self.fail(f"array {key!r} nests arrays deeper than {MAX_ARRAY_DEPTH} levels")
        item_type = self.scalar("I", f"array type of {key!r}")
        length = self.scalar("Q", f"array length of {key!r}")
        if item_type in _SCALARS:
            width = struct.calcsize("<" + _SCALARS[item_type])
            self.need(length * width, f"array {key!r} of {length} items")
            if length > KEEP_ARRAY_ITEMS:
                self.pos += length * width
                return SkippedArray(item_type, length)
            return [self.value(item_type, key) for _ in range(length)]
        if item_type == _STRING:
            self.need(length * 8, f"array {key!r} of {length} strings")
            if length > KEEP_ARRAY_ITEMS:
                self.skip_strings(length, f"item of {key!r}")
                return SkippedArray(item_type, length)
            return [self.string(f"item of {key!r}") for _ in range(length)]
        if item_type == _ARRAY:
            self.need(length * 12, f"array {key!r} of {length} arrays")
            items = [self.array(key, depth + 1) for _ in range(length)]
            return items if length <= KEEP_ARRAY_ITEMS else SkippedArray(item_type, length)
        raise self.fail(f"array {key!r} has unknown item type {item_type}")


def read_gguf(path: str | os.PathLike[str], check_data: bool = True) -> GGUFHeader:
    """Read and validate a GGUF file's header, metadata and tensor table.

    With ``check_data`` the tensors' data must lie inside the file, which catches a
    truncated download. Raises ``ModelLoadError`` naming the file and the problem.
    """
    name = os.fspath(path)
    try:
        with open(name, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size < 24:
                raise ModelLoadError(
                    f"{name}: not a valid GGUF file: only {size} bytes, too short for a header", path=name
                )
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _parse(_Reader(buf, size, name), check_data)
    except ModelLoadError:
        raise
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{name}: cannot read model file: {exc}", path=name) from exc


def _parse(r: _Reader, check_data: bool) -> GGUFHeader:
    magic = bytes(r.buf[0:4])
    if magic != GGUF_MAGIC:
        raise ModelLoadError(
            f"{r.path}: not a GGUF file (magic bytes {magic!r}, expected b'GGUF')", path=r.path
        )
    r.pos = 4
    version = r.scalar("I", "version")
    if version not in (2, 3):
        raise r.fail(f"unsupported GGUF version {version} (supported: 2, 3)")
    tensor_count = r.scalar("Q", "tensor count")
    kv_count = r.scalar("Q", "metadata count")
    if tensor_count > MAX_COUNT:
        raise r.fail(f"absurd tensor count {tensor_count}")
    if kv_count > MAX_COUNT:
        raise r.fail(f"absurd metadata key count {kv_count}")
    metadata: dict[str, Any] = {}
    for _ in range(kv_count):
        key = r.string("metadata key")
        vtype = r.scalar("I", f"value type of {key!r}")
        metadata[key] = r.value(vtype, key)
    data_end = 0
    for _ in range(tensor_count):
        tname = r.string("tensor name")
        n_dims = r.scalar("I", f"dimension count of tensor {tname!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise r.fail(f"tensor {tname!r} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")
        dims = [r.scalar("Q", f"dimensions of tensor {tname!r}") for _ in range(n_dims)]
        ttype = r.scalar("I", f"type of tensor {tname!r}")
        offset = r.scalar("Q", f"offset of tensor {tname!r}")
        nbytes = _tensor_bytes(r, tname, dims, ttype)
        data_end = max(data_end, offset + nbytes)
    alignment = metadata.get("general.alignment", 32)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise r.fail(f"general.alignment must be a power of two, got {alignment!r}")
    data_offset = (r.pos + alignment - 1) // alignment * alignment
    if check_data and data_end > 0 and data_offset + data_end > r.size:  # no tensors: no data
        raise ModelLoadError(
            f"{r.path}: truncated GGUF file: tensor data needs {data_offset + data_end} bytes, "
            f"the file has {r.size}",
            path=r.path,
        )
    return GGUFHeader(r.path, version, tensor_count, metadata, r.size, data_offset, data_end)


def _tensor_bytes(r: _Reader, name: str, dims: list[int], ttype: int) -> int:
    elements = 1
    for d in dims:
        elements *= d
        if elements > r.size * 256:  # more elements than any encoding of this file could hold
            raise r.fail(f"tensor {name!r} has absurd dimensions {dims}")
    if ttype not in GGML_TYPES:
        raise r.fail(f"tensor {name!r} has unknown type {ttype}")
    _, block, width = GGML_TYPES[ttype]
    if elements % block:
        raise r.fail(f"tensor {name!r} has {elements} elements, not a multiple of its block {block}")
    return elements // block * width
