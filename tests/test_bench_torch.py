"""The torch suite's rows on a tiny random model: both sides compute the same thing, and the
cuda rows (run on an NVIDIA GPU) are listed as not run, with the reason, where there is none.
No speed asserts: one quick run per side."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch", reason="needs core-inference[torch]")
pytest.importorskip("transformers", reason="needs core-inference[torch]")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from backends.hf_tiny import make_tiny_model
from core_inference.backends.transformers import TorchBackend
from core_inference.bench import BenchConfig, Row, Side, Suite, register_suite, run_bench
from core_inference.bench.harness import _suites, measure_row
from core_inference.bench.report import markdown_table
from core_inference.bench.torch_suite import (
    _classify_row,
    _cuda_batch_row,
    _cuda_classify_row,
    _cuda_rows,
)

QUICK = BenchConfig.make(quick=True, threads=1)


@pytest.fixture(scope="module")
def tiny() -> Iterator[Any]:
    """A tiny random gemma3_text model on the CPU, one thread."""
    root = Path(tempfile.mkdtemp(prefix="ci-bench-torch-"))
    try:
        with TorchBackend().load_model(make_tiny_model(root / "gemma", "gemma3_text"), threads=1) as model:
            yield model
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _ran(result: dict[str, Any]) -> None:
    assert result["error"] is None and result["skipped"] is None, result
    for side in result["sides"]:
        assert len(side["values"]) == 1 and side["median"] > 0


def test_classify_sides_pick_the_same_tokens(tiny: Any) -> None:
    result = measure_row(_classify_row(tiny, QUICK), QUICK)
    _ran(result)
    n = QUICK.classify_sentences
    assert result["info"]["same_greedy_token"] == f"{n}/{n}"  # ours and transformers called directly


def test_cuda_rows_code_runs_on_the_cpu(tiny: Any) -> None:
    """The cuda rows' sides, forced onto a CPU model: the code a GPU machine runs works, and ours
    and transformers' generate_batch generate as many tokens for the same prompts."""
    classify = measure_row(_cuda_classify_row(tiny, QUICK), QUICK)
    _ran(classify)
    n = QUICK.classify_sentences
    assert classify["info"]["same_greedy_token"] == f"{n}/{n}"
    assert [t["bound"] for t in classify["targets"]] == [5000.0, 0.97]
    batch = measure_row(_cuda_batch_row(tiny, QUICK), QUICK)
    _ran(batch)
    assert batch["reference"] == "model.generate_batch (continuous batching)"
    assert batch["info"]["batch_generate_tokens"] == batch["info"]["generate_batch_tokens"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is here: the cuda rows run")
def test_without_cuda_the_rows_say_why_and_run_nothing(tiny: Any) -> None:
    rows = _cuda_rows(tiny, QUICK)
    assert [r.key for r in rows] == ["cuda_classify", "cuda_batch_generate"]
    for row in rows:
        assert row.skipped is not None and row.skipped.startswith("no CUDA device here")
        result = measure_row(row, QUICK)  # its sides would raise if they ran
        assert result["error"] is None and result["skipped"] == row.skipped
        assert all(side["values"] == [] for side in result["sides"])
        assert all(t["met"] is None for t in result["targets"])


def test_a_skipped_row_in_the_results_table_and_chart(tmp_path: Path) -> None:
    """The runner writes a not-run row with its reason; the table and the chart say so."""

    def rows(cfg: BenchConfig) -> Iterator[Row]:
        yield Row(key="ran", title="ran row", unit="ops/s", reference="engine",
                  sides=[Side("ours", lambda: 2.0, True), Side("engine", lambda: 1.0, False)])
        yield _cuda_classify_row(None, cfg, "no CUDA device here (test)")

    register_suite(Suite(name="skip-toy", engine="toy", rows=rows))
    try:
        res = run_bench(None, str(tmp_path), quick=True, suites=["skip-toy"], machine="s", echo=None)
    finally:
        _suites.pop("skip-toy", None)
    data = json.loads((tmp_path / "s.json").read_text())
    ran, skipped = data["suites"][0]["rows"]
    assert ran["skipped"] is None and ran["sides"][0]["median"] == 2.0
    assert skipped["key"] == "cuda_classify" and skipped["skipped"] == "no CUDA device here (test)"
    assert skipped["error"] is None and "error" not in data["suites"][0]
    line = "| cuda: classify, 6 sentences | not run: no CUDA device here (test) | | | |"
    assert line in markdown_table(res)
    if importlib.util.find_spec("matplotlib") is not None:
        assert data["files"]["chart"] and (tmp_path / "s.png").stat().st_size > 0
