"""``core-inference serve`` as a child process, for tests, stress runs and benchmarks (stdlib only).

>>> with ServerProcess(["--parallel", "2"]) as server:      # doctest: +SKIP
...     print(server.url)                                    # http://127.0.0.1:PORT/v1
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

READY = re.compile(r"listening on (http://\S+/v1)")


class ServerProcess:
    """Start ``python -m core_inference serve --port 0 ARGS`` and wait until it listens.

    stderr goes to a temporary file (never a pipe nobody reads); ``log()`` returns it.
    ``stop()`` sends SIGTERM and waits; leaving the ``with`` block stops it and kills it
    if it does not stop in time.
    """

    def __init__(self, args: Sequence[str] = (), timeout: float = 120.0, env: dict[str, str] | None = None,
                 host: str = "127.0.0.1") -> None:
        # stderr to a file (a pipe nobody reads would fill up and block the server)
        self._log = tempfile.NamedTemporaryFile(  # noqa: SIM115  (closed by kill())
            prefix="core-inference-serve-", suffix=".log", delete=False)
        cmd = [sys.executable, "-m", "core_inference", "serve", "--host", host, "--port", "0", *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self._log,
                                     env={**os.environ, **(env or {})})
        self.url = ""
        deadline = time.monotonic() + timeout
        try:
            while not self.url:
                match = READY.search(self.log())
                if match:
                    self.url = match.group(1)
                elif self.proc.poll() is not None:
                    raise RuntimeError(f"serve exited with {self.proc.returncode}: {self.log().strip()}")
                elif time.monotonic() > deadline:
                    raise TimeoutError(f"serve did not listen within {timeout:g} s: {self.log().strip()}")
                else:
                    time.sleep(0.05)
        except BaseException:
            self.kill()
            raise

    @property
    def base(self) -> str:
        """The URL without ``/v1`` (for ``/health`` and ``/metrics``)."""
        return self.url[: -len("/v1")]

    def log(self) -> str:
        """What the server wrote on stderr so far."""
        with open(self._log.name, encoding="utf-8", errors="replace") as fh:
            return fh.read()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        """Send ``sig`` and wait for the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        """Kill it (if it runs) and remove the log file."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()
        if os.path.exists(self._log.name):
            os.unlink(self._log.name)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.stop(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        finally:
            self.kill()
