"""The ``metal`` backend: Hugging Face safetensors folders on Apple's MLX, through mlx-lm.

It runs on the Apple GPU (Metal), which is what makes it available. MLX also has a CPU
device, used when the model is loaded with ``engine_options={"device": "cpu"}``: that is
how it runs on Linux (``pip install 'mlx[cpu]' mlx-lm``) and how its tests run there.
Engine options:

- ``device``: ``"gpu"`` (the default: Metal) or ``"cpu"`` (MLX's CPU device, any OS).
- ``prefill_step_size``: prompt tokens per forward pass while prefilling (default 512);
  the call's context is checked between these chunks.

This module imports only the core: mlx and mlx-lm are imported when a model loads
(``model.py``), so listing or choosing backends stays cheap.
"""

from __future__ import annotations

import importlib.util
import platform
import sys
from typing import TYPE_CHECKING

from ...backend import BaseBackend
from ...errors import BackendUnavailable
from ...types import LoadConfig

if TYPE_CHECKING:
    from .model import MlxModel

DEVICES = ("gpu", "cpu")
CPU_HINT = (
    "MLX's CPU device still runs here: "
    'core_inference.load_model(path, backend="metal", engine_options={"device": "cpu"})'
)


def metal_problem() -> str | None:
    """None where MLX can use a Metal GPU (macOS on Apple silicon), else why not; no mlx import."""
    if sys.platform != "darwin":
        here = platform.system() or sys.platform
        return f"no Metal GPU: this is {here}, Metal is on macOS only; {CPU_HINT}"
    if platform.machine() != "arm64":
        mac = platform.machine()
        return f"no Metal GPU MLX can use: MLX needs Apple silicon (this Mac is {mac}); {CPU_HINT}"
    return None


class MlxBackend(BaseBackend):
    """Hugging Face folders on MLX: the Apple GPU, or MLX's CPU device when asked."""

    name = "metal"
    extra = "mlx"
    engine_modules = ("mlx", "mlx_lm")
    formats = ("safetensors",)
    engine_options = frozenset({"device", "prefill_step_size"})

    def hardware_problem(self) -> str | None:
        return metal_problem()

    def why_unavailable_for(self, cfg: LoadConfig) -> str | None:
        """MLX's CPU device needs the engine only, no Metal GPU."""
        if cfg.engine_options.get("device") == "cpu":
            return self.missing_engine()
        return self.why_unavailable()

    def _load(self, path: str, cfg: LoadConfig) -> MlxModel:
        from ...formats.hf import read_hf_folder

        device = cfg.engine_options.get("device", "gpu")
        if device not in DEVICES:
            raise ValueError(f"engine_options: device must be one of {', '.join(DEVICES)}, got {device!r}")
        folder = read_hf_folder(path)  # the checks before the engine sees the folder
        missing = next((m for m in self.engine_modules if _missing(m)), None)
        if missing is not None:
            raise BackendUnavailable(self.name, f"the Python module {missing!r} is not installed", self.extra)
        if device == "gpu":
            why = metal_problem()
            if why is not None:
                raise BackendUnavailable(self.name, why)  # hardware, not a missing extra
        from .model import MlxModel

        return MlxModel(folder, cfg, device)


def _missing(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is None
    except (ImportError, ValueError):
        return True


__all__ = ["MlxBackend", "metal_problem"]
