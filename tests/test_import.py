"""`import core_inference` is stdlib-only and cheap (checked in fresh interpreters)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

HEAVY = [
    "llama_cpp", "mlx", "mlx_lm", "torch", "transformers", "vllm", "httpx", "openai",
    "starlette", "fastapi", "uvicorn", "click", "jinja2", "numpy", "gguf", "ray",
]

BUDGET_MS = 50.0


def run_python(code: str, env: dict[str, str] | None = None) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]


def test_import_pulls_in_no_engine_or_framework() -> None:
    code = (
        "import sys, json\n"
        "import core_inference\n"
        "core_inference.list_backends()\n"  # scanning the registry must not import engines either
        f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))\n"
    )
    assert json.loads(run_python(code)) == []


def test_import_of_every_core_module_pulls_in_no_engine() -> None:
    core = ["context", "discover", "errors", "formats", "formats.gguf", "formats.hf", "formats.validate",
            "model", "options", "protocols", "registry", "streaming", "templates", "types", "testing",
            "backend", "default_model"]
    code = (
        "import sys, json, importlib\n"
        f"for m in {core!r}: importlib.import_module('core_inference.' + m)\n"
        f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))\n"
    )
    assert json.loads(run_python(code)) == []


def test_import_time_budget(tmp_path: Path) -> None:
    """A budget check, not a speed claim: the best of several fresh interpreters.

    Byte-code is cached (in a private folder) as any installed package has it, so
    the measure is the import, not compiling the sources; the first run warms it.
    """
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(tmp_path / "pycache")
    code = (
        "import time\n"
        "t0 = time.perf_counter(); c0 = time.process_time()\n"
        "import core_inference\n"
        "t1 = time.perf_counter(); c1 = time.process_time()\n"
        "print((t1 - t0) * 1000, (c1 - c0) * 1000)\n"
    )
    run_python(code, env)  # warm the byte-code cache
    runs: list[tuple[float, float]] = []
    # best of 5; on a busy machine, up to 10 more runs before calling it a failure
    for i in range(15):
        wall, cpu = map(float, run_python(code, env).split())
        runs.append((wall, cpu))
        if i >= 4 and min(w for w, _ in runs) < BUDGET_MS:
            break
    best = min(w for w, _ in runs)
    assert best < BUDGET_MS, (
        f"import core_inference took {best:.1f} ms at best (budget {BUDGET_MS} ms); runs (wall, cpu ms): "
        f"{[(round(w, 1), round(c, 1)) for w, c in runs]}; "
        "see `python -X importtime -c 'import core_inference'`"
    )
