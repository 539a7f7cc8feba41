"""formats.hf: a Hugging Face model folder read once, every field and every malformed file.

The folders are written to tmp_path by hand (tiny valid safetensors shards, JSON files
in the shapes transformers and mlx-lm write); no real model is needed.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from pathlib import Path
from typing import Any

import pytest

from core_inference import ModelLoadError
from core_inference.discover import discover
from core_inference.discover import hf_quantisation as discover_hf_quantisation
from core_inference.formats import hf
from core_inference.formats.hf import HFFolder, hf_quantisation, read_hf_folder
from core_inference.formats.validate import check_hf_folder, check_model_path


def shard_bytes(n: int = 4) -> bytes:
    """A valid safetensors file holding one F32 tensor of ``n`` elements."""
    header = json.dumps({"w": {"dtype": "F32", "shape": [n], "data_offsets": [0, 4 * n]}}).encode()
    return struct.pack("<Q", len(header)) + header + b"\0" * (4 * n)


def folder(
    root: Path,
    config: Any = None,
    *,
    shards: tuple[str, ...] = ("model.safetensors",),
    files: dict[str, Any] | None = None,
) -> Path:
    """A model folder: config.json, shards, and other files (dict/list -> JSON, str/bytes -> as is)."""
    root.mkdir(parents=True, exist_ok=True)
    everything: dict[str, Any] = {"config.json": {"model_type": "llama"} if config is None else config}
    everything.update(files or {})
    for name, content in everything.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif isinstance(content, str):
            path.write_text(content, encoding="utf-8")
        else:
            path.write_text(json.dumps(content), encoding="utf-8")
    for name in shards:
        (root / name).write_bytes(shard_bytes())
    return root


def fails(path: Path, at: Path, *needles: str) -> ModelLoadError:
    """``read_hf_folder(path)`` raises ModelLoadError naming ``at`` (message and ``.path``)."""
    with pytest.raises(ModelLoadError) as info:
        read_hf_folder(path)
    err = info.value
    assert err.path == str(at), (err.path, str(err))
    assert str(at) in str(err)
    for needle in needles:
        assert needle in str(err), f"{needle!r} not in {err}"
    return err


# -- config.json ---------------------------------------------------------------------------

GEMMA3_CONFIG = {
    "architectures": ["Gemma3ForCausalLM"],
    "model_type": "gemma3_text",
    "vocab_size": 262144,
    "num_hidden_layers": 18,
    "hidden_size": 640,
    "max_position_embeddings": 32768,
    "torch_dtype": "bfloat16",
    "bos_token_id": 2,
    "eos_token_id": 1,
}


def test_config_fields(tmp_path: Path) -> None:
    m = read_hf_folder(folder(tmp_path / "m", GEMMA3_CONFIG))
    assert isinstance(m, HFFolder)
    assert m.path == str(tmp_path / "m")
    assert m.model_type == "gemma3_text" and m.architectures == ("Gemma3ForCausalLM",)
    assert (m.vocab_size, m.num_layers, m.hidden_size, m.context_length) == (262144, 18, 640, 32768)
    assert m.dtype == "bfloat16" and m.quantisation == "bfloat16"
    assert (m.quant_bits, m.quant_group, m.quantization_config) == (0, 0, None)
    assert m.config["vocab_size"] == 262144
    # no generation_config.json: the ids come from config.json, as transformers does it
    assert m.eos_token_ids == (1,) and m.bos_token_id == 2


def test_a_bare_config_gives_empty_values(tmp_path: Path) -> None:
    m = read_hf_folder(folder(tmp_path / "m", {}))
    assert (m.model_type, m.architectures, m.vocab_size, m.num_layers, m.dtype) == ("", (), 0, 0, "")
    assert (m.eos_token_ids, m.bos_token_id, m.bos_token, m.eos_token) == ((), None, None, None)
    assert (m.chat_template, m.chat_template_file, m.chat_templates) == (None, None, ())
    assert dict(m.generation_config) == {} and dict(m.tokenizer_config) == {}


def test_dtype_is_preferred_to_torch_dtype(tmp_path: Path) -> None:
    """transformers v5 writes ``dtype``; older versions ``torch_dtype``."""
    m = read_hf_folder(folder(tmp_path / "m", {"dtype": "float16", "torch_dtype": "float32"}))
    assert m.dtype == "float16"


def test_text_config_and_old_names(tmp_path: Path) -> None:
    multimodal = {
        "model_type": "gemma3",
        "text_config": {"num_hidden_layers": 34, "hidden_size": 2560, "vocab_size": 262208,
                        "max_position_embeddings": 131072, "eos_token_id": [1, 106]},
    }
    m = read_hf_folder(folder(tmp_path / "mm", multimodal))
    assert (m.model_type, m.num_layers, m.hidden_size, m.vocab_size) == ("gemma3", 34, 2560, 262208)
    assert m.context_length == 131072 and m.eos_token_ids == (1, 106)
    gpt2 = {"model_type": "gpt2", "n_layer": 12, "n_embd": 768, "n_positions": 1024, "vocab_size": 50257}
    m = read_hf_folder(folder(tmp_path / "gpt2", gpt2))
    assert (m.num_layers, m.hidden_size, m.context_length) == (12, 768, 1024)


@pytest.mark.parametrize(
    ("config", "label", "bits", "group"),
    [
        ({"quantization_config": {"quant_method": "awq", "bits": 4, "group_size": 128}},
         "awq-4bit-g128", 4, 128),
        ({"quantization_config": {"quant_method": "gptq", "bits": 8, "group_size": -1}}, "gptq-8bit", 8, 0),
        ({"quantization_config": {"quant_method": "fp8"}}, "fp8", 0, 0),
        ({"quantization": {"group_size": 64, "bits": 4}}, "4bit-g64", 4, 64),  # mlx-lm
        ({"quantization_config": {"quant_method": "awq", "w_bit": 4, "q_group_size": 64}}, "awq", 4, 64),
        ({"quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True}},
         "bitsandbytes", 4, 0),
        ({"quantization_config": None, "torch_dtype": "float16"}, "float16", 0, 0),
    ],
)
def test_quantisation(tmp_path: Path, config: dict[str, Any], label: str, bits: int, group: int) -> None:
    m = read_hf_folder(folder(tmp_path / "m", config))
    assert (m.quantisation, m.quant_bits, m.quant_group) == (label, bits, group)
    q = config.get("quantization_config") or config.get("quantization")
    assert m.quantization_config == q


def test_hf_quantisation_moved_here_and_still_in_discover() -> None:
    config = {"quantization_config": {"quant_method": "awq", "bits": 4, "group_size": 128}}
    assert hf_quantisation(config) == discover_hf_quantisation(config) == "awq-4bit-g128"
    assert hf_quantisation({"dtype": "bfloat16"}) == "bfloat16"


# -- generation_config.json ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("generation", "eos", "bos"),
    [
        ({"eos_token_id": 106, "bos_token_id": 2}, (106,), 2),
        ({"eos_token_id": [128001, 128009], "bos_token_id": 128000}, (128001, 128009), 128000),
        ({"eos_token_id": [1, 106, 1]}, (1, 106), 9),  # repeats dropped; bos from config.json
        ({"eos_token_id": []}, (), 9),
        ({"eos_token_id": None}, (7,), 9),  # null: config.json's value
        ({}, (7,), 9),
    ],
)
def test_generation_config_ids(
    tmp_path: Path, generation: dict[str, Any], eos: tuple[int, ...], bos: int
) -> None:
    root = folder(tmp_path / "m", {"eos_token_id": 7, "bos_token_id": 9},
                  files={"generation_config.json": generation})
    m = read_hf_folder(root)
    assert (m.eos_token_ids, m.bos_token_id) == (eos, bos)
    assert dict(m.generation_config) == generation


# -- tokenizer_config.json and the chat template files -------------------------------------

TEMPLATE = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"


def test_tokenizer_config_template_and_special_tokens(tmp_path: Path) -> None:
    tok = {"chat_template": TEMPLATE, "bos_token": "<bos>", "eos_token": "<eos>", "add_bos_token": True}
    root = folder(tmp_path / "m", files={"tokenizer_config.json": tok})
    m = read_hf_folder(root)
    assert m.chat_template == TEMPLATE and m.chat_template_file == str(root / "tokenizer_config.json")
    assert m.chat_templates == (("default", TEMPLATE),) and m.template() == TEMPLATE
    assert (m.bos_token, m.eos_token) == ("<bos>", "<eos>")
    assert m.tokenizer_config["add_bos_token"] is True


def test_added_token_objects(tmp_path: Path) -> None:
    """Older transformers save special tokens as serialised ``AddedToken`` objects."""
    added = {"__type": "AddedToken", "content": "<s>", "lstrip": False, "normalized": False,
             "rstrip": False, "single_word": False}
    tok = {"bos_token": added, "eos_token": {**added, "content": "</s>"}}
    m = read_hf_folder(folder(tmp_path / "m", files={"tokenizer_config.json": tok}))
    assert (m.bos_token, m.eos_token) == ("<s>", "</s>")


def test_a_list_of_named_templates(tmp_path: Path) -> None:
    named = [{"name": "default", "template": TEMPLATE}, {"name": "tool_use", "template": "TOOLS"}]
    m = read_hf_folder(folder(tmp_path / "m", files={"tokenizer_config.json": {"chat_template": named}}))
    assert m.chat_template == TEMPLATE
    assert m.chat_templates == (("default", TEMPLATE), ("tool_use", "TOOLS"))
    assert m.template("tool_use") == "TOOLS" and m.template("rag") is None


def test_named_templates_without_a_default_are_not_guessed(tmp_path: Path) -> None:
    named = [{"name": "tool_use", "template": "TOOLS"}]
    m = read_hf_folder(folder(tmp_path / "m", files={"tokenizer_config.json": {"chat_template": named}}))
    assert m.chat_template is None and m.chat_template_file is None
    assert m.chat_templates == (("tool_use", "TOOLS"),)


def test_chat_template_jinja_wins_over_tokenizer_config(tmp_path: Path) -> None:
    """transformers' tokenizer loader gives the separate file priority over the inline template."""
    root = folder(tmp_path / "m", files={
        "tokenizer_config.json": {"chat_template": "STALE INLINE"},
        "chat_template.jinja": TEMPLATE,
        "chat_template.json": {"chat_template": "LEGACY"},
    })
    m = read_hf_folder(root)
    assert m.chat_template == TEMPLATE and m.chat_template_file == str(root / "chat_template.jinja")
    assert m.chat_templates == (("default", TEMPLATE),)


