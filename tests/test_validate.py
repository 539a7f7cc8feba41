"""Bad model files never crash the process: ``load_model`` raises ``ModelLoadError``.

Every case goes through the public ``core_inference.load_model(path)`` (and, where it
says so, ``check_model_path`` directly): the error names the file and what is wrong,
before any backend or engine sees the file.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import core_inference as ci
from core_inference import ModelLoadError, registry
from core_inference.formats.validate import check_model_path, check_safetensors, gguf_header
from core_inference.testing import FakeBackend

# -- builders ---------------------------------------------------------------------------


def gstr(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def kv_str(key: str | bytes, value: str | bytes) -> bytes:
    return gstr(key) + struct.pack("<I", 8) + gstr(value)


def gguf_bytes(
    kvs: list[bytes] | None = None,
    *,
    version: int = 3,
    n_tensors: int | None = None,
    n_kv: int | None = None,
    tensors: bytes = b"",
    data: bytes = b"",
) -> bytes:
    """A hand-built GGUF file; counts default to what is really there."""
    kvs = [kv_str("general.architecture", "gemma3")] if kvs is None else kvs
    count = tensors.count(b"TENSOR") if n_tensors is None else n_tensors
    head = b"GGUF" + struct.pack("<IQQ", version, count, len(kvs) if n_kv is None else n_kv)
    body = head + b"".join(kvs) + tensors
    pad = (-len(body)) % 32 if data else 0
    return body + b"\0" * pad + data


def tensor_info(name: str, dims: list[int], ttype: int = 0, offset: int = 0) -> bytes:
    return gstr("TENSOR" + name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims) + (
        struct.pack("<IQ", ttype, offset)
    )


def safetensors_bytes(header: Any, data: bytes = b"", *, length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def hf_folder(root: Path, config: Any = None, shards: dict[str, bytes] | None = None) -> Path:
    """A Hugging Face style folder: config.json (dict -> JSON, bytes -> as is) and shards."""
    root.mkdir(parents=True, exist_ok=True)
    config = {"model_type": "llama"} if config is None else config
    (root / "config.json").write_bytes(config if isinstance(config, bytes) else json.dumps(config).encode())
    if shards is None:
        shards = {"model.safetensors": GOOD_ST}
    for name, raw in shards.items():
        (root / name).write_bytes(raw)
    return root


GOOD_ST = safetensors_bytes(
    {
        "__metadata__": {"format": "pt"},
        "w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
        "b": {"dtype": "BF16", "shape": [4], "data_offsets": [16, 24]},
    },
    b"\0" * 24,
)


@pytest.fixture
def fake_registry(empty_registry: None) -> FakeBackend:
    """A registry holding only a fake backend that loads anything: validation alone decides."""
    fake = FakeBackend("fake")
    registry.register(fake)
    return fake


def load_fails(path: Path | str, *needles: str) -> ModelLoadError:
    """``ci.load_model(path)`` must raise ModelLoadError naming the file and each needle."""
    with pytest.raises(ModelLoadError) as info:
        ci.load_model(path)
    msg = str(info.value)
    assert os.fspath(path) in msg, msg
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"
    return info.value


# -- paths ------------------------------------------------------------------------------


def test_missing_path(tmp_path: Path) -> None:
    load_fails(tmp_path / "nope.gguf", "no such file or folder")


def test_model_load_error_carries_the_path_at_fault(tmp_path: Path) -> None:
    """``ModelLoadError.path`` is the file (or folder) at fault, for code that decides on it."""
    cases: list[tuple[Path, Path]] = []
    cases.append((tmp_path / "nope.gguf", tmp_path / "nope.gguf"))  # missing
    bad_magic = tmp_path / "text.gguf"
    bad_magic.write_bytes(b"NOPE" + b"\0" * 40)
    cases.append((bad_magic, bad_magic))
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(gguf_bytes()[:-1])
    cases.append((truncated, truncated))
    lone = tmp_path / "lone.safetensors"
    lone.write_bytes(GOOD_ST)
    cases.append((lone, lone))
    no_config = tmp_path / "no-config"
    no_config.mkdir()
    (no_config / "model.safetensors").write_bytes(GOOD_ST)
    cases.append((no_config, no_config / "config.json"))
    bad_shard = hf_folder(tmp_path / "bad-shard", shards={"model.safetensors": GOOD_ST[:-1]})
    cases.append((bad_shard, bad_shard / "model.safetensors"))
    no_shards = hf_folder(tmp_path / "no-shards", shards={})
    cases.append((no_shards, no_shards))
    for path, at_fault in cases:
        with pytest.raises(ModelLoadError) as info:
            check_model_path(path)
        assert info.value.path == str(at_fault), (path, info.value)


def test_dangling_symlink(tmp_path: Path) -> None:
    link = tmp_path / "link.gguf"
    link.symlink_to(tmp_path / "gone.gguf")
    load_fails(link, "no such file or folder")


def test_path_with_nul_byte(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="NUL"):
        ci.load_model(str(tmp_path / "a\0b.gguf"))


@pytest.mark.parametrize("bad", [123, b"/tmp/model.gguf", 1.5, ["a"]])
def test_path_of_the_wrong_type(bad: Any) -> None:
    with pytest.raises(TypeError, match="model path"):
        ci.load_model(bad)


def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "model.gguf"
    os.mkfifo(fifo)
    load_fails(fifo, "not a regular file or folder")


def test_url_is_not_checked(fake_registry: FakeBackend) -> None:
    assert check_model_path("https://example.invalid/v1") == "url"
    ci.load_model("http://localhost:9/v1").close()
    assert fake_registry.loaded == ["http://localhost:9/v1"]


# -- GGUF files -------------------------------------------------------------------------


def test_zero_bytes(tmp_path: Path) -> None:
    path = tmp_path / "empty.gguf"
    path.write_bytes(b"")
    load_fails(path, "0 bytes")


def test_valid_tiny_gguf_passes_validation(tmp_path: Path, fake_registry: FakeBackend) -> None:
    path = tmp_path / "ok.gguf"
    path.write_bytes(gguf_bytes(tensors=tensor_info("w", [8]), data=b"\0" * 32))
    assert check_model_path(path) == "gguf"
    ci.load_model(path).close()
    assert fake_registry.loaded == [str(path)]


def test_wrong_magic(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGML" + gguf_bytes()[4:])
    load_fails(path, "not a GGUF file", "b'GGML'")


def test_text_file(tmp_path: Path) -> None:
    path = tmp_path / "README.md"
    path.write_text("# not a model\n" * 10)
    load_fails(path, "not a GGUF file")


@pytest.mark.parametrize("version", [0, 1, 4, 0xFFFFFFFF, 0x03000000])
def test_unknown_version(tmp_path: Path, version: int) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(gguf_bytes(version=version))
    load_fails(path, f"unsupported GGUF version {version}")


@pytest.mark.parametrize("count", [1 << 25, 1 << 40, (1 << 64) - 1])
def test_absurd_tensor_count(tmp_path: Path, count: int) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(gguf_bytes(n_tensors=count))
    load_fails(path, "absurd tensor count")


@pytest.mark.parametrize("count", [1 << 25, (1 << 64) - 1])
def test_absurd_kv_count(tmp_path: Path, count: int) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(gguf_bytes(n_kv=count))
    load_fails(path, "absurd metadata key count")


def test_more_keys_than_the_file_holds(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(gguf_bytes(n_kv=1000))
    load_fails(path, "past the end of the file")


@pytest.mark.parametrize("length", [1 << 20, 1 << 62, (1 << 64) - 1])
def test_string_length_past_eof(tmp_path: Path, length: int) -> None:
    kv = struct.pack("<Q", length) + b"general.architecture"
    path = tmp_path / "model.gguf"
    path.write_bytes(gguf_bytes([kv]))
    load_fails(path, "runs past the end of the file")


def test_value_string_length_past_eof(tmp_path: Path) -> None:
    kv = gstr("general.name") + struct.pack("<IQ", 8, 1 << 40) + b"abc"
    path = tmp_path / "model.gguf"
    path.write_bytes(gguf_bytes([kv]))
    load_fails(path, "value of 'general.name'", "past the end")


def test_non_utf8_metadata_key(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(gguf_bytes([kv_str(b"general.\xff\xfe", "x")]))
    load_fails(path, "not valid UTF-8")


def test_non_utf8_metadata_value(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(gguf_bytes([kv_str("general.architecture", b"gem\xc3ma3")]))
    load_fails(path, "not valid UTF-8", "general.architecture")


def test_tensor_data_past_eof(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(gguf_bytes(tensors=tensor_info("w", [1024]), data=b"\0" * 32))
    load_fails(path, "truncated GGUF file")


def test_tensor_of_absurd_size(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(gguf_bytes(tensors=tensor_info("w", [1 << 40, 1 << 40]), data=b"\0" * 32))
    load_fails(path, "absurd dimensions")


def test_a_directory_named_like_a_gguf_file(tmp_path: Path) -> None:
    folder = tmp_path / "model.gguf"
    folder.mkdir()
    load_fails(folder, "config.json", "missing")


# -- prefixes of the real default model ---------------------------------------------------


@pytest.fixture(scope="module")
def real_header_end(default_model_file: Path) -> int:
    return gguf_header(default_model_file).data_offset


def test_every_sixteenth_prefix_of_the_default_model(default_model_file: Path, tmp_path: Path) -> None:
    """Copied once, then cut shorter and shorter: 15/16 ... 1/16, then zero bytes."""
    size = default_model_file.stat().st_size
    copy = tmp_path / "prefix.gguf"
    shutil.copyfile(default_model_file, copy)
    for k in range(15, -1, -1):
        os.truncate(copy, size * k // 16)
        err = load_fails(copy)
        msg = str(err)
        assert ("truncated" in msg or "0 bytes" in msg), f"prefix {k}/16: {msg}"


def test_every_sixteenth_prefix_of_the_default_models_header(
    default_model_file: Path, real_header_end: int, tmp_path: Path
) -> None:
    """Cuts inside the metadata and tensor table (the first ~6.5 MB), through the registry."""
    raw = default_model_file.read_bytes()[:real_header_end]
    path = tmp_path / "head.gguf"
    for k in range(16):
        path.write_bytes(raw[: len(raw) * k // 16 + 7])  # +7: never on a field boundary
        load_fails(path)


def test_the_whole_default_model_still_loads(default_model_file: Path) -> None:
    assert check_model_path(default_model_file) == "gguf"


def test_header_cache_sees_a_rewritten_file(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    path.write_bytes(gguf_bytes())
    assert gguf_header(path).architecture == "gemma3"
    path.write_bytes(gguf_bytes([kv_str("general.architecture", "llama")]) + b"\0")  # a new size
    assert gguf_header(path).architecture == "llama"
    path.write_bytes(b"junk")
    with pytest.raises(ModelLoadError):
        gguf_header(path)


def test_engine_rejection_is_a_load_error_not_a_crash(tmp_path: Path) -> None:
    """Structurally valid, but llama.cpp cannot build it: its refusal is a ModelLoadError."""
    pytest.importorskip("llama_cpp")
    path = tmp_path / "alien.gguf"
    path.write_bytes(gguf_bytes([kv_str("general.architecture", "no-such-architecture")]))
    load_fails(path, "llama.cpp could not load the model")


def kv_u32(key: str, value: int) -> bytes:
    return gstr(key) + struct.pack("<II", 4, value)


def hparams_file(extra: list[bytes], block_count: int = 1) -> bytes:
    """A tiny llama-architecture GGUF that reaches llama.cpp's hyperparameter checks."""
    kvs = [
        kv_str("general.architecture", "llama"),
        kv_u32("llama.context_length", 128),
        kv_u32("llama.embedding_length", 64),
        kv_u32("llama.block_count", block_count),
        kv_u32("llama.attention.head_count", 4),
        *extra,
    ]
    return gguf_bytes(kvs)


