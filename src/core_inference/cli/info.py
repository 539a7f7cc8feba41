"""``info`` and ``discover``: what a model is, read from its header or from the loaded model."""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .. import registry
from ..errors import ModelLoadError
from ..formats import GGUF, sniff_format
from ..options import apply_load_opts
from ..templates import BUILTIN_TEMPLATES, builtin_template
from ..types import ModelInfo
from .output import human_bytes, human_count, nonzero, print_pairs, print_table, short
from .run import resolve_model

if TYPE_CHECKING:
    from ..formats.gguf import GGUFHeader


def run_info(path: str | None, backend: str, no_load: bool, metadata: bool) -> None:
    """Print what a model is: its file, the backend and ModelInfo, and its GGUF header."""
    import click

    target = resolve_model(path)
    cfg = apply_load_opts(backend=backend)
    is_gguf = os.path.isfile(target) and sniff_format(target) == GGUF
    if no_load and not is_gguf:
        if not os.path.exists(target):
            raise ModelLoadError(f"{target}: no such file or folder", target)
        raise click.UsageError(f"{target}: --no-load needs a GGUF file", click.get_current_context(True))
    rows: list[tuple[str, str]] = [("path", target)]
    if not no_load:
        with registry.load_model(target, cfg) as model:
            rows.append(("backend", registry.choose_backend(target, cfg.backend).name))
            rows.append(("model type", model.model_type))
            rows += info_rows(model.info())
    if is_gguf:
        rows += gguf_rows(target, metadata)
    print_pairs(rows)


def info_rows(info: ModelInfo) -> list[tuple[str, str]]:
    """The known fields of a ``ModelInfo`` (zeros and blanks are unknown and left out)."""
    quant = info.quant_type or (f"{info.quant_bits}-bit" if info.quant_bits else "")
    if quant and info.quant_group:
        quant += f", group {info.quant_group}"
    rows = [
        ("architecture", info.architecture),
        ("parameters", human_count(info.parameters) if info.parameters else ""),
        ("layers", nonzero(info.num_layers)),
        ("hidden size", nonzero(info.hidden_size)),
        ("vocabulary", nonzero(info.vocab_size)),
        ("context length", nonzero(info.context_length)),
        ("quantisation", quant),
    ]
    return [(k, v) for k, v in rows if v]


def gguf_rows(path: str, all_metadata: bool) -> list[tuple[str, str]]:
    """Facts from a GGUF header, read without loading the model."""
    from ..formats.gguf import read_gguf

    header = read_gguf(path)
    quant, bits = header.file_type
    meta = header.metadata
    rows = [
        ("gguf version", str(header.version)),
        ("name", str(meta.get("general.name", ""))),
        ("gguf architecture", header.architecture),
        ("file type", f"{quant} ({bits} bits)" if bits else quant),
        ("tensors", str(header.tensor_count)),
        ("file size", human_bytes(header.file_size)),
        ("chat template", chat_template_note(header)),
    ]
    rows = [(k, v) for k, v in rows if v]
    if all_metadata:
        rows += [(key, short(value)) for key, value in sorted(meta.items())]
    return rows


def chat_template_note(header: GGUFHeader) -> str:
    """Which chat template ``chat`` will use, by the backends' rule, read from the file alone.

    The model's own template; else the built-in one for its architecture, only when the
    vocabulary holds every special token it writes (``templates.builtin_template``); else none.
    """
    if header.chat_template:
        return "in file"
    arch = header.architecture
    template = BUILTIN_TEMPLATES.get(arch)
    if template is None:
        return f"none (not in the file, and no built-in one for {arch!r}): chat is unavailable"
    held = vocab_holds(header.path, template.special_tokens)
    if held is None:
        return (f"not in the file; built-in {template.name} only if the vocabulary holds its special "
                "tokens, which cannot be told without loading")
    if builtin_template(arch, held.__contains__) is not None:
        return f"built-in {template.name} (none in the file; the vocabulary holds its special tokens)"
    missing = ", ".join(t for t in template.special_tokens if t not in held)
    return (f"none (not in the file, and the vocabulary lacks {missing} of the built-in "
            f"{template.name} one): chat is unavailable")


