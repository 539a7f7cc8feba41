"""What the benchmark ran on: CPU model, cores, Python, and a short slug naming the result files."""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
from typing import Any

from ..memory import cpu_count


def cpu_model() -> str:
    """The CPU's marketing name, or the best the platform offers."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if sys.platform == "darwin":
        try:
            out = subprocess.run(
                ["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True, timeout=5
            )
            if out.stdout.strip():
                return out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine() or "unknown cpu"


def slugify(text: str, limit: int = 40) -> str:
    """Lower-case words joined by dashes: "AMD EPYC 7B13 64-Core" -> "amd-epyc-7b13-64-core"."""
    words = re.sub(r"\((r|tm|c)\)|\bcpu\b|\bprocessor\b|@.*$", " ", text.lower())
    slug = re.sub(r"[^a-z0-9]+", "-", words).strip("-")
    return slug[:limit].rstrip("-") or "unknown"


def machine_slug(cores: int | None = None) -> str:
    """``<cpu>-<cores>c``, e.g. ``amd-epyc-2c``: names the result files of this kind of machine.

    The hostname is recorded in the results but kept out of the name: containers and CI
    runners get a random one per run, which would scatter one machine's results.
    """
    return f"{slugify(cpu_model())}-{cores or cpu_count()}c"


def machine_info(threads: int) -> dict[str, Any]:
    """The facts a reader needs to compare two result files."""
    return {
        "hostname": platform.node(),
        "cpu": cpu_model(),
        "cores": cpu_count(),
        "logical_cpus": os.cpu_count() or 0,
        "threads": threads,
        "os": f"{platform.system()} {platform.release()}",
        "arch": platform.machine(),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "load_average": _load_average(),
    }


def _load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None
