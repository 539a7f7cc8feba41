"""The native anchor (``bench/llama_server.py`` and the ``llama_server`` suite).

Nothing here compiles llama.cpp or needs the binary: the build's command lines, its stamp,
the availability check and the suite's skip line are checked as they are. When the binary
has been built (``make bench`` or ``python -m core_inference.bench.llama_server``), one
more test runs the suite end to end at tiny sizes; it times nothing.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from core_inference.bench import llama_server as ls
from core_inference.bench.report import markdown_table
from core_inference.bench.runner import run_bench

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_binary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty cache folder in place of the checkout's, and no $LLAMA_SERVER."""
    root = tmp_path / "llama-server"
    monkeypatch.setenv(ls.ENV_DIR, str(root))
    monkeypatch.delenv(ls.ENV_BINARY, raising=False)
    return root


def test_download_fetches_the_installed_versions_sdist_only(tmp_path: Path) -> None:
    from importlib.metadata import version

    assert ls.installed_version() == version("llama-cpp-python")
    cmd = ls.download_command("0.3.36", tmp_path)
    assert cmd[:4] == [sys.executable, "-m", "pip", "download"]
    assert "--no-deps" in cmd and cmd[cmd.index("--no-binary") + 1] == ":all:"
    assert "llama-cpp-python==0.3.36" in cmd and cmd[cmd.index("--dest") + 1] == str(tmp_path)


def test_configure_and_build_are_release_cpu_only_offline_and_one_target(tmp_path: Path) -> None:
    src, build = tmp_path / "llama.cpp", tmp_path / "build"
    conf = ls.configure_command(src, build)
    assert conf[:5] == ["cmake", "-S", str(src), "-B", str(build)]
    for flag in ("-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
                 "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_BUILD_SERVER=ON",
                 "-DBUILD_SHARED_LIBS=OFF", "-DGGML_CUDA=OFF", "-DGGML_METAL=OFF"):
        assert flag in conf, flag
    assert ls.build_command(build, 2) == [
        "cmake", "--build", str(build), "--config", "Release", "--target", "llama-server", "-j", "2"]


def test_cmake_args_from_the_environment_reach_llama_server_as_they_reach_llama_cpp_python(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CMAKE_ARGS", "-DCMAKE_C_FLAGS='-mno-amx-tile -mno-amx-int8'")
    conf = ls.configure_command(tmp_path / "src", tmp_path / "build")
    assert conf[-1] == "-DCMAKE_C_FLAGS=-mno-amx-tile -mno-amx-int8"  # one argument, quotes gone
    with_flags = ls.stamp_for("0.3.36")
    monkeypatch.delenv("CMAKE_ARGS")
    assert ls.stamp_for("0.3.36") != with_flags  # other flags: a rebuild


def test_the_binary_lives_at_a_fixed_ignored_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ls.ENV_DIR, raising=False)
    path = ls.binary_path()
    assert path == REPO / ".bench" / "llama-server" / "bin" / "llama-server"
    if shutil.which("git"):
        ignored = subprocess.run(["git", "check-ignore", "-q", str(path)], cwd=REPO, check=False)
        assert ignored.returncode == 0, f"{path} is not ignored by git"


