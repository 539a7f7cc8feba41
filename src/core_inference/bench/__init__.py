"""Benchmarks: core-inference side by side with each engine called directly, in the same run.

``core-inference bench`` (or ``python -m core_inference.bench``) runs every registered
suite; with ``--out DIR`` it writes ``DIR/<machine>.json`` and ``.png`` (``make bench``
passes ``--out bench/results``). An engine adds its rows by
registering a ``Suite`` (``register_suite``, or the entry-point group
``core_inference.bench_suites``). Not imported by ``import core_inference``.
"""

from __future__ import annotations

from .command import click_command
from .harness import (
    BenchConfig,
    BenchError,
    Row,
    Side,
    Suite,
    Target,
    get_suite,
    interleaved_order,
    measure_row,
    register_suite,
    suite_names,
)
from .runner import DEFAULT_OUT_DIR, run_bench

__all__ = [
    "DEFAULT_OUT_DIR", "BenchConfig", "BenchError", "Row", "Side", "Suite", "Target", "click_command",
    "get_suite", "interleaved_order", "measure_row", "register_suite", "run_bench", "suite_names",
]
