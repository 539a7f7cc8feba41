"""The contract's own cost, with no engine: tokens/s through ``generate`` on a zero-cost
``FakeModel``, and the time ``import core_inference`` takes in a fresh interpreter."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator

from .harness import BenchConfig, BenchError, Row, Side, Suite, Target

IMPORT_SNIPPET = "import time; t = time.perf_counter(); import {module}; print(time.perf_counter() - t)"


def _fake_rows(cfg: BenchConfig) -> Iterator[Row]:
    from ..context import Context
    from ..streaming import MetricsRecorder
    from ..testing import FakeModel
    from ..types import GenerateConfig

    n = cfg.fake_tokens
    model = FakeModel()  # no delay: every token is free, so what is timed is the contract

    def through_generate() -> float:
        start = time.perf_counter()
        sink: deque[object] = deque(model.generate("benchmark", max_tokens=n), maxlen=1)
        elapsed = time.perf_counter() - start
        if model.metrics().generated_tokens != n or not sink:
            raise BenchError(f"FakeModel.generate gave {model.metrics().generated_tokens} tokens, not {n}")
        return n / elapsed

    def engine_alone() -> float:
        raw = model._engine_generate("benchmark", GenerateConfig(max_tokens=n), Context.background(),
                                     MetricsRecorder())
        start = time.perf_counter()
        deque(zip(range(n), raw, strict=False), maxlen=0)
        return n / (time.perf_counter() - start)

    try:
        yield Row(
            key="contract_generate",
            title=f"Contract cost: generate on FakeModel, {n:,} tokens",
            unit="tokens/s",
            sides=[Side("ours: FakeModel.generate", through_generate, True),
                   Side("fake engine stream alone", engine_alone, False)],
            reference="fake engine stream alone",
            targets=[Target("ours: FakeModel.generate", ">=", 500_000)],
            note="everything generate adds per token: options, slot, cancellation checks, "
            "whole-UTF-8 text, Token objects, metrics",
        )
    finally:
        model.close()


def _import_seconds(module: str, pycache: str) -> float:
    # byte-code cached in a private folder, as an installed package has it: the first
    # (warm-up) run compiles, the timed ones import
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = pycache
    out = subprocess.run(
        [sys.executable, "-c", IMPORT_SNIPPET.format(module=module)],
        capture_output=True, text=True, timeout=120, env=env,
    )
    if out.returncode != 0:
        raise BenchError(f"import {module} failed: {out.stderr.strip().splitlines()[-1:]}")
    return float(out.stdout.strip().splitlines()[-1])


def _import_row(cfg: BenchConfig, pycache: str) -> Row:
    def side(module: str) -> Callable[[], float]:
        return lambda: 1e3 * _import_seconds(module, pycache)

    sides = [Side("ours: import core_inference", side("core_inference"), True)]
    if importlib.util.find_spec("llama_cpp") is not None:
        sides.append(Side("import llama_cpp", side("llama_cpp"), False))
    return Row(
        key="import_time",
        title="import core_inference, fresh interpreter",
        unit="ms",
        sides=sides,
        reference=sides[-1].name,
        higher_is_better=False,
        targets=[Target("ours: import core_inference", "<=", 50.0)],
        note="timed inside a fresh interpreter (start-up excluded), byte-code cached; "
        "import llama_cpp for scale",
    )


def _rows(cfg: BenchConfig) -> Iterator[Row]:
    yield from _fake_rows(cfg)
    with tempfile.TemporaryDirectory(prefix="core-inference-bench-") as pycache:
        warm = _import_row(cfg, pycache)
        if cfg.warmup == 0:  # compile once anyway: the row times imports, not compiling
            for s in warm.sides:
                s.run()
        yield warm


SUITE = Suite(name="core", engine="none (FakeModel)", rows=_rows)
