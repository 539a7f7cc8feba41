"""llama.cpp's own ``llama-server``, built from the llama.cpp that llama-cpp-python vendors.

The native anchor of the concurrency rows (issue 14): the same llama.cpp as our backend's
engine, compiled from the sdist of the installed llama-cpp-python version (Release, CPU
only, no curl, no OpenSSL, no web UI: nothing fetched beyond the sdist itself), so that
``llama-server -np 16`` and ours run the same kernels on the same model and threads.

``python -m core_inference.bench.llama_server`` builds it (``make bench`` does), leaving
the binary at ``.bench/llama-server/bin/llama-server`` under the checkout (or under
``$CORE_INFERENCE_LLAMA_SERVER_DIR``); a second run finds the stamp and returns at once.
``$LLAMA_SERVER`` names a binary built elsewhere. ``LlamaServer`` runs it as a child
process on 127.0.0.1. Standard library only.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

NOT_BUILT = "llama-server not built (make bench builds it)"
TARGET = "llama-server"
ENV_BINARY = "LLAMA_SERVER"
ENV_DIR = "CORE_INFERENCE_LLAMA_SERVER_DIR"

# Release, CPU only, static (the binary stands alone once copied), and offline: no curl
# (model downloads), no OpenSSL, no web UI (its prebuilt assets come from a Hugging Face
# bucket), no tests or examples. GGML_NATIVE stays at its default (on), as in the
# llama-cpp-python build it is measured against.
CMAKE_FLAGS: tuple[str, ...] = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_LLGUIDANCE=OFF",
    "-DLLAMA_BUILD_COMMON=ON",
    "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DGGML_CUDA=OFF",
    "-DGGML_METAL=OFF",
    "-DGGML_VULKAN=OFF",
    "-DGGML_CCACHE=OFF",
)


def default_root() -> Path:
    """Where the sdist, sources, build tree and binary live.

    ``$CORE_INFERENCE_LLAMA_SERVER_DIR``, else ``.bench/llama-server`` in the checkout this
    module runs from (an editable install), else under the current directory.
    """
    if os.environ.get(ENV_DIR):
        return Path(os.environ[ENV_DIR])
    here = Path(__file__).resolve().parents[3]
    base = here if (here / "pyproject.toml").is_file() else Path.cwd()
    return base / ".bench" / "llama-server"


def binary_path(root: Path | None = None) -> Path:
    """The fixed path the build leaves the binary at (whether or not it exists)."""
    return (root or default_root()) / "bin" / TARGET


def find_binary(root: Path | None = None) -> Path | None:
    """The binary to bench: ``$LLAMA_SERVER`` when set, else the built one; None when absent."""
    named = os.environ.get(ENV_BINARY)
    path = Path(named) if named else binary_path(root)
    return path if path.is_file() and os.access(path, os.X_OK) else None


def why_unavailable(root: Path | None = None) -> str | None:
    """None when a llama-server binary is there, else why not (for a suite's skip line)."""
    if find_binary(root) is not None:
        return None
    named = os.environ.get(ENV_BINARY)
    return f"{ENV_BINARY}={named} is not an executable file" if named else NOT_BUILT


def installed_version() -> str:
    """The llama-cpp-python version installed here: the one whose llama.cpp we build."""
    from importlib.metadata import version

    return version("llama-cpp-python")


def download_command(version: str, dest: Path) -> list[str]:
    """pip fetching the sdist only (no wheel, no dependencies) into ``dest``."""
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
            f"llama-cpp-python=={version}", "--dest", str(dest)]


def cmake_flags() -> list[str]:
    """Our flags, then ``CMAKE_ARGS`` from the environment: what llama-cpp-python's build
    reads too, so both are built alike (the Makefile puts its no-AMX flags there)."""
    return [*CMAKE_FLAGS, *shlex.split(os.environ.get("CMAKE_ARGS", ""))]


def configure_command(source: Path, build: Path) -> list[str]:
    """CMake configuring the vendored llama.cpp in ``source`` into ``build``."""
    return ["cmake", "-S", str(source), "-B", str(build), *cmake_flags()]


def build_command(build: Path, jobs: int) -> list[str]:
    """CMake building only the ``llama-server`` target."""
    return ["cmake", "--build", str(build), "--config", "Release", "--target", TARGET, "-j", str(jobs)]


