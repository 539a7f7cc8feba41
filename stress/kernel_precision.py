"""What ``batch_invariant``'s kernels change against the default ones, for a prompt alone.

60 prompts of 5 to 400 words (a fixed word list, seed 7), each classified alone
(``classify([p], return_logits=True)``) on the default model, under three kernel sets, each
in a process of its own (``batch_invariant`` switches a kernel off for the whole process):

- ``default``: llama.cpp's fastest kernels;
- ``invariant``: ``batch_invariant=True`` (flash attention's one-row kernel, values in bfloat16);
- ``invariant_fa_off``: the same with flash attention off and float16 values (what
  ``batch_invariant`` was until 2026-12-07).

Prints and writes, for each invariant set against the default: how many prompts keep the
same greedy token, and the largest logit difference per prompt (median and max).

Usage::

    python stress/kernel_precision.py   # -> stress/results/kernel-precision.json
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

SETS = ("default", "invariant", "invariant_fa_off")
WORDS = ["river", "valley", "green", "long", "stone", "house", "light", "morning", "quiet", "market",
         "bread", "window", "teacher", "garden", "letter", "north"]


def prompts() -> list[str]:
    rng = random.Random(7)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 400))) for _ in range(60)]


def logits(kernels: str, out: str) -> None:
    """Child process: the prompts' logits under ``kernels``, saved to ``out`` (numpy)."""
    from typing import Any

    import llama_cpp.llama_cpp as L  # the C API module the engine calls through
    import numpy as np

    import core_inference as ci
    from core_inference.default_model import default_model_path

    if kernels == "invariant_fa_off":
        make = L.llama_init_from_model

        def init(model: Any, params: Any) -> Any:
            params.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_DISABLED
            params.type_v = 1  # GGML_TYPE_F16
            return make(model, params)

        L.llama_init_from_model = init
    opts = {} if kernels == "default" else {"batch_invariant": True}
    with ci.load_model(str(default_model_path()), engine_options=opts, parallel_slots=1) as m:
        rows = [np.asarray(m.classify([p], return_logits=True)[0].logits, dtype=np.float32)
                for p in prompts()]
    np.save(out, np.stack(rows))


def main() -> None:
    import numpy as np

    with tempfile.TemporaryDirectory() as tmp:
        for kernels in SETS:
            subprocess.run([sys.executable, __file__, "--child", kernels, f"{tmp}/{kernels}.npy"], check=True)
        base = np.load(f"{tmp}/default.npy")
        report: dict[str, object] = {"prompts": len(base)}
        for kernels in SETS[1:]:
            other = np.load(f"{tmp}/{kernels}.npy")
            apart = np.abs(other - base).max(axis=1)
            report[kernels] = {
                "same_greedy_token": int((other.argmax(1) == base.argmax(1)).sum()),
                "max_logit_difference_median": round(float(np.median(apart)), 3),
                "max_logit_difference_max": round(float(apart.max()), 3),
            }
    print(json.dumps(report, indent=2))
    out = Path(__file__).parent / "results" / "kernel-precision.json"
    out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        logits(sys.argv[2], sys.argv[3])
    else:
        main()
