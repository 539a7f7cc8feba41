"""The bounded GGUF reader: real files from the gguf package, then hostile ones."""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core_inference import ModelLoadError
from core_inference.formats import is_gguf, sniff_format
from core_inference.formats.gguf import KEEP_ARRAY_ITEMS, GGUFHeader, SkippedArray, read_gguf

TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"tok{i}" for i in range(96)]
TEMPLATE = "{% for m in messages %}{{ m.content }}{% endfor %}"


def write_gguf(
    path: Path,
    arch: str = "gemma3",
    tokens: list[str] = TOKENS,
    chat_template: str | None = TEMPLATE,
    file_type: int | None = 15,
) -> Path:
    """A tiny but valid GGUF: metadata, a long token list and two F32 tensors.

    Tensor sizes are multiples of the 32-byte alignment, so the file ends exactly
    where the last tensor does and any shorter prefix is truncated.
    """
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(2)
    w.add_context_length(128)
    if file_type is not None:
        w.add_file_type(file_type)
    w.add_token_list(tokens)
    if chat_template is not None:
        w.add_chat_template(chat_template)
    w.add_tensor("token_embd.weight", np.arange(32, dtype=np.float32).reshape(4, 8))
    w.add_tensor("output_norm.weight", np.ones(16, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def valid(tmp_path: Path) -> Path:
    return write_gguf(tmp_path / "tiny.gguf")


# -- hand-built pieces for hostile files ---------------------------------------------


def s(raw: bytes) -> bytes:
    """A GGUF string: u64 length, then the bytes."""
    return struct.pack("<Q", len(raw)) + raw


def kv_u32(key: bytes, value: int) -> bytes:
    return s(key) + struct.pack("<II", 4, value)


def tensor_info(name: bytes, dims: list[int], ttype: int = 0, offset: int = 0) -> bytes:
    out = s(name) + struct.pack("<I", len(dims))
    out += b"".join(struct.pack("<Q", d) for d in dims)
    return out + struct.pack("<IQ", ttype, offset)


def header(tensors: int, kvs: int, version: int = 3, magic: bytes = b"GGUF") -> bytes:
    return magic + struct.pack("<IQQ", version, tensors, kvs)


def pad(data: bytes, alignment: int = 32) -> bytes:
    return data + b"\0" * (-len(data) % alignment)


def hand_file(kvs: list[bytes], tensors: list[bytes], data: bytes = b"", version: int = 3) -> bytes:
    return pad(header(len(tensors), len(kvs), version) + b"".join(kvs) + b"".join(tensors)) + data


# -- valid files ---------------------------------------------------------------------


def test_reads_a_valid_file(valid: Path) -> None:
    h = read_gguf(valid)
    assert isinstance(h, GGUFHeader)
    assert h.path == str(valid)
    assert h.version == 3
    assert h.architecture == "gemma3"
    assert h.vocab_size == len(TOKENS)
    assert len(TOKENS) > KEEP_ARRAY_ITEMS
    assert isinstance(h.metadata["tokenizer.ggml.tokens"], SkippedArray)
    assert h.chat_template == TEMPLATE
    assert h.file_type == ("Q4_K_M", 4)
    assert h.arch_value("block_count") == 2 and h.arch_value("context_length") == 128
    assert h.tensor_count == 2
    assert h.data_size == (32 + 16) * 4
    assert h.file_size == valid.stat().st_size == h.data_offset + h.data_size
    assert h.data_offset % 32 == 0


def test_reads_str_and_pathlike(valid: Path) -> None:
    assert read_gguf(str(valid)).architecture == read_gguf(valid).architecture


def test_short_vocab_is_kept_and_no_template_is_none(tmp_path: Path) -> None:
    h = read_gguf(write_gguf(tmp_path / "short.gguf", arch="qwen2", tokens=["a", "b", "c"],
                             chat_template=None, file_type=None))
    assert h.metadata["tokenizer.ggml.tokens"] == ["a", "b", "c"]
    assert h.vocab_size == 3
    assert h.chat_template is None
    assert h.architecture == "qwen2"
    assert h.file_type == ("", 0)


def test_file_without_tensors(tmp_path: Path) -> None:
    path = tmp_path / "vocab-only.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_token_list(["a", "b"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    h = read_gguf(path)
    assert h.tensor_count == 0 and h.vocab_size == 2
    # also the bare minimum: a header and nothing else
    bare = tmp_path / "bare.gguf"
    bare.write_bytes(header(0, 0))
    assert read_gguf(bare).metadata == {}


def test_version_2_is_read(tmp_path: Path) -> None:
    path = tmp_path / "v2.gguf"
    path.write_bytes(hand_file([kv_u32(b"general.alignment", 32)], [], version=2))
    assert read_gguf(path).version == 2


def test_check_data_false_skips_the_data_check(valid: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut.gguf"
    h = read_gguf(valid)
    cut.write_bytes(valid.read_bytes()[: h.data_offset + 8])
    with pytest.raises(ModelLoadError, match="truncated"):
        read_gguf(cut)
    assert read_gguf(cut, check_data=False).architecture == "gemma3"


def test_sniffing(valid: Path, tmp_path: Path) -> None:
    assert is_gguf(valid) and sniff_format(valid) == "gguf"
    other = tmp_path / "notes.txt"
    other.write_text("hello")
    assert not is_gguf(other) and sniff_format(other) is None
    assert not is_gguf(tmp_path / "missing.gguf")
    assert sniff_format("https://example.com/v1") == "url"


# -- hostile files: every one a ModelLoadError naming the file -----------------------


def expect_load_error(path: Path, data: bytes, match: str | None = None) -> ModelLoadError:
    path.write_bytes(data)
    with pytest.raises(ModelLoadError) as info:
        read_gguf(path)
    assert str(path) in str(info.value)
    if match is not None:
        assert match in str(info.value), str(info.value)
    return info.value


def test_zero_bytes(tmp_path: Path) -> None:
    expect_load_error(tmp_path / "empty.gguf", b"", "too short")


def test_every_sixteenth_prefix_of_a_valid_file(valid: Path, tmp_path: Path) -> None:
    data = valid.read_bytes()
    for k in range(16):
        expect_load_error(tmp_path / f"prefix{k}.gguf", data[: len(data) * k // 16])


def test_every_prefix_through_the_header_region(valid: Path, tmp_path: Path) -> None:
    data = valid.read_bytes()
    end = read_gguf(valid).data_offset
    path = tmp_path / "prefix.gguf"
    for n in range(0, end + 40, 7):
        expect_load_error(path, data[:n])


def test_wrong_magic(valid: Path, tmp_path: Path) -> None:
    data = valid.read_bytes()
    expect_load_error(tmp_path / "magic.gguf", b"GGML" + data[4:], "magic")
    expect_load_error(tmp_path / "zip.gguf", b"PK\x03\x04" + b"\0" * 100, "magic")


@pytest.mark.parametrize("version", [0, 1, 4, 99, 2**32 - 1])
def test_unknown_version(tmp_path: Path, version: int) -> None:
    expect_load_error(tmp_path / "version.gguf", hand_file([], [], version=version), f"version {version}")


def test_big_endian_file_is_an_unknown_version(valid: Path, tmp_path: Path) -> None:
    data = valid.read_bytes()
    expect_load_error(tmp_path / "be.gguf", data[:4] + struct.pack(">I", 3) + data[8:], "version")


@pytest.mark.parametrize("count", [2**24 + 1, 2**40, 2**64 - 1])
def test_absurd_tensor_count(tmp_path: Path, count: int) -> None:
    expect_load_error(tmp_path / "tensors.gguf", pad(header(count, 0)), "tensor count")


@pytest.mark.parametrize("count", [2**24 + 1, 2**40, 2**64 - 1])
def test_absurd_kv_count(tmp_path: Path, count: int) -> None:
    expect_load_error(tmp_path / "kvs.gguf", pad(header(0, count)), "metadata key count")


def test_counts_larger_than_the_file(tmp_path: Path) -> None:
    expect_load_error(tmp_path / "kvs.gguf", pad(header(0, 1000)), "past the end")
    expect_load_error(tmp_path / "tensors.gguf", pad(header(1000, 0)), "past the end")


@pytest.mark.parametrize("length", [10_000, 2**40, 2**63, 2**64 - 1])
def test_string_length_past_eof(tmp_path: Path, length: int) -> None:
    key = struct.pack("<Q", length) + b"general.architecture"
    expect_load_error(tmp_path / "keylen.gguf", pad(header(0, 1) + key), "past the end")
    value = s(b"general.architecture") + struct.pack("<IQ", 8, length) + b"gemma3"
    expect_load_error(tmp_path / "vallen.gguf", pad(header(0, 1) + value), "past the end")


def test_array_length_past_eof(tmp_path: Path) -> None:
    arr = s(b"tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 2**62)
    expect_load_error(tmp_path / "arr.gguf", pad(header(0, 1) + arr), "past the end")
    ints = s(b"tokenizer.ggml.scores") + struct.pack("<IIQ", 9, 6, 2**61)
    expect_load_error(tmp_path / "ints.gguf", pad(header(0, 1) + ints), "past the end")


def test_non_utf8_key(tmp_path: Path) -> None:
    expect_load_error(tmp_path / "key.gguf", hand_file([kv_u32(b"general.\xff\xfe", 1)], []), "UTF-8")


def test_non_utf8_string_value(tmp_path: Path) -> None:
    kv = s(b"general.name") + struct.pack("<I", 8) + s(b"caf\xe9")
    expect_load_error(tmp_path / "val.gguf", hand_file([kv], []), "UTF-8")


@pytest.mark.parametrize("vtype", [13, 99, 2**32 - 1])
def test_unknown_value_type(tmp_path: Path, vtype: int) -> None:
    kv = s(b"general.thing") + struct.pack("<II", vtype, 0)
    expect_load_error(tmp_path / "vtype.gguf", hand_file([kv], []), f"unknown value type {vtype}")


def test_unknown_array_item_type(tmp_path: Path) -> None:
    kv = s(b"general.things") + struct.pack("<IIQ", 9, 77, 1) + b"\0" * 16
    expect_load_error(tmp_path / "itype.gguf", hand_file([kv], []), "unknown item type 77")


def test_arrays_nested_absurdly_deep(tmp_path: Path) -> None:
    depth = 50_000  # would blow Python's recursion limit if followed
    kv = s(b"general.nested") + struct.pack("<I", 9) + struct.pack("<IQ", 9, 1) * depth
    kv += struct.pack("<IQ", 4, 0)
    expect_load_error(tmp_path / "deep.gguf", hand_file([kv], []), "nests arrays")


def test_shallow_nested_arrays_are_fine(tmp_path: Path) -> None:
    inner = struct.pack("<IQ", 4, 2) + struct.pack("<II", 7, 8)
    kv = s(b"general.pairs") + struct.pack("<I", 9) + struct.pack("<IQ", 9, 2) + inner + inner
    path = tmp_path / "pairs.gguf"
    path.write_bytes(hand_file([kv], []))
    assert read_gguf(path).metadata["general.pairs"] == [[7, 8], [7, 8]]


@pytest.mark.parametrize("n_dims", [0, 5, 9, 2**32 - 1])
def test_tensor_with_bad_dimension_count(tmp_path: Path, n_dims: int) -> None:
    info = s(b"t") + struct.pack("<I", n_dims) + struct.pack("<Q", 1) * min(n_dims, 9)
    info += struct.pack("<IQ", 0, 0)
    expect_load_error(tmp_path / "dims.gguf", hand_file([], [info], b"\0" * 64), "dimensions")


def test_tensor_with_absurd_dimensions(tmp_path: Path) -> None:
    info = tensor_info(b"huge", [2**40, 2**40, 2**40, 2**40])
    expect_load_error(tmp_path / "huge.gguf", hand_file([], [info], b"\0" * 64), "absurd dimensions")


def test_tensor_with_unknown_type(tmp_path: Path) -> None:
    info = tensor_info(b"t", [4], ttype=1234)
    expect_load_error(tmp_path / "ttype.gguf", hand_file([], [info], b"\0" * 64), "unknown type 1234")


def test_tensor_elements_not_a_multiple_of_the_block(tmp_path: Path) -> None:
    info = tensor_info(b"q", [33], ttype=2)  # Q4_0 blocks hold 32 elements
    expect_load_error(tmp_path / "block.gguf", hand_file([], [info], b"\0" * 64), "block")


def test_truncated_tensor_data(tmp_path: Path) -> None:
    info = tensor_info(b"t", [16])  # 64 bytes of F32
    expect_load_error(tmp_path / "short.gguf", hand_file([], [info], b"\0" * 63), "truncated")
    far = tensor_info(b"t", [16], offset=2**50)
    expect_load_error(tmp_path / "far.gguf", hand_file([], [far], b"\0" * 64), "truncated")
    ok = tmp_path / "ok.gguf"
    ok.write_bytes(hand_file([], [info], b"\0" * 64))
    assert read_gguf(ok).data_size == 64


@pytest.mark.parametrize("alignment", [0, 3, 48])
def test_bad_alignment(tmp_path: Path, alignment: int) -> None:
    expect_load_error(tmp_path / "align.gguf", hand_file([kv_u32(b"general.alignment", alignment)], []),
                      "alignment")


def test_missing_file_and_folder(tmp_path: Path) -> None:
    missing = tmp_path / "missing.gguf"
    with pytest.raises(ModelLoadError, match=r"missing\.gguf"):
        read_gguf(missing)
    with pytest.raises(ModelLoadError) as info:
        read_gguf(tmp_path)
    assert str(tmp_path) in str(info.value)


# -- fuzzing -------------------------------------------------------------------------

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gguf_fuzz")


@pytest.fixture(scope="module")
def valid_bytes(fuzz_dir: Path) -> tuple[bytes, int]:
    path = write_gguf(fuzz_dir / "valid.gguf")
    return path.read_bytes(), read_gguf(path).data_offset


def only_load_errors(path: Path, data: bytes, check: Callable[[GGUFHeader], None] | None = None) -> None:
    path.write_bytes(data)
    try:
        h = read_gguf(path)
    except ModelLoadError as exc:
        assert str(path) in str(exc)
    else:
        assert isinstance(h, GGUFHeader)
        if check is not None:
            check(h)


@FUZZ
@given(data=st.binary(max_size=512))
def test_fuzz_arbitrary_bytes(fuzz_dir: Path, data: bytes) -> None:
    only_load_errors(fuzz_dir / "arbitrary.gguf", data)


@FUZZ
@given(version=st.sampled_from([2, 3]), rest=st.binary(max_size=512))
def test_fuzz_arbitrary_bytes_after_a_good_header_start(fuzz_dir: Path, version: int, rest: bytes) -> None:
    only_load_errors(fuzz_dir / "after_magic.gguf", b"GGUF" + struct.pack("<I", version) + rest)


@FUZZ
@given(flips=st.lists(st.tuples(st.integers(min_value=0), st.integers(min_value=1, max_value=255)),
                      min_size=1, max_size=8))
def test_fuzz_flipped_header_bytes(fuzz_dir: Path, valid_bytes: tuple[bytes, int],
                                   flips: list[tuple[int, int]]) -> None:
    data, header_end = valid_bytes
    mutated = bytearray(data)
    for pos, xor in flips:
        mutated[pos % header_end] ^= xor

    def sane(h: GGUFHeader) -> None:
        assert h.file_size == len(mutated)
        if h.data_size:  # tensor data, when there is any, lies inside the file
            assert h.data_offset + h.data_size <= h.file_size

    only_load_errors(fuzz_dir / "flipped.gguf", bytes(mutated), sane)


@FUZZ
@given(cut=st.integers(min_value=0), junk=st.binary(max_size=64))
def test_fuzz_truncated_then_junk(
    fuzz_dir: Path, valid_bytes: tuple[bytes, int], cut: int, junk: bytes
) -> None:
    data, _ = valid_bytes
    only_load_errors(fuzz_dir / "junk.gguf", data[: cut % len(data)] + junk)
