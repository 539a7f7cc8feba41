"""The ``bench`` subcommand for the click command line: ``cli.add_command(click_command())``."""

from __future__ import annotations

import sys
import tempfile
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any

from .runner import run_bench

if TYPE_CHECKING:
    import click

HELP = """Time core-inference against each engine called directly.

Every row runs our backend and the engine's own API in the same process, with the same
thread count, interleaved (A B, B A, ...), and reports medians of the runs after a
warm-up. The table is printed on stderr. Only with --out DIR are the results written:
DIR/<machine>.json and, with matplotlib installed, DIR/<machine>.png (the repository's
`make bench` passes --out bench/results).
"""

NOT_SAVED = "results not saved: pass --out DIR to write DIR/<machine>.json and the chart"


def _echo(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _echo_unsaved(line: str) -> None:
    """Progress and the table, but not the paths of files that are about to be thrown away."""
    if not line.startswith(("results: ", "chart: ")):
        _echo(line)


def click_command() -> click.Command:
    """``core-inference bench [--model PATH] [--out DIR] [--quick] [--runs N] [--threads N] ...``."""
    import click

    @click.command("bench", help=HELP)
    @click.option("-m", "--model", metavar="PATH", help="GGUF model (default: the embedded model).")
    @click.option("--out", metavar="DIR", help="Write the results file and chart into DIR (default: none).")
    @click.option("--quick", is_flag=True, help="One tiny run of every row: proves it runs, times nothing.")
    @click.option("--runs", type=click.IntRange(1), metavar="N", help="Timed runs per side (default 5).")
    @click.option("--threads", type=click.IntRange(1), metavar="N", help="Threads (default: all cores).")
    @click.option("--suite", "suites", multiple=True, metavar="NAME", help="Only this suite (repeatable).")
    @click.option("--row", "rows", multiple=True, metavar="KEY", help="Only this row (repeatable).")
    @click.option("--machine", metavar="SLUG", help="Results file name (default: <cpu>-<cores>c).")
    def bench(**kw: Any) -> None:
        for flag in ("model", "out", "machine"):
            if kw[flag] is not None and not kw[flag].strip():
                raise click.BadParameter("must not be empty", param_hint=f"--{flag}")
        with ExitStack() as stack:
            out, echo = kw["out"], _echo
            if out is None:  # run_bench always writes: let it write where nobody will look
                out = stack.enter_context(tempfile.TemporaryDirectory(prefix="core-inference-bench-"))
                echo = _echo_unsaved
            results = run_bench(
                kw["model"], out, kw["quick"], runs=kw["runs"], threads=kw["threads"],
                suites=list(kw["suites"]) or None, rows=list(kw["rows"]) or None, machine=kw["machine"],
                echo=echo,
            )
        if kw["out"] is None:
            _echo(NOT_SAVED)
        failed = any(r["error"] for s in results["suites"] for r in s["rows"])
        if failed or any(s.get("error") for s in results["suites"]):
            raise SystemExit(1)  # the table above says which row failed and why

    return bench
