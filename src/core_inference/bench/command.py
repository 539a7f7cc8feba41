"""The ``bench`` subcommand for the click command line: ``cli.add_command(click_command())``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .runner import DEFAULT_OUT_DIR, run_bench

if TYPE_CHECKING:
    import click

HELP = """Time core-inference against each engine called directly.

Every row runs our backend and the engine's own API in the same process, with the same
thread count, interleaved (A B, B A, ...), and reports medians of the runs after a
warm-up. Results go to OUT/<machine>.json and, with matplotlib installed, OUT/<machine>.png.
"""


def click_command() -> click.Command:
    """``core-inference bench [--model PATH] [--out DIR] [--quick] [--runs N] [--threads N] ...``."""
    import click

    @click.command("bench", help=HELP)
    @click.option("-m", "--model", metavar="PATH", help="GGUF model (default: the embedded model).")
    @click.option("--out", default=DEFAULT_OUT_DIR, show_default=True, metavar="DIR", help="Results folder.")
    @click.option("--quick", is_flag=True, help="One tiny run of every row: proves it runs, times nothing.")
    @click.option("--runs", type=click.IntRange(1), metavar="N", help="Timed runs per side (default 5).")
    @click.option("--threads", type=click.IntRange(1), metavar="N", help="Threads (default: all cores).")
    @click.option("--suite", "suites", multiple=True, metavar="NAME", help="Only this suite (repeatable).")
    @click.option("--row", "rows", multiple=True, metavar="KEY", help="Only this row (repeatable).")
    @click.option("--machine", metavar="SLUG", help="Results file name (default: <cpu>-<cores>c).")
    def bench(**kw: Any) -> None:
        results = run_bench(
            kw["model"], kw["out"], kw["quick"], runs=kw["runs"], threads=kw["threads"],
            suites=list(kw["suites"]) or None, rows=list(kw["rows"]) or None, machine=kw["machine"],
        )
        failed = any(r["error"] for s in results["suites"] for r in s["rows"])
        if failed or any(s.get("error") for s in results["suites"]):
            raise SystemExit(1)  # the table above says which row failed and why

    return bench