def test_a_second_build_finds_the_stamp_and_runs_nothing(no_binary: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    binary = ls.binary_path(no_binary)
    binary.parent.mkdir(parents=True)
    binary.write_bytes(b"")
    (no_binary / "stamp.json").write_text(ls.stamp_for("0.3.36"), encoding="utf-8")

    def no_step(*args: object, **kw: object) -> None:
        raise AssertionError(f"a stamped build ran a step: {args}")

    monkeypatch.setattr(ls, "_step", no_step)
    assert ls.build(no_binary, "0.3.36") == binary.resolve()
    assert ls.is_built(no_binary, "0.3.36")
    assert not ls.is_built(no_binary, "0.3.35")  # another version: built again
    (no_binary / "stamp.json").write_text(ls.stamp_for("0.3.36").replace("CURL=OFF", "CURL=ON"))
    assert not ls.is_built(no_binary, "0.3.36")  # other flags: built again
    (no_binary / "stamp.json").write_text(ls.stamp_for("0.3.36").replace(ls.cpu_fingerprint(), "arm64:0"))
    assert not ls.is_built(no_binary, "0.3.36")  # another CPU (the build is -march=native): built again
    binary.unlink()
    (no_binary / "stamp.json").write_text(ls.stamp_for("0.3.36"), encoding="utf-8")
    assert not ls.is_built(no_binary, "0.3.36")  # no binary: built again


def test_availability_says_how_to_build_it(no_binary: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert ls.find_binary() is None
    assert ls.why_unavailable() == ls.NOT_BUILT == "llama-server not built (make bench builds it)"
    assert ls.main(["--check"]) == 1 and capsys.readouterr().out.strip() == ls.NOT_BUILT

    monkeypatch.setenv(ls.ENV_BINARY, str(no_binary / "nowhere"))
    assert ls.why_unavailable() == f"LLAMA_SERVER={no_binary / 'nowhere'} is not an executable file"

    exe = no_binary / "elsewhere" / "llama-server"  # $LLAMA_SERVER: a binary built elsewhere
    exe.parent.mkdir(parents=True)
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    monkeypatch.setenv(ls.ENV_BINARY, str(exe))
    assert ls.find_binary() == exe and ls.why_unavailable() is None
    assert ls.main(["--check"]) == 0 and capsys.readouterr().out.strip() == str(exe)


def test_without_the_binary_the_rows_say_why_and_nothing_runs(no_binary: Path, tmp_path: Path) -> None:
    pytest.importorskip("llama_cpp")
    pytest.importorskip("httpx2")
    from core_inference.bench.llama_server_suite import QUICK_STREAMS

    lines: list[str] = []
    res = run_bench(None, str(tmp_path), quick=True, suites=["llama_server"], machine="m", echo=lines.append)
    (suite,) = res["suites"]
    assert "skipped" not in suite and "error" not in suite, suite
    assert [r["key"] for r in suite["rows"]] == [f"llama_server_{n}_streams" for n in QUICK_STREAMS]
    for row in suite["rows"]:
        assert row["skipped"] == ls.NOT_BUILT and row["error"] is None
        assert all(side["values"] == [] for side in row["sides"])  # no side ran
        assert f"  {row['key']}: skipped: llama-server not built (make bench builds it)" in lines
        assert f"| {row['title']} | not run: {ls.NOT_BUILT} |" in markdown_table(res)
    assert res["versions"]["llama-server"] == ls.NOT_BUILT


def test_a_server_that_exits_at_once_is_reported_and_reaped(tmp_path: Path) -> None:
    false = shutil.which("false")
    if false is None:
        pytest.skip("no 'false' command here")
    with pytest.raises(RuntimeError, match="llama-server did not start"):
        ls.LlamaServer(str(tmp_path / "model.gguf"), threads=1, binary=Path(false), timeout=30)


def test_the_command_line_serves_the_slots_on_loopback(tmp_path: Path) -> None:
    cmd = ls.server_command(tmp_path / "llama-server", "m.gguf", 4321, threads=2, slots=16, ctx_per_slot=512)
    args = dict(zip(cmd[1::2], cmd[2::2], strict=False))
    assert cmd[0] == str(tmp_path / "llama-server") and "--cont-batching" in cmd
    assert args["--host"] == "127.0.0.1" and args["--port"] == "4321" and args["--model"] == "m.gguf"
    assert cmd[cmd.index("--parallel") + 1] == "16" and cmd[cmd.index("--ctx-size") + 1] == str(16 * 512)
    assert cmd[cmd.index("--threads") + 1] == "2" and cmd[cmd.index("--threads-batch") + 1] == "2"


def test_make_bench_builds_it_and_make_test_does_not() -> None:
    if shutil.which("make") is None:
        pytest.skip("no make here")

    def planned(target: str) -> str:
        done = subprocess.run(["make", "-n", target], cwd=REPO, capture_output=True, text=True, check=False)
        return done.stdout

    assert "core_inference.bench.llama_server" in planned("bench")
    assert "core_inference.bench.llama_server" not in planned("test")


@pytest.mark.skipif(ls.find_binary() is None, reason="needs the built llama-server (make bench builds it)")
def test_the_suite_runs_end_to_end_at_tiny_sizes(tmp_path: Path) -> None:
    from core_inference.bench.llama_server_suite import (
        ANCHOR,
        API,
        INVARIANT_API,
        INVARIANT_SERVE,
        QUICK_STREAMS,
        QUICK_TOKENS,
        SERVE,
    )

    pytest.importorskip("starlette")
    res = run_bench(None, str(tmp_path), quick=True, threads=1, suites=["llama_server"], machine="q",
                    echo=None)
    data = json.loads((tmp_path / "q.json").read_text())
    assert data["versions"]["llama-server"].startswith("built from")
    (suite,) = data["suites"]
    assert "error" not in suite and "skipped" not in suite, suite
    assert [row["key"] for row in suite["rows"]] == [f"llama_server_{n}_streams" for n in QUICK_STREAMS]
    for row, n in zip(suite["rows"], QUICK_STREAMS, strict=True):
        assert row["error"] is None, row["error"]
        assert [s["name"] for s in row["sides"]] == [
            ANCHOR, API.format(n=n), SERVE, INVARIANT_API, INVARIANT_SERVE]
        assert row["reference"] == ANCHOR and all(s["median"] > 0 for s in row["sides"])
        assert set(row["info"]["runs"]) == {s["name"] for s in row["sides"]}
        for name, runs in row["info"]["runs"].items():
            (run,) = runs
            assert run["tokens"] == row["info"]["expected_tokens"] == n * QUICK_TOKENS, (name, run)
        assert bool(row["targets"]) == (n == 4)
    assert res["suites"][0]["name"] == "llama_server"
