"""Process memory readings for metrics (Linux /proc; 0 where unknown)."""

from __future__ import annotations

import os
import sys


def process_memory() -> tuple[int, int]:
    """(resident bytes now, peak resident bytes) of this process; zeros where unknown."""
    if sys.platform.startswith("linux"):
        try:
            with open("/proc/self/status", encoding="ascii", errors="replace") as fh:
                fields = dict(line.split(":", 1) for line in fh if ":" in line)
            rss = int(fields.get("VmRSS", "0 kB").split()[0]) * 1024
            peak = int(fields.get("VmHWM", "0 kB").split()[0]) * 1024
            return rss, peak
        except (OSError, ValueError):
            return 0, 0
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return 0, peak if sys.platform == "darwin" else peak * 1024
    except (ImportError, OSError):
        return 0, 0


def cpu_count() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1
