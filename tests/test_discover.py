"""discover(): every model under a folder, described without loading, broken ones included."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest

import core_inference as ci
from core_inference.discover import DiscoveredModel, discover, hf_quantisation
from core_inference.formats import is_hf_folder, sniff_format


def write_gguf(path: Path, arch: str = "gemma3", file_type: int = 15) -> Path:
    w = gguf.GGUFWriter(str(path), arch)
    w.add_file_type(file_type)
    w.add_token_list([f"t{i}" for i in range(80)])
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_safetensors(path: Path, tensors: dict[str, tuple[int, ...]]) -> Path:
    """A real safetensors file, written by hand: u64 header length, JSON header, F32 data."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    data = b""
    for name, shape in tensors.items():
        count = int(np.prod(shape))
        raw = np.arange(count, dtype="<f4").tobytes()
        offsets = [len(data), len(data) + len(raw)]
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": offsets}
        data += raw
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


def hf_folder(folder: Path, config: dict[str, Any] | str, shards: int = 1) -> Path:
    folder.mkdir(parents=True)
    text = config if isinstance(config, str) else json.dumps(config)
    (folder / "config.json").write_text(text)
    for i in range(shards):
        name = "model.safetensors" if shards == 1 else f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        write_safetensors(folder / name, {f"layers.{i}.weight": (2, 4)})
    return folder


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    write_gguf(tmp_path / "tiny.gguf")
    hf_folder(
        tmp_path / "hf-model",
        {"model_type": "qwen2", "quantization_config": {"quant_method": "awq", "bits": 4, "group_size": 128}},
        shards=2,
    )
    hf_folder(tmp_path / "bad-config", "{ this is not json")
    (tmp_path / "broken.gguf").write_bytes(b"GGUF" + struct.pack("<I", 3) + b"\xff" * 40)
    (tmp_path / "README.md").write_text("not a model")
    (tmp_path / "empty-dir").mkdir()
    return tmp_path


def test_discover_finds_all_four_sorted(tree: Path) -> None:
    found = list(discover(tree))
    assert all(isinstance(m, DiscoveredModel) for m in found)
    names = [Path(m.path).name for m in found]
    assert names == ["bad-config", "broken.gguf", "hf-model", "tiny.gguf"]
    by_name = {Path(m.path).name: m for m in found}

    tiny = by_name["tiny.gguf"]
    assert (tiny.format, tiny.model_type, tiny.quantisation) == ("gguf", "gemma3", "Q4_K_M")
    assert tiny.file_count == 1
    assert tiny.size_bytes == (tree / "tiny.gguf").stat().st_size and tiny.error is None

    hf = by_name["hf-model"]
    assert (hf.format, hf.model_type, hf.quantisation, hf.file_count) == ("safetensors", "qwen2",
                                                                          "awq-4bit-g128", 2)
    assert hf.size_bytes == sum(p.stat().st_size for p in (tree / "hf-model").glob("*.safetensors"))
    assert hf.error is None

    bad = by_name["bad-config"]
    assert bad.format == "safetensors" and bad.file_count == 1 and bad.model_type == ""
    assert bad.error is not None and "config.json" in bad.error

    broken = by_name["broken.gguf"]
    assert broken.format == "gguf" and broken.model_type == "" and broken.file_count == 1
    assert broken.error is not None and str(tree / "broken.gguf") in broken.error


def test_discover_is_sorted_part_by_part_through_nested_folders(tmp_path: Path) -> None:
    for folder in ("b", "a/deep"):
        (tmp_path / folder).mkdir(parents=True)
    write_gguf(tmp_path / "b" / "inner.gguf")
    write_gguf(tmp_path / "a" / "z.gguf")
    write_gguf(tmp_path / "a" / "deep" / "x.gguf")
    write_gguf(tmp_path / "a.gguf")
    hf_folder(tmp_path / "a" / "hf", {"model_type": "llama", "torch_dtype": "bfloat16"})
    found = [Path(m.path).relative_to(tmp_path).as_posix() for m in discover(tmp_path)]
    assert found == ["a/deep/x.gguf", "a/hf", "a/z.gguf", "a.gguf", "b/inner.gguf"]
    assert found == sorted(found, key=lambda p: Path(p).parts)


def test_gguf_found_by_magic_without_the_suffix(tmp_path: Path) -> None:
    write_gguf(tmp_path / "model-weights")
    text_with_magic = tmp_path / "notes.txt"
    text_with_magic.write_bytes(b"GGUF but really a note")
    found = list(discover(tmp_path))
    assert [Path(m.path).name for m in found] == ["model-weights"]
    assert found[0].error is None and found[0].model_type == "gemma3"


def test_folder_without_weights_or_config_is_not_a_model(tmp_path: Path) -> None:
    (tmp_path / "only-config").mkdir()
    (tmp_path / "only-config" / "config.json").write_text("{}")
    (tmp_path / "only-weights").mkdir()
    write_safetensors(tmp_path / "only-weights" / "model.safetensors", {"w": (2,)})
    assert list(discover(tmp_path)) == []
    assert not is_hf_folder(tmp_path / "only-config") and not is_hf_folder(tmp_path / "only-weights")


def test_base_folder_itself_can_be_the_model(tmp_path: Path) -> None:
    folder = hf_folder(tmp_path / "m", {"model_type": "gemma3_text"})
    found = list(discover(folder))
    assert len(found) == 1 and found[0].path == str(folder) and found[0].model_type == "gemma3_text"
    assert is_hf_folder(folder) and sniff_format(folder) == "safetensors"


def test_config_that_is_not_an_object(tmp_path: Path) -> None:
    hf_folder(tmp_path / "list-config", "[1, 2, 3]")
    (found,) = discover(tmp_path)
    assert found.error is not None and "JSON object" in found.error


def test_dangling_gguf_symlink_is_reported_not_raised(tmp_path: Path) -> None:
    (tmp_path / "gone.gguf").symlink_to(tmp_path / "nowhere.gguf")
    (found,) = discover(tmp_path)
    assert found.error is not None and found.size_bytes == 0


def test_not_a_folder(tmp_path: Path) -> None:
    with pytest.raises(NotADirectoryError):
        list(discover(tmp_path / "missing"))
    path = write_gguf(tmp_path / "x.gguf")
    with pytest.raises(NotADirectoryError):
        list(discover(path))


def test_lazy_public_names(tree: Path) -> None:
    assert ci.discover is discover and ci.DiscoveredModel is DiscoveredModel
    assert len(list(ci.discover(tree))) == 4


@pytest.mark.parametrize(
    ("config", "label"),
    [
        ({}, ""),
        ({"torch_dtype": "bfloat16"}, "bfloat16"),
        ({"quantization_config": {"quant_method": "awq", "bits": 4, "group_size": 128}}, "awq-4bit-g128"),
        ({"quantization_config": {"quant_method": "fp8"}}, "fp8"),
        ({"quantization": {"group_size": 64, "bits": 4}}, "4bit-g64"),
        ({"quantization_config": "weird", "torch_dtype": "float16"}, "float16"),
    ],
)
def test_hf_quantisation_labels(config: dict[str, Any], label: str) -> None:
    assert hf_quantisation(config) == label