def experts(count: int, used: int) -> list[bytes]:
    return [kv_u32("llama.expert_count", count), kv_u32("llama.expert_used_count", used)]


HOSTILE_HPARAMS = {
    "block_count_0": hparams_file([], block_count=0),
    "block_count_513": hparams_file([], block_count=513),
    "nextn_past_layers": hparams_file([kv_u32("llama.nextn_predict_layers", 5)]),
    "experts_1025": hparams_file(experts(1025, 2)),
    "experts_none_used": hparams_file(experts(4, 0)),
    "more_used_than_experts": hparams_file(experts(4, 8)),
    "used_without_experts": hparams_file([kv_u32("llama.expert_used_count", 2)]),
    "groups_not_below_experts": hparams_file([*experts(4, 2), kv_u32("llama.expert_group_count", 4)]),
    "unknown_rope_scaling": hparams_file([kv_str("llama.rope.scaling.type", "bogus")]),
}

HPARAMS_CHECK = """\
import json, sys
import core_inference as ci
out = {}
for path in sys.argv[1:]:
    try:
        ci.load_model(path)
        out[path] = "loaded"
    except ci.ModelLoadError as exc:
        out[path] = str(exc)
    print(path, flush=True)  # done: if the process dies, the next path is the culprit
print(json.dumps(out))
"""