def test_additional_chat_templates_folder(tmp_path: Path) -> None:
    root = folder(tmp_path / "m", files={
        "chat_template.jinja": TEMPLATE,
        "additional_chat_templates/tool_use.jinja": "TOOLS",
        "additional_chat_templates/notes.txt": "not a template",
        "tokenizer_config.json": {"chat_template": [{"name": "rag", "template": "RAG"}]},
    })
    m = read_hf_folder(root)
    assert m.chat_templates == (("default", TEMPLATE), ("tool_use", "TOOLS"))  # files replace inline ones


def test_chat_template_json_is_only_a_fallback(tmp_path: Path) -> None:
    legacy = {"chat_template": "LEGACY"}
    root = folder(tmp_path / "a", files={"chat_template.json": legacy})
    m = read_hf_folder(root)
    assert m.chat_template == "LEGACY" and m.chat_template_file == str(root / "chat_template.json")
    root = folder(tmp_path / "b", files={"chat_template.json": legacy,
                                         "tokenizer_config.json": {"chat_template": TEMPLATE}})
    assert read_hf_folder(root).chat_template == TEMPLATE


def test_chat_template_file_with_bom(tmp_path: Path) -> None:
    root = folder(tmp_path / "m", files={"chat_template.jinja": b"\xef\xbb\xbf" + TEMPLATE.encode()})
    assert read_hf_folder(root).chat_template == TEMPLATE


