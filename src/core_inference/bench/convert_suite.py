"""Rows for ``core-inference convert``: what turning a GGUF into a Hugging Face folder costs.

- ``convert``: a cold conversion of the same GGUF into an empty folder, ours
  (``convert_gguf``: hashing, transformers' reader, the stamp, the rename into place) against
  transformers called directly (``from_pretrained(gguf_file=...)``, ``AutoTokenizer``,
  ``save_pretrained``), in seconds. Each run writes a new folder, removed after it.
- ``convert_again``: the second call for the same file, which reads the stamp and returns.

The folder's size on disk is kept in the row's facts. A run takes most of a minute (Gemma 3
270M, 2 cores), so these rows run three times, without a warm-up (transformers is imported
first, outside the timed runs); ``--quick`` lists them as not run.
"""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .harness import BenchConfig, Row, Side, Suite, Target

OURS = "ours: convert_gguf"
DIRECT = "transformers: from_pretrained + save_pretrained"
AGAIN = "ours: the second call"
RUNS = 3  # most of a minute each: ABBA rounds, no warm-up (nothing is cached between runs)


def _why_unavailable() -> str | None:
    for module in ("torch", "transformers", "gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed (pip install 'core-inference[convert]')"
    return None


def _versions() -> dict[str, str]:
    import transformers

    return {"transformers": str(transformers.__version__)}


def _gguf(cfg: BenchConfig) -> Path:
    if cfg.model:
        return Path(cfg.model)
    from ..default_model import default_model_path

    return default_model_path(progress=False)


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _rows(cfg: BenchConfig) -> Iterator[Row]:
    source = _gguf(cfg)
    facts: dict[str, Any] = {"model": source.name, "gguf_mb": round(source.stat().st_size / 1e6, 1)}
    if cfg.quick:
        why = "a conversion takes most of a minute a run: --quick does not run it"
        yield Row("convert", "GGUF to a Hugging Face folder", "s", [Side(OURS, lambda: 0.0, True)], OURS,
                  higher_is_better=False, skipped=why)
        return
    from ..convert import _supported_architectures

    _supported_architectures()  # imports transformers' GGUF reader (2 s): not inside the first timed run
    scratch = Path(tempfile.mkdtemp(prefix="core-inference-convert-bench-"))
    info = dict(facts)
    try:
        def ours() -> float:
            from ..convert import convert_gguf

            out = scratch / "ours"
            began = time.perf_counter()
            convert_gguf(source, out, progress=False)
            took = time.perf_counter() - began
            info["folder_mb"] = round(_size(out) / 1e6, 1)
            shutil.rmtree(out)
            return took

        def direct() -> float:
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

            out = scratch / "direct"
            began = time.perf_counter()
            model = AutoModelForCausalLM.from_pretrained(
                str(source.parent), gguf_file=source.name, dtype=torch.float32, local_files_only=True,
                quantization_config=GgufConfig(dequantize=True),
            )
            tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name,
                                                      local_files_only=True)
            model.save_pretrained(out, safe_serialization=True)
            tokenizer.save_pretrained(out)
            took = time.perf_counter() - began
            del model
            shutil.rmtree(out)
            return took

        yield Row(
            "convert", "GGUF to a Hugging Face folder, cold", "s",
            [Side(OURS, ours, True), Side(DIRECT, direct, False)], DIRECT, higher_is_better=False,
            targets=[Target(OURS, "<=", 1.05, against=DIRECT)], runs=RUNS, warmup=0, info=info,
            note="each run writes a new float32 folder; ours also hashes the GGUF (SHA-256) and stamps it",
        )

        from ..convert import convert_gguf

        kept = convert_gguf(source, progress=False)  # in the cache, as every backend's tests use it

        def again() -> float:
            began = time.perf_counter()
            convert_gguf(source, progress=False)
            return time.perf_counter() - began

        yield Row(
            "convert_again", "the second convert of the same file", "s", [Side(AGAIN, again, True)], AGAIN,
            higher_is_better=False, targets=[Target(AGAIN, "<=", 0.1)],
            info={**facts, "folder": kept.name}, note="reads the folder's stamp: no hashing, no engine",
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


SUITE = Suite("convert", "transformers", _rows, _why_unavailable, _versions)


def main(argv: list[str] | None = None) -> int:
    """``python -m core_inference.bench.convert_suite [--out DIR]``: this suite alone."""
    from .runner import suite_main

    return suite_main(
        SUITE, argv, "What core-inference convert costs, against transformers.", quick_help=None,
        threads=False, runs=False
    )


if __name__ == "__main__":
    import sys

    sys.exit(main())
