"""Read a Hugging Face model folder (standard library only), once, for every backend.

The MLX (``metal``), torch (``cuda``, ``rocm``, ``torch``) and vLLM backends all load
Hugging Face safetensors folders; what they need to know before the engine loads is
read here, checked, and returned as one frozen ``HFFolder``:

- ``config.json`` (required): ``model_type``, ``architectures``, ``vocab_size``,
  ``num_hidden_layers``, ``hidden_size``, ``max_position_embeddings``, the dtype
  (``dtype``, the name transformers v5 writes, else ``torch_dtype``) and the
  quantisation (``quantization_config``, or MLX's ``quantization``). A multimodal
  config that keeps these under ``text_config`` is read from there when the top level
  lacks them; older names (``n_layer``, ``n_embd``, ``n_positions``...) are understood.
- ``generation_config.json`` (optional): ``eos_token_id`` (an int or a list of ints,
  always returned as a tuple) and ``bos_token_id``. Where it is absent, or lacks one of
  them, ``config.json``'s value is used, as transformers builds its generation config.
- ``tokenizer_config.json`` (optional): ``chat_template`` (a string, or a list of
  ``{"name", "template"}`` objects of which the one named ``"default"`` is used) and
  ``bos_token`` / ``eos_token`` (a string, or an ``AddedToken`` object's ``"content"``).
- The chat template's own files, when present. Which wins follows transformers'
  tokenizer loader (``PreTrainedTokenizerBase._from_pretrained``): a separate
  ``chat_template.jinja`` (what transformers 4.47 and later save; with any
  ``additional_chat_templates/*.jinja``) takes priority over the template in
  ``tokenizer_config.json``, so a folder that carries both, stale inline and fresh
  file, is read as transformers reads it. ``chat_template.json`` is the older
  processor file (``{"chat_template": ...}``), which tokenizers never read: it is used
  only when neither of the others holds a template, as llama.cpp's converter does.
- The shards: the files named by ``model.safetensors.index.json``'s ``weight_map``
  when there is an index (each must be a plain file name in the folder), else every
  ``*.safetensors`` file in the folder, sorted.

Anything missing that must be there, or present but malformed, is a ``ModelLoadError``
whose ``path`` is the file (or folder) at fault. Only small JSON and text files are
read; the safetensors headers are checked by ``formats.validate``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from ..errors import ModelLoadError

CONFIG = "config.json"
GENERATION_CONFIG = "generation_config.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
CHAT_TEMPLATE_JINJA = "chat_template.jinja"
CHAT_TEMPLATE_JSON = "chat_template.json"
CHAT_TEMPLATE_DIR = "additional_chat_templates"
SHARD_INDEX = "model.safetensors.index.json"
MAX_CONFIG_BYTES = 16 * 1024 * 1024  # a config is kilobytes; a tokenizer config at most a few MB

# config.json names, in the order looked up (newer and most common first)
_LAYERS = ("num_hidden_layers", "n_layer", "num_layers")
_HIDDEN = ("hidden_size", "n_embd", "d_model")
_CONTEXT = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "max_sequence_length")

_EMPTY: Mapping[str, Any] = MappingProxyType({})


def _empty() -> Mapping[str, Any]:
    return _EMPTY


@dataclass(frozen=True, slots=True)
class HFFolder:
    """What a Hugging Face model folder says about its model: 0, "" or None where it is silent.

    ``shards`` are full paths. ``chat_template`` is the default template and
    ``chat_template_file`` the file it was read from; ``chat_templates`` holds every
    named template (``"default"`` included) as ``(name, template)`` pairs, sorted by
    name. ``config``, ``generation_config`` and ``tokenizer_config`` are the parsed
    files, read-only, for whatever else a backend needs (they take no part in ``==``).
    """

    path: str
    model_type: str = ""
    architectures: tuple[str, ...] = ()
    vocab_size: int = 0
    num_layers: int = 0
    hidden_size: int = 0
    context_length: int = 0
    dtype: str = ""
    quantisation: str = ""  # a short label, see hf_quantisation
    quant_bits: int = 0
    quant_group: int = 0
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    bos_token: str | None = None
    eos_token: str | None = None
    chat_template: str | None = None
    chat_template_file: str | None = None
    chat_templates: tuple[tuple[str, str], ...] = ()
    shards: tuple[str, ...] = ()
    size_bytes: int = 0
    config: Mapping[str, Any] = field(default_factory=_empty, compare=False, repr=False)
    generation_config: Mapping[str, Any] = field(default_factory=_empty, compare=False, repr=False)
    tokenizer_config: Mapping[str, Any] = field(default_factory=_empty, compare=False, repr=False)

    @property
    def quantization_config(self) -> Mapping[str, Any] | None:
        """``quantization_config`` (or MLX's ``quantization``) from ``config.json``; None if absent."""
        q = self.config.get("quantization_config") or self.config.get("quantization")
        return q if isinstance(q, Mapping) else None

    def template(self, name: str = "default") -> str | None:
        """The named chat template (``"default"``: ``chat_template``), or None."""
        return dict(self.chat_templates).get(name)


def read_hf_folder(path: str | os.PathLike[str]) -> HFFolder:
    """Read and check a Hugging Face model folder; see the module's docstring for what is read.

    Raises ``ModelLoadError`` (with ``path`` set to the file or folder at fault) for a
    missing folder or ``config.json``, a folder without safetensors shards, a shard index
    naming files that are not there, or any of the files above that is not what
    transformers writes (not JSON, not an object, a field of the wrong type).
    """
    folder = os.fspath(path)
    if not os.path.exists(folder):
        raise ModelLoadError(f"{folder}: no such file or folder", path=folder)
    if not os.path.isdir(folder):
        raise ModelLoadError(f"{folder}: not a folder; a Hugging Face model is a folder", path=folder)
    config_path = os.path.join(folder, CONFIG)
    if not os.path.isfile(config_path):
        raise ModelLoadError(
            f"{config_path}: missing; a Hugging Face model folder needs config.json and "
            f"*.safetensors files{gguf_hint(folder)}",
            path=config_path,
        )
    config = read_json_object(config_path, CONFIG)
    shards = _shards(folder)
    generation = _optional_json(folder, GENERATION_CONFIG, "the generation config")
    tokenizer = _optional_json(folder, TOKENIZER_CONFIG, "the tokenizer config")
    text = config.get("text_config")
    if text is not None and not isinstance(text, dict):
        raise _bad(config_path, "text_config", "a JSON object or null", text)
    sub: Mapping[str, Any] = text or _EMPTY
    gen_path = os.path.join(folder, GENERATION_CONFIG)
    tok_path = os.path.join(folder, TOKENIZER_CONFIG)
    q: dict[str, Any] | None = None
    for key in ("quantization_config", "quantization"):  # transformers', then MLX's
        value = config.get(key)
        if value is not None and not isinstance(value, dict):
            raise _bad(config_path, key, "a JSON object or null", value)
        q = q or value
    templates, template_file = _chat_templates(folder, tokenizer, tok_path)
    return HFFolder(
        path=folder,
        model_type=_str(config_path, config, sub, "model_type"),
        architectures=_architectures(config_path, config),
        vocab_size=_count(config_path, config, sub, ("vocab_size",)),
        num_layers=_count(config_path, config, sub, _LAYERS),
        hidden_size=_count(config_path, config, sub, _HIDDEN),
        context_length=_count(config_path, config, sub, _CONTEXT),
        dtype=_str(config_path, config, sub, "dtype") or _str(config_path, config, sub, "torch_dtype"),
        quantisation=hf_quantisation(config),
        quant_bits=_quant_bits(q),
        quant_group=_quant_int(q, "group_size", "q_group_size"),
        eos_token_ids=_eos_ids(generation, gen_path, config, sub, config_path),
        bos_token_id=_bos_id(generation, gen_path, config, sub, config_path),
        bos_token=_token_text(tokenizer, "bos_token", tok_path),
        eos_token=_token_text(tokenizer, "eos_token", tok_path),
        chat_template=dict(templates).get("default"),
        chat_template_file=template_file,
        chat_templates=templates,
        shards=shards,
        size_bytes=sum(_size(s) for s in shards),
        config=MappingProxyType(config),
        generation_config=MappingProxyType(generation) if generation is not None else _EMPTY,
        tokenizer_config=MappingProxyType(tokenizer) if tokenizer is not None else _EMPTY,
    )


def hf_quantisation(config: Mapping[str, object]) -> str:
    """A short quantisation label from a Hugging Face config ("" when unquantised).

    ``awq-4bit-g128``, ``fp8``, MLX's ``4bit-g64``; for an unquantised model its dtype
    (``bfloat16``), or "" when the config names none.
    """
    q = config.get("quantization_config") or config.get("quantization")
    if not isinstance(q, Mapping):
        return str(config.get("dtype", "") or config.get("torch_dtype", "") or "")
    method = str(q.get("quant_method", "") or "")
    bits = q.get("bits")
    group = q.get("group_size")
    label = f"{method}-{bits}bit" if method and bits else (f"{bits}bit" if bits else method)
    per_group = isinstance(group, int) and not isinstance(group, bool) and group > 0  # GPTQ: -1 is none
    return f"{label}-g{group}" if per_group else label


# -- shards --------------------------------------------------------------------------------


def _shards(folder: str) -> tuple[str, ...]:
    index = os.path.join(folder, SHARD_INDEX)
    if os.path.isfile(index):
        data = read_json_object(index, "the shard index")
        weight_map = data.get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ModelLoadError(
                f"{index}: not a valid shard index: weight_map must map tensor names to files", path=index
            )
        names = sorted(set(weight_map.values()))
        if not names:
            raise ModelLoadError(f"{index}: not a valid shard index: weight_map is empty", path=index)
        for shard in names:
            if os.path.basename(shard) != shard or not os.path.isfile(os.path.join(folder, shard)):
                raise ModelLoadError(
                    f"{index}: names the shard {shard!r}, which is not in {folder}", path=index
                )
        return tuple(os.path.join(folder, n) for n in names)
    try:
        with os.scandir(folder) as entries:
            found = sorted(e.path for e in entries if e.name.endswith(".safetensors") and e.is_file())
    except OSError as exc:
        raise ModelLoadError(f"{folder}: cannot list the folder: {exc}", path=folder) from exc
    if not found:
        raise ModelLoadError(
            f"{folder}: no *.safetensors files next to its config.json{gguf_hint(folder)}", path=folder
        )
    return tuple(found)


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


# -- chat templates ------------------------------------------------------------------------


def _chat_templates(
    folder: str, tokenizer: dict[str, Any] | None, tok_path: str
) -> tuple[tuple[tuple[str, str], ...], str | None]:
    """Every named template and the file the default came from (see the module's docstring)."""
    found: dict[str, str] = {}
    jinja = os.path.join(folder, CHAT_TEMPLATE_JINJA)
    if os.path.isfile(jinja):
        found["default"] = _read_text(jinja, "the chat template")
    extra_dir = os.path.join(folder, CHAT_TEMPLATE_DIR)
    if os.path.isdir(extra_dir):
        try:
            names = sorted(n for n in os.listdir(extra_dir) if n.endswith(".jinja"))
        except OSError as exc:
            raise ModelLoadError(f"{extra_dir}: cannot list the folder: {exc}", path=extra_dir) from exc
        for name in names:
            text = _read_text(os.path.join(extra_dir, name), "a chat template")
            found.setdefault(name.removesuffix(".jinja"), text)
    if found:  # separate files replace the tokenizer config's templates, as in transformers
        return tuple(sorted(found.items())), jinja if "default" in found else None
    if tokenizer is not None and tokenizer.get("chat_template") is not None:
        found = _template_value(tokenizer["chat_template"], tok_path, "chat_template")
        return tuple(sorted(found.items())), tok_path if "default" in found else None
    legacy = os.path.join(folder, CHAT_TEMPLATE_JSON)
    if os.path.isfile(legacy):
        data = read_json_object(legacy, "the chat template")
        value = data.get("chat_template")
        if value is None:
            raise ModelLoadError(f"{legacy}: has no \"chat_template\" key", path=legacy)
        found = _template_value(value, legacy, "chat_template")
        return tuple(sorted(found.items())), legacy if "default" in found else None
    return (), None


def _template_value(value: object, path: str, key: str) -> dict[str, str]:
    """A ``chat_template`` value: a string (the default), or a list of named templates.

    A list without one named ``"default"`` has no default: transformers then refuses to
    guess which to apply, and so does this (the named ones are still returned).
    """
    if isinstance(value, str):
        return {"default": value}
    if isinstance(value, list):
        out: dict[str, str] = {}
        for i, item in enumerate(value):
            if (
                not isinstance(item, dict)
                or not isinstance(item.get("name"), str)
                or not isinstance(item.get("template"), str)
            ):
                raise ModelLoadError(
                    f"{path}: {key}[{i}] must be an object with string \"name\" and \"template\", "
                    f"got {_preview(item)}",
                    path=path,
                )
            out[item["name"]] = item["template"]
        return out
    raise _bad(path, key, "a string or a list of named templates", value)


def _token_text(tokenizer: dict[str, Any] | None, key: str, path: str) -> str | None:
    """``bos_token`` / ``eos_token``: a string, or an ``AddedToken`` object's ``content``."""
    if tokenizer is None:
        return None
    value = tokenizer.get(key)
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return str(value["content"])
    raise _bad(path, key, 'a string or an object with a string "content"', value)


# -- token ids -----------------------------------------------------------------------------


def _eos_ids(
    generation: dict[str, Any] | None, gen_path: str, config: dict[str, Any],
    sub: Mapping[str, Any], config_path: str,
) -> tuple[int, ...]:
    where, path = _id_source(generation, gen_path, config, sub, config_path, "eos_token_id")
    value = where.get("eos_token_id")
    if value is None:
        return ()
    if _is_id(value):
        return (value,)
    if isinstance(value, list) and all(_is_id(v) for v in value):
        return tuple(dict.fromkeys(value))  # in order, without repeats
    raise _bad(path, "eos_token_id", "a token id or a list of token ids", value)


def _bos_id(
    generation: dict[str, Any] | None, gen_path: str, config: dict[str, Any],
    sub: Mapping[str, Any], config_path: str,
) -> int | None:
    where, path = _id_source(generation, gen_path, config, sub, config_path, "bos_token_id")
    value = where.get("bos_token_id")
    if value is None or _is_id(value):
        return value
    raise _bad(path, "bos_token_id", "a token id", value)


def _id_source(
    generation: dict[str, Any] | None, gen_path: str, config: dict[str, Any],
    sub: Mapping[str, Any], config_path: str, key: str,
) -> tuple[Mapping[str, Any], str]:
    """Where ``key`` is read from: the generation config, else config.json (or its text_config)."""
    if generation is not None and generation.get(key) is not None:
        return generation, gen_path
    if config.get(key) is not None:
        return config, config_path
    return sub, config_path


def _is_id(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


# -- config.json fields --------------------------------------------------------------------


def _str(path: str, config: Mapping[str, Any], sub: Mapping[str, Any], key: str) -> str:
    value = config.get(key, sub.get(key))
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _bad(path, key, "a string", value)
    return value


def _count(path: str, config: Mapping[str, Any], sub: Mapping[str, Any], keys: tuple[str, ...]) -> int:
    for where in (config, sub):
        for key in keys:
            value = where.get(key)
            if value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise _bad(path, key, "a non-negative integer", value)
            return value
    return 0


def _architectures(path: str, config: Mapping[str, Any]) -> tuple[str, ...]:
    value = config.get("architectures")
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(a, str) for a in value):
        raise _bad(path, "architectures", "a list of strings", value)
    return tuple(value)


def _quant_int(q: dict[str, Any] | None, *keys: str) -> int:
    """The first of ``keys`` that is a positive integer in the quantisation config (else 0)."""
    if q is None:
        return 0
    for key in keys:
        value = q.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return 0


def _quant_bits(q: dict[str, Any] | None) -> int:
    """Weight bits: ``bits`` (GPTQ, AWQ, MLX...), AutoAWQ's ``w_bit``, or bitsandbytes' flags."""
    bits = _quant_int(q, "bits", "w_bit")
    if bits or q is None:
        return bits
    return 4 if q.get("load_in_4bit") is True else 8 if q.get("load_in_8bit") is True else 0


# -- reading files -------------------------------------------------------------------------


def read_json_object(path: str, what: str) -> dict[str, Any]:
    """A small JSON file that must hold an object (a UTF-8 BOM is allowed); else ``ModelLoadError``."""
    raw = _read_bytes(path, what)
    try:
        data = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise ModelLoadError(f"{path}: {what} is not valid UTF-8 ({exc.reason})", path=path) from None
    except (ValueError, RecursionError) as exc:
        raise ModelLoadError(f"{path}: {what} is not valid JSON ({str(exc)[:120]})", path=path) from None
    if not isinstance(data, dict):
        raise ModelLoadError(
            f"{path}: {what} must be a JSON object, got a JSON {json_type(data)}", path=path
        )
    return data


def _optional_json(folder: str, name: str, what: str) -> dict[str, Any] | None:
    path = os.path.join(folder, name)
    return read_json_object(path, what) if os.path.isfile(path) else None


def _read_text(path: str, what: str) -> str:
    raw = _read_bytes(path, what)
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ModelLoadError(f"{path}: {what} is not valid UTF-8 ({exc.reason})", path=path) from None


def _read_bytes(path: str, what: str) -> bytes:
    try:
        size = os.path.getsize(path)
        if size > MAX_CONFIG_BYTES:
            raise ModelLoadError(
                f"{path}: {what} is {size} bytes, far too large for a settings file", path=path
            )
        with open(path, "rb") as fh:
            return fh.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot read {what}: {exc}", path=path) from exc


def json_type(value: object) -> str:
    """The JSON name of a parsed value's type, for messages."""
    kinds = ((bool, "boolean"), (int, "number"), (float, "number"), (str, "string"), (list, "array"),
             (dict, "object"))
    for kind, label in kinds:
        if isinstance(value, kind):
            return label
    return "null" if value is None else type(value).__name__


def _preview(value: object) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _bad(path: str, key: str, expected: str, value: object) -> ModelLoadError:
    return ModelLoadError(
        f"{path}: {key} must be {expected}, got a JSON {json_type(value)} ({_preview(value)})", path=path
    )


def gguf_hint(folder: str) -> str:
    """A hint for a folder that holds a GGUF file: pass the file, not the folder."""
    try:
        with os.scandir(folder) as entries:
            ggufs = sorted(e.name for e in entries if e.name.endswith(".gguf"))
    except OSError:
        return ""
    return f"; for a GGUF model pass the file itself, e.g. {os.path.join(folder, ggufs[0])}" if ggufs else ""


__all__ = ["HFFolder", "MAX_CONFIG_BYTES", "hf_quantisation", "read_hf_folder", "read_json_object"]
