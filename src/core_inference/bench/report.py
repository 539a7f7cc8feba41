"""Benchmark results on disk: the JSON file, a Markdown table and the PNG chart."""

from __future__ import annotations

import json
import math
import os
import textwrap
from pathlib import Path
from typing import Any

from .harness import fmt

CHART_EXTRA = "pip install 'core-inference[bench]'"


def write_json(results: dict[str, Any], path: Path) -> None:
    """Write ``results`` atomically (a reader never sees half a file); NaN/inf become null."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_finite(results), indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def markdown_table(results: dict[str, Any]) -> str:
    """One line per side: median, ratio to the row's reference, and the row's targets."""
    lines = [
        "| row | side | median | ratio | target |",
        "| --- | --- | ---: | ---: | --- |",
    ]
    for suite in results["suites"]:
        if suite.get("skipped"):
            lines.append(f"| {suite['name']} | skipped: {suite['skipped']} | | | |")
            continue
        for row in suite["rows"]:
            lines += _row_lines(row)
    return "\n".join(lines)


def _row_lines(row: dict[str, Any]) -> list[str]:
    if row["error"]:
        return [f"| {row['title']} | **failed**: {row['error']} | | | |"]
    if row.get("skipped"):  # not run on this machine (e.g. no GPU): the table says why
        return [f"| {row['title']} | not run: {row['skipped']} | | | |"]
    out = []
    for i, side in enumerate(row["sides"]):
        title = row["title"] if i == 0 else ""
        name = f"**{side['name']}**" if side["ours"] else side["name"]
        median = f"{fmt(side.get('median'))} {row['unit']}"
        ratio = "ref" if side["name"] == row["reference"] else _x(side.get("paired_ratio"))
        targets = [t for t in row["targets"] if t["side"] == side["name"]]
        out.append(f"| {title} | {name} | {median} | {ratio} | {_target_cell(targets, row['unit'])} |")
    return out


def _target_cell(targets: list[dict[str, Any]], unit: str) -> str:
    cells = []
    for t in targets:
        if t["met"] is None:
            cells.append(f"{t['op']} {t['bound']:g}: n/a")
            continue
        bound = f"{t['bound']:g}x" if t["against"] else f"{fmt(t['bound'])} {unit}"
        verdict = "met" if t["met"] else "**missed**"
        got = _x(t["value"]) if t["against"] else f"{fmt(t['value'])} {unit}"
        cells.append(f"{t['op']} {bound}: {verdict} ({got})")
    return "; ".join(cells)


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}x"


def draw_chart(results: dict[str, Any], path: Path) -> str | None:
    """Draw one panel per row (median per side, min-max whiskers). Returns why not, or None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return f"matplotlib is not installed, so no chart was drawn ({CHART_EXTRA})"
    done = [r for s in results["suites"] for r in s.get("rows", []) if not r["error"]]
    rows = [r for r in done if not r.get("skipped")]
    if not rows:
        return "no row finished, so there is nothing to chart"
    not_run = [f"not run: {r['title']}: {r['skipped']}"
               for s in results["suites"] for r in s.get("rows", []) if r.get("skipped")]
    cols = 2
    nrows = (len(rows) + cols - 1) // cols
    notes = [textwrap.fill(n, 150) for n in not_run]
    extra = 0.18 * sum(n.count("\n") + 1 for n in notes)  # inches for the not-run lines at the bottom
    fig, axes = plt.subplots(nrows, cols, figsize=(13, 2.3 * nrows + 1 + extra), squeeze=False)
    for ax, row in zip(axes.flat, rows, strict=False):
        _panel(ax, row, results["config"]["runs"])
    for ax in list(axes.flat)[len(rows):]:
        ax.axis("off")
    m = results["machine"]
    fig.suptitle(
        f"core-inference vs engines called directly - {m['cpu']}, {m['threads']} threads, "
        f"{results['date'][:10]} (bold: ours; medians of {results['config']['runs']} interleaved runs)",
        fontsize=10,
    )
    if notes:  # rows that could not run here (e.g. no GPU) are named under the panels
        fig.text(0.01, 0.005, "\n".join(notes), fontsize=7, va="bottom", ha="left")
        fig.tight_layout(rect=(0, extra / fig.get_figheight() + 0.005, 1, 1))
    else:
        fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None


def _panel(ax: Any, row: dict[str, Any], runs: int) -> None:
    sides = [s for s in row["sides"] if "median" in s]
    names = [s["name"] for s in sides]
    medians = [s["median"] for s in sides]
    low = [s["median"] - s["min"] for s in sides]
    high = [s["max"] - s["median"] for s in sides]
    colors = ["#1f77b4" if s["ours"] else "#999999" for s in sides]
    y = list(range(len(sides)))[::-1]
    ax.barh(y, medians, xerr=[low, high], color=colors, capsize=3)
    ax.set_yticks(y)
    ax.set_yticklabels(names, fontsize=7)
    for label, side in zip(ax.get_yticklabels(), sides, strict=False):
        if side["ours"]:
            label.set_fontweight("bold")
    better = "higher" if row["higher_is_better"] else "lower"
    own = row.get("runs", runs)  # the title's count is the config's; a row that ran another says so
    more = f", {own} runs" if own != runs else ""
    title = textwrap.fill(f"{row['title']} ({row['unit']}, {better} is better{more})", 62)
    ax.set_title(title, fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
    for yi, side in zip(y, sides, strict=False):
        ratio = side.get("paired_ratio")
        text = "ref" if side["name"] == row["reference"] else ("" if ratio is None else f"{ratio:.2f}x")
        ax.text(side["max"], yi, f"  {fmt(side['median'])}  {text}", va="center", fontsize=7)
    ax.set_xlim(0, max(s["max"] for s in sides) * 1.5 or 1)