# -- shards --------------------------------------------------------------------------------


def test_single_shard(tmp_path: Path) -> None:
    root = folder(tmp_path / "m")
    m = read_hf_folder(root)
    assert m.shards == (str(root / "model.safetensors"),)
    assert m.size_bytes == (root / "model.safetensors").stat().st_size


def test_several_shards_without_an_index_are_sorted(tmp_path: Path) -> None:
    names = ("model-00002-of-00002.safetensors", "model-00001-of-00002.safetensors")
    root = folder(tmp_path / "m", shards=names)
    m = read_hf_folder(root)
    assert m.shards == tuple(str(root / n) for n in sorted(names))
    assert m.size_bytes == sum((root / n).stat().st_size for n in names)


def test_the_index_names_the_shards(tmp_path: Path) -> None:
    """With an index, only the files it names are shards (not, say, a consolidated copy)."""
    names = (
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "consolidated.safetensors"
    )
    index = {"metadata": {"total_size": 32},
             "weight_map": {"a": names[1], "b": names[0], "c": names[1]}}
    root = folder(tmp_path / "m", shards=names, files={"model.safetensors.index.json": index})
    m = read_hf_folder(root)
    assert m.shards == (str(root / names[0]), str(root / names[1]))


# -- the dataclass -------------------------------------------------------------------------