def cpu_fingerprint() -> str:
    """The CPU the binary is built for: GGML_NATIVE compiles for this one (-march=native)."""
    import hashlib
    import platform

    flags = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            flags = next((line for line in fh if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass  # not Linux: the architecture alone
    return f"{platform.machine()}:{hashlib.sha256(flags.encode()).hexdigest()[:16]}"


def stamp_for(version: str) -> str:
    """What the stamp file holds: another version, other flags or another CPU mean a rebuild."""
    return json.dumps({"llama-cpp-python": version, "cmake": cmake_flags(), "cpu": cpu_fingerprint()},
                      sort_keys=True)


def is_built(root: Path, version: str) -> bool:
    """True when ``root`` holds a binary built from ``version`` with today's flags."""
    stamp = root / "stamp.json"
    try:
        current = stamp.read_text(encoding="utf-8") == stamp_for(version)
    except OSError:
        return False
    return current and binary_path(root).is_file()


def build(root: Path | None = None, version: str | None = None, jobs: int | None = None,
          log: IO[str] | None = None) -> Path:
    """Download, unpack, configure and build ``llama-server``; return the binary's path.

    Returns at once when the stamp says the binary is current. Raises ``RuntimeError``
    naming the step that failed (its output went to ``log``, default stderr).
    """
    root = (root or default_root()).resolve()
    version = version or installed_version()
    if is_built(root, version):
        return binary_path(root)
    out = log or sys.stderr
    sdists, sources, tree = root / "sdist", root / "src", root / "build"
    name = f"llama_cpp_python-{version}"
    archive = sdists / f"{name}.tar.gz"
    if not archive.is_file():
        sdists.mkdir(parents=True, exist_ok=True)
        _step("download the sdist", download_command(version, sdists), out)
        if not archive.is_file():  # pip normalises names; take what it saved
            found = sorted(sdists.glob(f"*{version}.tar.gz"))
            if not found:
                raise RuntimeError(f"pip saved no sdist of llama-cpp-python {version} in {sdists}")
            archive = found[0]
    source = sources / name / "vendor" / "llama.cpp"
    if not (source / "CMakeLists.txt").is_file():
        shutil.rmtree(sources, ignore_errors=True)
        sources.mkdir(parents=True)
        print(f"unpacking {archive}", file=out, flush=True)
        with tarfile.open(archive) as tar:
            if hasattr(tarfile, "data_filter"):  # Python 3.10.12+, 3.11.4+: no links out, no devices
                tar.extractall(sources, filter="data")
            else:
                tar.extractall(sources)  # older Pythons: the sdist pip just fetched from PyPI
        if not (source / "CMakeLists.txt").is_file():
            raise RuntimeError(f"{archive} has no vendor/llama.cpp/CMakeLists.txt")
    # The sources sit inside our own git checkout: without a ceiling, llama.cpp's build-info
    # would stamp the binary with this repository's commit.
    env = {**os.environ, "GIT_CEILING_DIRECTORIES": str(sources)}
    _step("configure", configure_command(source, tree), out, env)
    _step("build", build_command(tree, jobs or os.cpu_count() or 2), out, env)
    built = tree / "bin" / TARGET
    if not built.is_file():
        raise RuntimeError(f"the build finished but left no {built}")
    target = binary_path(root)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(TARGET + ".tmp")
    shutil.copy2(built, tmp)
    os.replace(tmp, target)
    (root / "stamp.json").write_text(stamp_for(version), encoding="utf-8")
    return target


def _step(what: str, cmd: Sequence[str], out: IO[str], env: dict[str, str] | None = None) -> None:
    print(f"llama-server: {what}: {' '.join(cmd)}", file=out, flush=True)
    done = subprocess.run(list(cmd), stdout=out, stderr=subprocess.STDOUT, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"llama-server: {what} failed (exit {done.returncode}): {' '.join(cmd)}")


def free_port() -> int:
    """A port the OS has free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_command(binary: Path, model: str, port: int, threads: int, slots: int,
                   ctx_per_slot: int) -> list[str]:
    """``llama-server`` serving ``model`` with ``slots`` parallel slots on 127.0.0.1."""
    return [str(binary), "--model", model, "--host", "127.0.0.1", "--port", str(port),
            "--threads", str(threads), "--threads-batch", str(threads),
            "--parallel", str(slots), "--ctx-size", str(ctx_per_slot * slots),
            "--batch-size", "512", "--ubatch-size", "512",  # as our backend's context
            # slots decoded together; no host-RAM prompt cache (the rows prefill every
            # prompt afresh on every side); no web UI (it is not built in)
            "--cont-batching", "--cache-ram", "0", "--no-webui"]


class LlamaServer:
    """``llama-server`` as a child process on 127.0.0.1 on a free port; ``close()`` stops it."""

    def __init__(self, model: str, threads: int, slots: int = 16, ctx_per_slot: int = 512,
                 binary: Path | None = None, timeout: float = 180.0) -> None:
        found = binary or find_binary()
        if found is None:
            raise RuntimeError(why_unavailable() or NOT_BUILT)
        port = free_port()
        self.base = f"http://127.0.0.1:{port}"
        self.url = self.base + "/v1"
        self._log = tempfile.TemporaryFile()  # noqa: SIM115  (closed by close())
        self.proc = subprocess.Popen(
            server_command(found, model, port, threads, slots, ctx_per_slot),
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        import urllib.error
        import urllib.request

        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(self.base + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass  # not listening yet, or 503 while the model loads
            if self.proc.poll() is not None or time.monotonic() > deadline:
                log = self.log_tail()
                self.close()
                raise RuntimeError(f"llama-server did not start: {log}")
            time.sleep(0.2)

    def log_tail(self, chars: int = 2000) -> str:
        """The end of what the server wrote (for error messages)."""
        if self._log.closed:
            return ""
        self._log.seek(0)
        return self._log.read()[-chars:].decode("utf-8", "replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if not self._log.closed:
            self._log.close()

    def __enter__(self) -> LlamaServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def main(argv: list[str] | None = None) -> int:
    """``python -m core_inference.bench.llama_server [--root DIR] [--jobs N] [--check]``."""
    import argparse

    ap = argparse.ArgumentParser(description="Build llama-server from the llama-cpp-python sdist.")
    ap.add_argument("--root", type=Path, help=f"cache folder (default: {default_root()})")
    ap.add_argument("--version", help="llama-cpp-python version (default: the installed one)")
    ap.add_argument("--jobs", type=int, help="parallel compile jobs (default: every core)")
    ap.add_argument("--check", action="store_true", help="only say whether it is built (exit 0) or not (1)")
    args = ap.parse_args(argv)
    root = args.root or default_root()
    if args.check:
        why = why_unavailable(root)
        print(why or str(find_binary(root)))
        return 1 if why else 0
    try:
        path = build(root, args.version, args.jobs)
    except (RuntimeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
