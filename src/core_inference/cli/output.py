"""The ``backends`` command and the output helpers: tables, aligned pairs, human sizes."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TextIO

from .. import registry


def run_backends() -> None:
    """The backends table, then which backend a load would use.

    A ``$CORE_INFERENCE_BACKEND`` naming no registered backend is an error (after the table,
    so the known names are in sight), as it is for every load.
    """
    rows = registry.backend_status()
    print_table(("BACKEND", "STATUS", "DETAIL"), rows)
    sys.stdout.flush()
    print(default_backend_line(rows))


def default_backend_line(rows: Sequence[tuple[str, str, str]]) -> str:
    """Which backend a load without --backend would use (``rows``: ``registry.backend_status()``)."""
    forced = registry.env_backend()  # BackendNotRegistered when it names no backend
    if forced:
        status = {name: (state, detail) for name, state, detail in rows}.get(forced, ("", ""))
        if status[0] != "available":
            return f"default: {forced} (from ${registry.ENV_BACKEND}), but it is {status[0]}: {status[1]}"
        return f"default: {forced} (from ${registry.ENV_BACKEND})"
    first = next((name for name, state, _ in rows if state == "available"), None)
    if first is None:
        return "default: none available"
    return f"default: {first} (first available in preference order)"


def print_table(headers: Sequence[str], rows: Sequence[Sequence[str]], out: TextIO | None = None) -> None:
    """Columns padded to their widest cell; the last column is left ragged."""
    stream = out or sys.stdout
    table = [list(headers), *[list(r) for r in rows]]
    widths = [max(len(row[i]) for row in table) for i in range(len(headers) - 1)]
    for row in table:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)] + [row[-1]]
        print("  ".join(cells).rstrip(), file=stream)


def print_pairs(rows: Sequence[tuple[str, str]], out: TextIO | None = None) -> None:
    """``key: value`` lines with the values aligned."""
    width = max((len(k) for k, _ in rows), default=0) + 2
    for key, value in rows:
        print(f"{key + ':':<{width}}{value}", file=out or sys.stdout)


def nonzero(n: int) -> str:
    return str(n) if n else ""


def human_count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def short(value: object, limit: int = 100) -> str:
    text = repr(value) if not isinstance(value, str) else value.replace("\n", "\\n")
    return text if len(text) <= limit else text[: limit - 3] + "..."
