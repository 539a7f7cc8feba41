"""The benchmark harness: interleaving, medians, ratios, targets, result files. No speed asserts."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from core_inference.bench import (
    BenchConfig,
    Row,
    Side,
    Suite,
    Target,
    get_suite,
    interleaved_order,
    measure_row,
    register_suite,
    run_bench,
    suite_names,
)
from core_inference.bench.harness import _suites
from core_inference.bench.machine import machine_slug, slugify
from core_inference.bench.report import markdown_table


def _scripted(name: str, values: list[float], calls: list[str], ours: bool = False) -> Side:
    feed = iter(values)

    def run() -> float:
        calls.append(name)
        return next(feed)

    return Side(name, run, ours)


def test_interleaved_order_alternates_direction() -> None:
    assert [interleaved_order(3, r) for r in range(3)] == [[0, 1, 2], [2, 1, 0], [0, 1, 2]]


def test_measure_row_interleaves_and_summarises() -> None:
    calls: list[str] = []
    row = Row(
        key="k", title="t", unit="tokens/s",
        sides=[_scripted("A", [0, 10, 20, 30], calls, ours=True), _scripted("B", [0, 10, 10, 10], calls)],
        reference="B",
        targets=[Target("A", ">=", 1.5, "B"), Target("A", "<=", 5.0)],
    )
    result = measure_row(row, BenchConfig(runs=3, warmup=1))
    assert calls == ["A", "B", "A", "B", "B", "A", "A", "B"]  # warm-up, then ABBA
    a, b = result["sides"]
    assert a["values"] == [10, 20, 30] and a["median"] == 20 and (a["min"], a["max"]) == (10, 30)
    assert a["ratio"] == 2.0 and a["paired_ratio"] == 2.0 and b["ratio"] == 1.0
    ratio_target, value_target = result["targets"]
    assert ratio_target["value"] == 2.0 and ratio_target["met"] is True
    assert value_target["value"] == 20 and value_target["met"] is False
    assert result["error"] is None


def test_a_row_that_runs_another_count_says_so_in_its_chart_title() -> None:
    from typing import Any

    from core_inference.bench.report import _panel

    row = Row(key="k", title="slow row", unit="s", sides=[Side("A", lambda: 1.0, True)],
              reference="A", runs=2)
    result = measure_row(row, BenchConfig(runs=5, warmup=0))
    assert result["runs"] == 2 and len(result["sides"][0]["values"]) == 2

    class Axes:
        title = ""

        def __getattr__(self, name: str) -> Any:
            return lambda *a, **k: []

        def set_title(self, text: str, **_: Any) -> None:
            self.title = text

    ax = Axes()
    _panel(ax, result, 5)
    assert "2 runs" in ax.title
    _panel(ax, {**result, "runs": 5}, 5)
    assert "runs" not in ax.title


def test_a_failing_side_is_reported_not_raised() -> None:
    def boom() -> float:
        raise RuntimeError("engine fell over")

    row = Row(key="k", title="t", unit="s", sides=[Side("A", boom, True), Side("B", lambda: 1.0, False)],
              reference="B", targets=[Target("A", "<=", 1.0)])
    result = measure_row(row, BenchConfig(runs=2, warmup=0))
    assert "engine fell over" in result["error"]
    assert result["targets"][0]["met"] is None


def test_quick_config_is_small() -> None:
    cfg = BenchConfig.make(quick=True, threads=3)
    assert cfg.quick and cfg.runs == 1 and cfg.threads == 3 and cfg.decode_tokens < 128
    assert BenchConfig.make(runs=None).runs == 5


def test_slug() -> None:
    assert slugify("Intel(R) Xeon(R) CPU E5-2680 v4 @ 2.40GHz") == "intel-xeon-e5-2680-v4"
    assert machine_slug(4).endswith("-4c")


@pytest.fixture
def toy_suite() -> Iterator[str]:
    closed: list[bool] = []

    def rows(cfg: BenchConfig) -> Iterator[Row]:
        try:
            yield Row(key="toy", title="toy row", unit="ops/s",
                      sides=[Side("ours", lambda: 2.0, True), Side("engine", lambda: 1.0, False)],
                      reference="engine", targets=[Target("ours", ">=", 1.5, "engine")])
        finally:
            closed.append(True)

    register_suite(Suite(name="toy", engine="toy engine", rows=rows, versions=lambda: {"toy": "1.0"}))
    register_suite(Suite(name="toy-missing", engine="x", rows=rows, why_unavailable=lambda: "not here"))
    yield "toy"
    assert closed, "the suite's generator was not closed"
    _suites.pop("toy", None)
    _suites.pop("toy-missing", None)


def test_run_bench_writes_json_and_table(toy_suite: str, tmp_path: Path) -> None:
    assert "toy" in suite_names() and get_suite("toy").engine == "toy engine"
    lines: list[str] = []
    res = run_bench(None, str(tmp_path), quick=True, suites=["toy", "toy-missing"], machine="m",
                    echo=lines.append)
    data = json.loads((tmp_path / "m.json").read_text())
    assert data == json.loads(json.dumps(res))
    assert data["versions"]["toy"] == "1.0" and data["machine"]["threads"] >= 1
    toy, missing = data["suites"]
    assert toy["rows"][0]["targets"][0]["met"] is True
    assert missing["skipped"] == "not here"
    table = markdown_table(data)
    assert "| toy row | **ours** | 2 ops/s | 2.000x | >= 1.5x: met (2.000x) |" in table
    assert any("results:" in line for line in lines)
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "m.png").stat().st_size > 0 and data["files"]["chart"]
    else:
        assert "matplotlib" in data["chart_note"] and data["files"]["chart"] is None


def test_one_suites_own_command_line(toy_suite: str, tmp_path: Path) -> None:
    """``python -m core_inference.bench.<suite>``: the options a suite asks for, one results file."""
    from core_inference.bench.runner import suite_main

    suite = get_suite(toy_suite)
    argv = ["--quick", "--runs", "2", "--out", str(tmp_path), "--machine", "own"]
    assert suite_main(suite, argv, "the toy suite") == 0
    data = json.loads((tmp_path / "own.json").read_text())
    assert [s["name"] for s in data["suites"]] == ["toy"] and data["config"]["quick"] is True
    with pytest.raises(SystemExit):  # a suite without --quick or --runs refuses them
        suite_main(suite, ["--quick"], "the toy suite", quick_help=None, runs=False)


def test_unknown_suite_is_a_key_error() -> None:
    with pytest.raises(KeyError, match="no benchmark suite"):
        get_suite("no-such-suite")


def _default_model_or_skip() -> str:
    pytest.importorskip("llama_cpp")
    from core_inference.default_model import default_model_path

    try:
        return str(default_model_path(progress=False))
    except Exception as exc:  # the default-model extra is not installed
        pytest.skip(f"default model unavailable: {exc}")


@pytest.mark.slow
def test_quick_bench_runs_every_row_end_to_end(tmp_path: Path) -> None:
    """Every built-in row, tiny sizes, one run: proves the harness and suites work, times nothing."""
    model = _default_model_or_skip()
    # The in-process suites; the server and Ray suites start servers and clusters and are
    # run on their own (tests/test_server_bench.py; python -m core_inference.bench.distributed_suite).
    suites = ["core", "llama_cpp", "llama_cpp_batching", "torch", "mlx"]
    res = run_bench(model, str(tmp_path), quick=True, machine="quick", echo=None, suites=suites)
    data = json.loads((tmp_path / "quick.json").read_text())
    assert data["config"]["quick"] is True and data["machine"]["threads"] == res["machine"]["threads"]
    assert "llama-cpp-python" in data["versions"] and data["machine"]["cpu"]
    keys = {suite["name"]: {row["key"] for row in suite["rows"]} for suite in data["suites"]}
    assert keys == {
        "core": {"contract_generate", "import_time"},
        "llama_cpp": {"decode", "decode_overhead", "ttft", "batch_generate", "classify", "load"},
        "llama_cpp_batching": {"concurrent_4", "concurrent_16", "inter_token_16", "deadline_long_prompts",
                               "stall_beside_long_prompts", "chat_turns", "interleaved_chats_4",
                               "classify_shared_prefix"},
        # on the converted default; the cuda rows run on an NVIDIA GPU, else are listed as not run
        "torch": {"decode", "batch_generate", "classify", "concurrent",
                  "cuda_classify", "cuda_batch_generate"},
        "mlx": {"decode", "batch_generate", "classify"},
    }
    for suite in data["suites"]:
        assert "error" not in suite, suite.get("error")
        for row in suite["rows"]:
            assert row["error"] is None, (row["key"], row["error"])
            if row.get("skipped"):  # the cuda rows without a GPU: nothing ran, and the reason is given
                assert row["key"].startswith("cuda_") and all(not s["values"] for s in row["sides"])
                continue
            for side in row["sides"]:
                assert len(side["values"]) == 1 and side["median"] > 0


def test_quick_lists_the_convert_row_as_not_run(tmp_path: Path) -> None:
    """A conversion takes most of a minute: ``--quick`` names the row and why, and converts nothing."""
    pytest.importorskip("gguf")
    pytest.importorskip("transformers")
    model = _default_model_or_skip()
    run_bench(model, str(tmp_path), quick=True, machine="q", echo=None, suites=["convert"])
    (suite,) = json.loads((tmp_path / "q.json").read_text())["suites"]
    (row,) = suite["rows"]
    assert row["key"] == "convert" and "minute" in row["skipped"] and row["error"] is None


def test_click_command_runs_a_suite(toy_suite: str, tmp_path: Path) -> None:
    click = pytest.importorskip("click")
    from core_inference.bench import click_command

    cmd = click_command()
    assert isinstance(cmd, click.Command) and cmd.name == "bench"
    status = cmd.main(["--quick", "--suite", "toy", "--out", str(tmp_path), "--machine", "c"],
                      standalone_mode=False)
    assert status is None and json.loads((tmp_path / "c.json").read_text())["suites"][0]["name"] == "toy"
    cmd.main(["--quick", "--suite", "toy", "--row", "other", "--out", str(tmp_path), "--machine", "d"],
             standalone_mode=False)
    assert json.loads((tmp_path / "d.json").read_text())["suites"][0]["rows"] == []


def test_click_command_without_out_prints_and_writes_nothing(
    toy_suite: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("click")
    from core_inference.bench import click_command
    from core_inference.bench.command import NOT_SAVED

    monkeypatch.chdir(tmp_path)
    status = click_command().main(["--quick", "--suite", "toy", "--machine", "c"], standalone_mode=False)
    assert status is None
    assert list(tmp_path.iterdir()) == []  # no bench/results/ invented under the current folder
    err = capsys.readouterr().err
    assert "| toy row | **ours** | 2 ops/s |" in err  # the results, printed
    assert NOT_SAVED in err
    assert "results: " not in err and "chart: " not in err  # no path to a file that is not kept
