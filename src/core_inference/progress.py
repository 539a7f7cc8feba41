"""Progress on stderr for long work: the default model's assembly, a conversion, a cluster's batch.

On a terminal a bar is one line redrawn in place. Anywhere else (a log file, CI) it writes
a plain line each ``every`` percent, so a log shows the work moving without a redraw per
block. A step with no count of its own (a tokenizer being built inside an engine) gets a
``Ticker``: the elapsed seconds, redrawn once a second on a terminal, and a start and an end
line elsewhere. Standard library only.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import IO

Progress = Callable[[int, int], None]
"""``report(done, total)``: what long work calls as it goes (a callable of the caller's own, or a ``Bar``)."""

Describe = Callable[[int, int, float], str]
"""``describe(done, total, seconds)``: the words after the bar, e.g. ``"40% 100/250 MB"``."""

WIDTH = 30


class Bar:
    """``label [#####-----] detail`` on a terminal; ``label: detail`` lines elsewhere."""

    def __init__(
        self, label: str, describe: Describe, stream: IO[str] | None = None, every: int = 25
    ) -> None:
        self.label = label
        self.describe = describe
        self.stream = stream if stream is not None else sys.stderr
        self.tty = _isatty(self.stream)
        self.every = max(1, every)
        self.began = time.monotonic()
        self.last = -1
        self.open_line = False

    def __call__(self, done: int, total: int) -> None:
        pct = min(100, 100 * done // total) if total > 0 else 100
        finished = done >= total
        if self.tty:
            if pct == self.last:
                return
            filled = pct * WIDTH // 100
            bar = "#" * filled + "-" * (WIDTH - filled)
            end = "\n" if finished else ""
            self.stream.write(f"\r{self.label} [{bar}] {self.describe(done, total, self._elapsed())}{end}")
            self.open_line = not finished
        else:
            if pct // self.every == self.last // self.every and not (finished and self.last != 100):
                self.last = pct
                return
            self.stream.write(f"{self.label}: {self.describe(done, total, self._elapsed())}\n")
        self.stream.flush()
        self.last = pct

    def close(self) -> None:
        """End a line left open by work that failed part-way, so an error starts on its own line."""
        if self.open_line:
            self.stream.write("\n")
            self.stream.flush()
            self.open_line = False

    def _elapsed(self) -> float:
        return time.monotonic() - self.began


def reporter(progress: bool | Progress, make: Callable[[], Bar]) -> Progress:
    """The caller's own callable, a fresh ``Bar`` for ``True``, nothing for ``False``."""
    if callable(progress):
        return progress
    return make() if progress else _silent


def close(report: Progress) -> None:
    """Close ``report`` if it is a ``Bar`` (a caller's own callable is left alone)."""
    if isinstance(report, Bar):
        report.close()


def megabytes(done: int, total: int, seconds: float) -> str:
    """``"40% 100/250 MB"``: for bytes."""
    pct = min(100, 100 * done // total) if total > 0 else 100
    return f"{pct}% {done / 1e6:.0f}/{total / 1e6:.0f} MB"


class Ticker:
    """A step of unknown length: ``label ... 12 s`` while it runs, ``label: done in 14 s`` after.

    Used as a context manager around one blocking call. On a terminal a daemon thread
    redraws the elapsed time once a second; elsewhere only the start and the end are written.
    """

    def __init__(
        self, label: str, stream: IO[str] | None = None, interval: float = 1.0, live: bool = True
    ) -> None:
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        # live=False: the step draws a bar of its own (an engine's), which a redraw would garble
        self.tty = live and _isatty(self.stream)
        self.interval = interval
        self.began = 0.0
        self.seconds = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def __enter__(self) -> Ticker:
        self.began = time.monotonic()
        if self.tty:
            self._draw("...")
            self._thread = threading.Thread(target=self._tick, name="core-inference-ticker", daemon=True)
            self._thread.start()
        else:
            self._write(f"{self.label} ...\n")
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.seconds = time.monotonic() - self.began
        outcome = f"done in {self.seconds:.0f} s" if kind is None else f"stopped after {self.seconds:.0f} s"
        if self.tty:
            self._draw(f"{outcome}\n")
        else:
            self._write(f"{self.label}: {outcome}\n")

    def _tick(self) -> None:
        while not self._stop.wait(self.interval):
            self._draw(f"... {time.monotonic() - self.began:.0f} s")

    def _draw(self, tail: str) -> None:
        self._write(f"\r{self.label} {tail}")

    def _write(self, text: str) -> None:
        with self._lock:
            self.stream.write(text)
            self.stream.flush()


def _silent(done: int, total: int) -> None:
    return None


def _isatty(stream: IO[str]) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # a closed or odd stream: plain lines
        return False