_TOKENS_KEY = b"tokenizer.ggml.tokens"
_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9
_U32, _U64 = struct.Struct("<I").unpack_from, struct.Struct("<Q").unpack_from


def vocab_holds(path: str, wanted: Sequence[str]) -> set[str] | None:
    """Which of ``wanted`` are tokens of a GGUF file's vocabulary; None when it has none or is unreadable.

    The header reader keeps only the length of long arrays, so this walks the metadata once
    more, comparing only the vocabulary's strings whose length matches one of ``wanted``.
    """
    targets = {w.encode("utf-8") for w in wanted}
    try:
        with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            found = _scan_vocab(buf, targets)
    except (OSError, ValueError, struct.error):
        return None
    return None if found is None else {t.decode("utf-8") for t in found}


def _scan_vocab(buf: Any, targets: set[bytes]) -> set[bytes] | None:
    size, lengths = len(buf), {len(t) for t in targets}
    (n_kv,) = _U64(buf, 16)  # after magic, version and the tensor count
    pos = 24
    for _ in range(n_kv):
        key_end = _string_end(buf, pos, size)
        key = bytes(buf[pos + 8 : key_end])
        (vtype,) = _U32(buf, key_end)
        pos = key_end + 4
        if key != _TOKENS_KEY:
            pos = _skip_value(buf, pos, vtype, size, 0)
            continue
        if vtype != _ARRAY or _U32(buf, pos)[0] != _STRING:
            return None
        (count,) = _U64(buf, pos + 4)
        pos += 12
        found: set[bytes] = set()
        for _ in range(count):
            (n,) = _U64(buf, pos)
            if n in lengths and (text := bytes(buf[pos + 8 : pos + 8 + n])) in targets:
                found.add(text)
                if found == targets:
                    break
            pos += 8 + n
            if pos > size:
                raise ValueError("truncated vocabulary")
        return found
    return None


def _string_end(buf: Any, pos: int, size: int) -> int:
    (n,) = _U64(buf, pos)
    end: int = pos + 8 + n
    if end > size:
        raise ValueError("truncated string")
    return end


def _skip_value(buf: Any, pos: int, vtype: int, size: int, depth: int) -> int:
    if vtype in _SCALAR_SIZES:
        return pos + _SCALAR_SIZES[vtype]
    if vtype == _STRING:
        return _string_end(buf, pos, size)
    if vtype != _ARRAY or depth > 8:
        raise ValueError(f"unknown value type {vtype}")
    (item,), (count,) = _U32(buf, pos), _U64(buf, pos + 4)
    pos += 12
    if item in _SCALAR_SIZES:
        pos += count * _SCALAR_SIZES[item]
    else:
        for _ in range(count):
            pos = _skip_value(buf, pos, item, size, depth + 1)
    if pos > size:
        raise ValueError("truncated array")
    return pos


# -- discover --------------------------------------------------------------------------------


def run_discover(directory: str) -> None:
    """Print a table of the models under ``directory``; unreadable ones say why."""
    import sys

    from ..discover import discover

    rows = []
    for found in discover(directory):
        shown = os.path.relpath(found.path, directory)
        if found.error:
            rows.append((shown, found.format, "", "", human_bytes(found.size_bytes), "", _error_of(found)))
        else:
            kind = found.model_type or "?"
            rows.append((shown, found.format, kind, found.quantisation, human_bytes(found.size_bytes),
                         ",".join(_loaders(found.path)) or "none here", "ok"))
    if not rows:
        print(f"no models found under {directory}", file=sys.stderr)
        return
    print_table(("PATH", "FORMAT", "TYPE", "QUANT", "SIZE", "BACKENDS", "STATUS"), rows)


def _loaders(path: str) -> list[str]:
    """The available backends, in preference order, that can load ``path``."""
    names = []
    for name in registry.list_backends():
        try:
            backend = registry.get(name)
            if backend.available() and backend.can_load(path):
                names.append(name)
        except Exception:  # a broken plugin is reported by `backends`, not here
            continue
    return names


def _error_of(found: Any) -> str:
    """A row's error without the path the message repeats."""
    message: str = found.error
    prefix = f"{found.path}: "
    return "error: " + (message[len(prefix) :] if message.startswith(prefix) else message)
