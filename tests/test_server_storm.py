"""A short version of ``stress/server_storm.py``: hostile traffic against a real ``serve`` subprocess.

80 malformed requests (one a 10 MB body), 6 clients reset mid-stream, a body sent a
byte a second (408 after a 2 s body timeout), 10 x ``--parallel`` concurrent streams,
``/health`` probed throughout. The server must stay up and healthy, leak no slot,
serve a request afterwards, count every rejection in ``/metrics``, and exit 0 on SIGTERM.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest

pytest.importorskip("starlette", reason="needs core-inference[server]")
pytest.importorskip("uvicorn", reason="needs core-inference[server]")
pytest.importorskip("httpx2")

from core_inference.server.process import ServerProcess

STRESS = Path(__file__).resolve().parents[1] / "stress"
PARALLEL = 2


def stress_module(name: str) -> ModuleType:
    """Import ``stress/<name>.py`` (not a package) so the suite runs the script's own code."""
    spec = importlib.util.spec_from_file_location(f"_stress_{name}", STRESS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_server_storm_short() -> None:
    storm = stress_module("server_storm")
    with ServerProcess(["--parallel", str(PARALLEL), "--queue", "4", "--body-timeout", "2",
                        "--threads", "1"]) as server:
        report = storm.run_server_storm(server.base, malformed=80, killed=6, slow=1, flood=10 * PARALLEL,
                                        body_timeout=2.0, concurrency=8, parallel=PARALLEL)
        status = server.stop()
    text = json.dumps(report, indent=1)
    assert report["problem_count"] == 0, text
    assert report["uncounted"] == {}, text
    assert report["server_errors"] == 0, text
    assert report["health"]["failed"] == 0 and report["health"]["probes"] > 0, text
    assert report["idle_after"] and report["probe_status"] == 200, text
    assert report["rejections_seen"].get("413") == 1 and report["rejections_seen"].get("408") == 1, text
    assert int(report["rejections_seen"].get("429", 0)) > 0, text  # 20 streams, 2 running + 4 waiting
    assert report["flood_served"].get("done", 0) >= PARALLEL, text
    assert report["disconnects_counted"] >= report["killed_mid_stream"] == 6, text  # all admitted
    assert report["ok"], text
    assert status == 0