def test_values_llama_cpp_would_abort_on_are_load_errors(tmp_path: Path) -> None:
    """Found here: llama.cpp GGML_ASSERTs these header values, killing the process (SIGABRT).

    Run in a subprocess, so an abort fails this test instead of ending the test run.
    """
    pytest.importorskip("llama_cpp")
    import subprocess
    import sys

    paths = []
    for name, raw in HOSTILE_HPARAMS.items():
        path = tmp_path / f"{name}.gguf"
        path.write_bytes(raw)
        paths.append(str(path))
    proc = subprocess.run(
        [sys.executable, "-c", HPARAMS_CHECK, *paths], capture_output=True, text=True, timeout=300
    )
    done = [line for line in proc.stdout.splitlines() if line in paths]
    running = paths[len(done)] if len(done) < len(paths) else "?"
    assert proc.returncode == 0, f"the process died ({proc.returncode}) loading {Path(running).name}"
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for name in paths:
        assert "llama.cpp would abort on it" in results[name], (name, results[name])
        assert name in results[name]


# -- Hugging Face folders -----------------------------------------------------------------


def test_valid_folder_passes_validation(tmp_path: Path, fake_registry: FakeBackend) -> None:
    folder = hf_folder(tmp_path / "m")
    assert check_model_path(folder) == "safetensors"
    ci.load_model(folder).close()
    assert fake_registry.loaded == [str(folder)]