def test_frozen_hashable_and_read_only(tmp_path: Path) -> None:
    m = read_hf_folder(folder(tmp_path / "m", GEMMA3_CONFIG))
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.model_type = "x"  # type: ignore[misc]
    with pytest.raises(TypeError):
        m.config["model_type"] = "x"  # type: ignore[index]
    assert hash(m) == hash(read_hf_folder(tmp_path / "m"))
    assert m == read_hf_folder(tmp_path / "m")


# -- malformed folders and files: ModelLoadError with .path at fault ------------------------


def test_missing_folder_and_a_file(tmp_path: Path) -> None:
    fails(tmp_path / "nope", tmp_path / "nope", "no such file or folder")
    (tmp_path / "f").write_text("x")
    fails(tmp_path / "f", tmp_path / "f", "not a folder")


def test_missing_config(tmp_path: Path) -> None:
    root = folder(tmp_path / "m")
    (root / "config.json").unlink()
    (root / "model.gguf").write_bytes(b"GGUF")
    fails(root, root / "config.json", "missing", "pass the file itself")


def test_no_shards(tmp_path: Path) -> None:
    root = folder(tmp_path / "m", shards=())
    fails(root, root, "no *.safetensors files")


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object, got a JSON array"),
        (b'{"a": "\xff"}', "not valid UTF-8"),
    ],
)
@pytest.mark.parametrize(
    "name", ["config.json", "generation_config.json", "tokenizer_config.json", "chat_template.json",
             "model.safetensors.index.json"],
)
def test_json_files_that_are_not_json_objects(tmp_path: Path, name: str, raw: bytes, needle: str) -> None:
    root = folder(tmp_path / "m", files={name: raw})
    fails(root, root / name, needle)


def test_oversized_settings_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hf, "MAX_CONFIG_BYTES", 64)
    root = folder(tmp_path / "m", files={"tokenizer_config.json": {"pad": "x" * 100}})
    fails(root, root / "tokenizer_config.json", "far too large")


@pytest.mark.parametrize(
    ("config", "needle"),
    [
        ({"model_type": 5}, "model_type must be a string"),
        ({"architectures": "LlamaForCausalLM"}, "architectures must be a list of strings"),
        ({"architectures": [1]}, "architectures must be a list of strings"),
        ({"vocab_size": "big"}, "vocab_size must be a non-negative integer"),
        ({"num_hidden_layers": -1}, "num_hidden_layers must be a non-negative integer"),
        ({"hidden_size": True}, "hidden_size must be a non-negative integer"),
        ({"max_position_embeddings": 1.5}, "max_position_embeddings must be a non-negative integer"),
        ({"torch_dtype": 16}, "torch_dtype must be a string"),
        ({"quantization_config": "weird"}, "quantization_config must be a JSON object"),
        ({"quantization": [4]}, "quantization must be a JSON object"),
        ({"text_config": []}, "text_config must be a JSON object"),
        ({"text_config": {"num_hidden_layers": "x"}}, "num_hidden_layers must be"),
        ({"eos_token_id": "</s>"}, "eos_token_id must be a token id or a list"),
        ({"bos_token_id": [1]}, "bos_token_id must be a token id"),
    ],
)
def test_config_fields_of_the_wrong_type(tmp_path: Path, config: dict[str, Any], needle: str) -> None:
    root = folder(tmp_path / "m", config)
    fails(root, root / "config.json", needle)


@pytest.mark.parametrize(
    ("generation", "needle"),
    [
        ({"eos_token_id": ["</s>"]}, "eos_token_id must be a token id or a list of token ids"),
        ({"eos_token_id": 1.0}, "eos_token_id must be"),
        ({"eos_token_id": True}, "eos_token_id must be"),
        ({"eos_token_id": -1}, "eos_token_id must be"),
        ({"eos_token_id": [1, None]}, "eos_token_id must be"),
        ({"bos_token_id": "<s>"}, "bos_token_id must be a token id"),
    ],
)
def test_generation_config_of_the_wrong_shape(
    tmp_path: Path, generation: dict[str, Any], needle: str
) -> None:
    root = folder(tmp_path / "m", files={"generation_config.json": generation})
    fails(root, root / "generation_config.json", needle)


