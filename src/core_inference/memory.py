"""Process memory readings for metrics (Linux /proc; 0 where unknown)."""

from __future__ import annotations

import os
import sys


def process_memory() -> tuple[int, int]:
    """(resident bytes now, peak resident bytes) of this process; zeros where unknown."""
    if sys.platform.startswith("linux"):
        try:
            # Bytes, not text: at interpreter exit (a stream still open when its generator
            # is finalised) the codec registry may already be gone, and a text open()
            # would fail with "LookupError: unknown encoding".
            with open("/proc/self/status", "rb") as fh:
                fields = dict(line.split(b":", 1) for line in fh if b":" in line)
            rss = int(fields.get(b"VmRSS", b"0 kB").split()[0]) * 1024
            peak = int(fields.get(b"VmHWM", b"0 kB").split()[0]) * 1024
            return rss, peak
        except (OSError, ValueError, LookupError):
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
