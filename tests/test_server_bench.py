"""The load benchmark (``bench/server_suite.py``) runs end to end at tiny sizes: 2 clients, 5 s.

It proves the harness, both servers and the Python API side work; it times nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core_inference.bench.harness import _suites, register_suite
from core_inference.bench.runner import run_bench
from core_inference.bench.server_suite import SUITE, _why_unavailable

why = _why_unavailable()
pytestmark = pytest.mark.skipif(why is not None, reason=why or "")


def test_server_load_bench_quick(tmp_path: Path) -> None:
    register_suite(SUITE)
    try:
        run_bench(None, str(tmp_path), quick=True, threads=1, suites=["server"], machine="quick", echo=None)
    finally:
        _suites.pop("server", None)
    data = json.loads((tmp_path / "quick.json").read_text())
    (suite,) = data["suites"]
    assert "error" not in suite, suite.get("error")
    (row,) = suite["rows"]
    assert row["error"] is None, row["error"]
    assert {s["name"] for s in row["sides"]} == {"serve --parallel 16", "llama_cpp.server", "python API"}
    for side in row["sides"]:
        assert side["median"] > 0, side
    for name, runs in row["info"]["runs"].items():
        (run,) = runs
        assert run["errors"] == 0, (name, run)
        assert run["requests"] > 0 and run["ttft_p50_s"] is not None, (name, run)
