"""``python -m core_inference.bench``: the benchmark without the click command line."""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence

from .runner import run_bench


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m core_inference.bench",
        description="Time core-inference against each engine called directly (interleaved runs, medians).",
    )
    parser.add_argument("--model", metavar="PATH", help="GGUF model (default: the embedded default model)")
    parser.add_argument("--out", metavar="DIR", help="write the results file and chart here (default: none)")
    parser.add_argument("--quick", action="store_true", help="one tiny run per row (times mean nothing)")
    parser.add_argument("--runs", type=int, metavar="N", help="timed runs per side (default 5)")
    parser.add_argument("--threads", type=int, metavar="N", help="threads, all sides (default: all cores)")
    parser.add_argument("--suite", action="append", metavar="NAME", help="run only this suite (repeatable)")
    parser.add_argument("--row", action="append", metavar="KEY", help="measure only this row (repeatable)")
    parser.add_argument("--machine", metavar="SLUG", help="results file name (default: <cpu>-<cores>c)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="core-inference-bench-") as scratch:
        # Only --out writes where someone will look; without it the results are printed only.
        results = run_bench(
            args.model, args.out or scratch, args.quick, runs=args.runs, threads=args.threads,
            suites=args.suite, rows=args.row, machine=args.machine,
        )
    failed = [r for s in results["suites"] for r in s["rows"] if r["error"]]
    return 1 if failed or any(s.get("error") for s in results["suites"]) else 0


if __name__ == "__main__":
    sys.exit(main())