def test_folder_without_config(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(GOOD_ST)
    load_fails(folder, "config.json", "missing")


def test_folder_with_only_a_gguf_says_to_pass_the_file(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "model.gguf").write_bytes(gguf_bytes())
    load_fails(folder, "pass the file itself", "model.gguf")


def test_empty_folder(tmp_path: Path) -> None:
    load_fails(tmp_path, "config.json")


@pytest.mark.parametrize(
    ("config", "needle"),
    [
        (b"", "not valid JSON"),
        (b"{not json", "not valid JSON"),
        (b'{"a": 1', "not valid JSON"),
        (b"[1, 2]", "must be a JSON object, got a JSON array"),
        (b'"text"', "got a JSON string"),
        (b"null", "got a JSON null"),
        (b"42", "got a JSON number"),
        (b'{"name": "\xff\xfe"}', "not valid UTF-8"),
        (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),
    ],
)
def test_invalid_config_json(tmp_path: Path, config: bytes, needle: str) -> None:
    folder = hf_folder(tmp_path / "m", config=config)
    err = load_fails(folder, needle)
    assert str(folder / "config.json") in str(err)


def test_config_with_bom_is_fine(tmp_path: Path) -> None:
    folder = hf_folder(tmp_path / "m", config=b'\xef\xbb\xbf{"model_type": "llama"}')
    assert check_model_path(folder) == "safetensors"


def test_folder_without_safetensors(tmp_path: Path) -> None:
    folder = hf_folder(tmp_path / "m", shards={})
    load_fails(folder, "no *.safetensors files")


def test_shard_index_naming_a_missing_shard(tmp_path: Path) -> None:
    folder = hf_folder(tmp_path / "m")
    index = {"metadata": {}, "weight_map": {"w": "model-00001-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    load_fails(folder, "model-00001-of-00002.safetensors", "not in")


def test_shard_index_escaping_the_folder(tmp_path: Path) -> None:
    folder = hf_folder(tmp_path / "m")
    index = {"weight_map": {"w": "../x.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    load_fails(folder, "../x.safetensors")


def test_lone_safetensors_file(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(GOOD_ST)
    load_fails(path, "pass the Hugging Face folder")


def one(dtype: Any = "F32", shape: Any = (1,), offsets: Any = (0, 4), data: int = 4) -> bytes:
    """A safetensors file holding one tensor entry "w" (tuples become JSON lists)."""
    entry = {"dtype": dtype, "shape": list(shape) if isinstance(shape, tuple) else shape}
    entry["data_offsets"] = list(offsets) if isinstance(offsets, tuple) else offsets
    return safetensors_bytes({"w": entry}, b"\0" * data)


CORRUPT_SAFETENSORS = [
    (b"", "only 0 bytes"),
    (b"\x05\0\0", "only 3 bytes"),
    (struct.pack("<Q", 1 << 40) + b"{}", "runs past the end of the file"),
    (struct.pack("<Q", (1 << 64) - 1), "runs past the end of the file"),
    (safetensors_bytes(b"\xff\xfe{}"), "not valid UTF-8"),
    (safetensors_bytes(b'{"w": '), "not valid JSON"),
    (safetensors_bytes(b"[]"), "JSON array, not an object"),
    (safetensors_bytes({"w": 5}), "entry is not an object"),
    (safetensors_bytes({"w": {"shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4), "missing dtype"),
    (one(dtype="F99"), "unknown dtype"),
    (one(dtype=None), "unknown dtype"),
    (one(shape=(-1,)), "shape"),
    (one(shape=(1.5,)), "shape"),
    (one(shape="1"), "shape"),
    (one(shape=(True,)), "shape"),
    (one(offsets=(4, 0)), "begin <= end"),
    (one(offsets=(0,)), "data_offsets"),
    (one(offsets=(0, "4")), "data_offsets"),
    (one(data=0), "past the end of the data"),
    (one(shape=(1 << 60,)), "does not fit"),
    (one(shape=(3,), offsets=(0, 8), data=8), "expected 12"),
    (safetensors_bytes({"__metadata__": {"a": 1}}), "__metadata__"),
]


@pytest.mark.parametrize(("raw", "needle"), CORRUPT_SAFETENSORS)
def test_corrupt_safetensors_header(tmp_path: Path, raw: bytes, needle: str) -> None:
    folder = hf_folder(tmp_path / "m", shards={"model.safetensors": raw})
    err = load_fails(folder, needle)
    assert str(folder / "model.safetensors") in str(err)


def test_one_corrupt_shard_among_good_ones(tmp_path: Path) -> None:
    shards = {"a.safetensors": GOOD_ST, "b.safetensors": GOOD_ST[:-3], "c.safetensors": GOOD_ST}
    folder = hf_folder(tmp_path / "m", shards=shards)
    load_fails(folder, "b.safetensors", "past the end of the data")


def test_zero_sized_tensor_and_sub_byte_dtypes(tmp_path: Path) -> None:
    header = {
        "empty": {"dtype": "F32", "shape": [1 << 62, 0], "data_offsets": [0, 0]},
        "f4": {"dtype": "F4", "shape": [4], "data_offsets": [0, 2]},
        "f6": {"dtype": "F6_E2M3", "shape": [3], "data_offsets": [2, 5]},  # 18 bits: 3 bytes
    }
    path = tmp_path / "x.safetensors"
    path.write_bytes(safetensors_bytes(header, b"\0" * 5))
    assert set(check_safetensors(path)) == set(header)
    header["f6"]["shape"] = [5]  # 30 bits: 4 bytes, not 3
    path.write_bytes(safetensors_bytes(header, b"\0" * 5))
    with pytest.raises(ModelLoadError, match="expected 4"):
        check_safetensors(path)


# -- fuzzing (short; stress/fuzz_gguf.py runs 10,000 inputs) ---------------------------------


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
entries = st.fixed_dictionaries(
    {},
    optional={
        "dtype": st.sampled_from(["F32", "F16", "BF16", "I8", "F4", "X"]) | json_values,
        "shape": st.lists(st.integers(-2, 2**66), max_size=4) | json_values,
        "data_offsets": st.lists(st.integers(-2, 2**66), max_size=3) | json_values,
    },
)
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _only_load_errors(path: Path) -> None:
    try:
        check_model_path(path)
    except ModelLoadError as exc:
        assert str(path) in str(exc)


@FUZZ
@given(data=st.binary(max_size=300))
def test_fuzz_safetensors_arbitrary_bytes(tmp_path: Path, data: bytes) -> None:
    folder = hf_folder(tmp_path / "fz", shards={"model.safetensors": data})
    _only_load_errors(folder)


@FUZZ
@given(
    header=st.dictionaries(st.text(max_size=8), entries | json_values, max_size=4),
    extra=st.integers(0, 64),
)
def test_fuzz_safetensors_json_headers(tmp_path: Path, header: dict[str, Any], extra: int) -> None:
    try:
        raw = json.dumps(header).encode()
    except ValueError:
        return
    folder = hf_folder(tmp_path / "fz", shards={"model.safetensors": safetensors_bytes(raw, b"\0" * extra)})
    _only_load_errors(folder)


@FUZZ
@given(pos=st.integers(0, len(GOOD_ST) - 1), value=st.integers(0, 255), cut=st.integers(0, len(GOOD_ST)))
def test_fuzz_safetensors_mutated_and_cut(tmp_path: Path, pos: int, value: int, cut: int) -> None:
    raw = bytearray(GOOD_ST)
    raw[pos] = value
    folder = hf_folder(tmp_path / "fz", shards={"model.safetensors": bytes(raw[:cut] if cut else raw)})
    _only_load_errors(folder)


@FUZZ
@given(config=st.binary(max_size=64) | json_values.map(lambda v: json.dumps(v).encode()))
def test_fuzz_config_json(tmp_path: Path, config: bytes) -> None:
    folder = hf_folder(tmp_path / "fz", config=config)
    _only_load_errors(folder)


@FUZZ
@given(rest=st.binary(max_size=200), version=st.sampled_from([2, 3]))
def test_fuzz_gguf_files_through_check_model_path(tmp_path: Path, rest: bytes, version: int) -> None:
    path = tmp_path / "fz.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<I", version) + rest)
    _only_load_errors(path)
