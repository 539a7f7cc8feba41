"""``run_bench``: every available suite, measured, written to ``<out_dir>/<machine>.json`` and ``.png``."""

from __future__ import annotations

import datetime as _dt
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .. import __version__
from ..memory import cpu_count
from .harness import BenchConfig, Echo, Suite, get_suite, measure_row, suite_names
from .machine import machine_info, machine_slug
from .report import draw_chart, markdown_table, write_json

DEFAULT_OUT_DIR = "bench/results"
SCHEMA = 1


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def run_bench(
    model: str | None,
    out_dir: str,
    quick: bool = False,
    *,
    runs: int | None = None,
    threads: int | None = None,
    suites: Sequence[str] | None = None,
    rows: Sequence[str] | None = None,
    machine: str | None = None,
    echo: Echo | None = _stderr,
) -> dict[str, Any]:
    """Run the benchmark suites and write ``<out_dir>/<machine>.json`` and, with matplotlib, ``.png``.

    ``model``: a GGUF path for the engine suites (None: the embedded default model).
    ``quick``: one run of tiny sizes, to prove everything runs (the numbers mean nothing).
    ``threads``: engine threads on every side (default: every core). ``suites``: names to
    run (default: all registered). ``rows``: row keys to measure (default: all; e.g.
    ``["decode", "ttft"]``). ``machine``: the file name slug (default: cpu and cores).
    Progress goes to ``echo`` (stderr by default). Returns the results as written.
    """
    n_threads = threads or cpu_count()
    cfg = BenchConfig.make(quick, model=model, threads=n_threads, runs=runs)
    slug = machine or machine_slug()
    started = _dt.datetime.now(_dt.timezone.utc)
    results: dict[str, Any] = {
        "schema": SCHEMA,
        "machine": {"slug": slug, **machine_info(n_threads)},
        "date": started.isoformat(timespec="seconds"),
        "versions": {"core-inference": __version__},
        "config": {
            "runs": cfg.runs, "warmup": cfg.warmup, "quick": cfg.quick, "threads": n_threads,
            "rows": list(rows) if rows else "all",
            "order": "interleaved ABBA: sides forward on even rounds, reversed on odd",
            "ratio": "paired: median over rounds of side/reference within the same round",
        },
        "suites": [],
    }
    busy = _busy(results["machine"].get("load_average"), cpu_count())
    if busy:
        results["warning"] = busy
        if echo is not None:
            echo(f"warning: {busy}")
    for name in suites or suite_names():
        results["suites"].append(_run_suite(get_suite(name), cfg, results["versions"], echo, rows))
    results["machine"]["load_average_end"] = machine_info(n_threads)["load_average"]
    results["seconds"] = round((_dt.datetime.now(_dt.timezone.utc) - started).total_seconds(), 1)
    out = Path(out_dir)
    json_path, png_path = out / f"{slug}.json", out / f"{slug}.png"
    why_no_chart = draw_chart(results, png_path)
    results["files"] = {"json": str(json_path), "chart": None if why_no_chart else str(png_path)}
    if why_no_chart:
        results["chart_note"] = why_no_chart
    write_json(results, json_path)
    if echo is not None:
        echo(markdown_table(results))
        echo(f"results: {json_path}")
        echo(f"chart: {png_path}" if not why_no_chart else f"chart: none: {why_no_chart}")
    return results


def _busy(load: list[float] | None, cores: int) -> str | None:
    """A note when other work already keeps the cores busy: every number will be noisy."""
    if load and load[0] > 0.5 * cores:
        return (f"the machine was busy at the start (load average {load[0]:.2f} on {cores} cores): "
                "expect noisy numbers; the interleaved runs share the noise between the sides")
    return None


def _run_suite(
    suite: Suite, cfg: BenchConfig, versions: dict[str, str], echo: Echo | None,
    only: Sequence[str] | None = None,
) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": suite.name, "engine": suite.engine, "rows": []}
    why = suite.why_unavailable()
    if why:
        entry["skipped"] = why
        if echo is not None:
            echo(f"{suite.name}: skipped: {why}")
        return entry
    versions.update(suite.versions())
    if echo is not None:
        echo(f"{suite.name}: {suite.engine}, {cfg.threads} threads, "
             f"{cfg.runs} runs after {cfg.warmup} warm-up")
    made = suite.rows(cfg)
    try:
        for row in made:
            if not only or row.key in only:
                entry["rows"].append(measure_row(row, cfg, echo))
    except Exception as exc:  # setting a row up failed: report it, keep the rows measured so far
        entry["error"] = f"{type(exc).__name__}: {exc}"
        if echo is not None:
            echo(f"{suite.name}: FAILED: {entry['error']}")
    finally:
        close = getattr(made, "close", None)
        if close is not None:
            close()
    return entry


def suite_main(
    suite: Suite, argv: Sequence[str] | None, description: str, *,
    model_help: str = "GGUF model (default: the embedded Gemma 3 270M)",
    quick_help: str | None = "tiny sizes, one run: proves it runs, times nothing",
    threads: bool = True, runs: bool = True,
) -> int:
    """``python -m core_inference.bench.<suite>``: one suite's command line (the suites that
    start servers or clusters, or run in an environment of their own, are run this way)."""
    import argparse
    import tempfile

    from .harness import register_suite

    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--model", help=model_help)
    if threads:
        ap.add_argument("--threads", type=int, help="engine threads on every side (default: all cores)")
    if runs:
        ap.add_argument("--runs", type=int, help="timed runs per side (default: 5)")
    if quick_help is not None:
        ap.add_argument("--quick", action="store_true", help=quick_help)
    ap.add_argument("--out", help="write <machine>.json and the chart here (default: not saved)")
    ap.add_argument("--machine", help="results file name (default: <cpu>-<cores>c)")
    args = ap.parse_args(argv)
    register_suite(suite)
    with tempfile.TemporaryDirectory(prefix="core-inference-bench-") as scratch:
        results = run_bench(args.model, args.out or scratch, bool(getattr(args, "quick", False)),
                            runs=getattr(args, "runs", None), threads=getattr(args, "threads", None),
                            suites=[suite.name], machine=args.machine)
    failed = any(r["error"] for s in results["suites"] for r in s["rows"]) or any(
        s.get("error") for s in results["suites"])
    return 1 if failed else 0