@pytest.mark.parametrize(
    ("tok", "needle"),
    [
        ({"chat_template": 42}, "chat_template must be a string or a list of named templates"),
        ({"chat_template": {"default": TEMPLATE}}, "chat_template must be"),
        ({"chat_template": [TEMPLATE]}, "chat_template[0] must be an object"),
        ({"chat_template": [{"name": "default"}]}, "chat_template[0] must be an object"),
        ({"chat_template": [{"name": 1, "template": TEMPLATE}]}, "chat_template[0]"),
        ({"bos_token": 5}, "bos_token must be a string or an object"),
        ({"eos_token": {"__type": "AddedToken"}}, "eos_token must be"),
        ({"eos_token": ["</s>"]}, "eos_token must be"),
    ],
)
def test_tokenizer_config_of_the_wrong_shape(tmp_path: Path, tok: dict[str, Any], needle: str) -> None:
    root = folder(tmp_path / "m", files={"tokenizer_config.json": tok})
    fails(root, root / "tokenizer_config.json", needle)


def test_chat_template_files_that_are_broken(tmp_path: Path) -> None:
    root = folder(tmp_path / "a", files={"chat_template.jinja": b"{{ '\xff' }}"})
    fails(root, root / "chat_template.jinja", "not valid UTF-8")
    root = folder(tmp_path / "b", files={"additional_chat_templates/x.jinja": b"\xfe"})
    fails(root, root / "additional_chat_templates" / "x.jinja", "not valid UTF-8")
    root = folder(tmp_path / "c", files={"chat_template.json": {"template": TEMPLATE}})
    fails(root, root / "chat_template.json", 'no "chat_template" key')
    root = folder(tmp_path / "d", files={"chat_template.json": {"chat_template": 1}})
    fails(root, root / "chat_template.json", "chat_template must be")


@pytest.mark.parametrize(
    ("index", "needle"),
    [
        ({"metadata": {}}, "weight_map must map tensor names to files"),
        ({"weight_map": ["model.safetensors"]}, "weight_map must map"),
        ({"weight_map": {"w": 1}}, "weight_map must map"),
        ({"weight_map": {}}, "weight_map is empty"),
        ({"weight_map": {"w": "model-00001-of-00002.safetensors"}}, "which is not in"),
        ({"weight_map": {"w": "../model.safetensors"}}, "'../model.safetensors'"),
        ({"weight_map": {"w": "sub/model.safetensors"}}, "which is not in"),
    ],
)
def test_broken_shard_index(tmp_path: Path, index: dict[str, Any], needle: str) -> None:
    root = folder(tmp_path / "m", files={"model.safetensors.index.json": index})
    fails(root, root / "model.safetensors.index.json", needle)


# -- who uses it ---------------------------------------------------------------------------


def test_validate_uses_it(tmp_path: Path) -> None:
    root = folder(tmp_path / "m", GEMMA3_CONFIG, files={"chat_template.jinja": TEMPLATE})
    got = check_hf_folder(root)
    assert got == read_hf_folder(root) and got.chat_template == TEMPLATE
    assert check_model_path(root) == "safetensors"
    (root / "tokenizer_config.json").write_text(json.dumps({"eos_token": 1}))
    with pytest.raises(ModelLoadError) as info:
        check_model_path(root)
    assert info.value.path == str(root / "tokenizer_config.json")


def test_discover_describes_folders_with_it(tmp_path: Path) -> None:
    config = {"model_type": "qwen2", "quantization_config": {"quant_method": "awq", "bits": 4}}
    folder(tmp_path / "good", config, shards=("model-00001-of-00002.safetensors",
                                               "model-00002-of-00002.safetensors"))
    folder(tmp_path / "bad-tokenizer", files={"tokenizer_config.json": {"eos_token": 3}})
    by_name = {Path(d.path).name: d for d in discover(tmp_path)}
    good = by_name["good"]
    assert (good.model_type, good.quantisation, good.file_count, good.error) == ("qwen2", "awq-4bit", 2, None)
    assert good.size_bytes == sum(p.stat().st_size for p in (tmp_path / "good").glob("*.safetensors"))
    bad = by_name["bad-tokenizer"]
    assert bad.error is not None and "tokenizer_config.json" in bad.error and "eos_token" in bad.error
    assert bad.file_count == 1 and bad.size_bytes > 0
