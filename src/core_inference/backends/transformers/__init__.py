"""The ``cuda``, ``rocm`` and ``torch`` backends: Hugging Face folders on transformers + torch.

One implementation (``model.py``) behind three names, one per device: ``cuda`` (an NVIDIA
GPU and a CUDA build of torch), ``rocm`` (an AMD GPU and a ROCm/HIP build, which answers to
the same ``torch.cuda`` calls) and ``torch`` (the CPU, available wherever torch and
transformers are installed). This module imports only the core: whether a GPU backend can
run is judged from torch's ``version.py`` (read, not imported) and the GPU's device files,
and torch is imported only when those say a GPU may be there, or when a model loads.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import sys
from typing import TYPE_CHECKING, ClassVar

from ...backend import BaseBackend
from ...errors import ModelLoadError
from ...types import LoadConfig

if TYPE_CHECKING:
    from .model import TransformersModel

ENGINE_OPTIONS = frozenset({"prefill_chunk", "dtype", "continuous_batching"})


def torch_build() -> dict[str, str | None]:
    """``torch.version``'s ``cuda``/``hip`` fields, read from its source without importing torch.

    Empty when torch is not installed or its ``version.py`` cannot be read.
    """
    try:
        spec = importlib.util.find_spec("torch")
    except (ImportError, ValueError):
        return {}
    if spec is None or not spec.submodule_search_locations:
        return {}
    for folder in spec.submodule_search_locations:
        try:
            with open(os.path.join(folder, "version.py"), encoding="utf-8") as fh:
                tree = ast.parse(fh.read())
        except (OSError, SyntaxError, ValueError):
            continue
        out: dict[str, str | None] = {}
        for node in tree.body:
            target = node.target if isinstance(node, ast.AnnAssign) else (
                node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else None)
            value = getattr(node, "value", None)
            if isinstance(target, ast.Name) and isinstance(value, ast.Constant):
                out[target.id] = None if value.value is None else str(value.value)
        return out
    return {}


class _TransformersBackend(BaseBackend):
    """Shared parts of the three device backends."""

    extra = "torch"
    engine_modules = ("torch", "transformers")
    formats = ("safetensors",)
    engine_options = ENGINE_OPTIONS
    device: ClassVar[str] = "cpu"

    def _load(self, path: str, cfg: LoadConfig) -> TransformersModel:
        from ...formats.hf import read_hf_folder

        folder = read_hf_folder(path)  # config, shards and template checked before any engine work
        if not os.path.isfile(os.path.join(path, "tokenizer.json")) and not os.path.isfile(
            os.path.join(path, "tokenizer_config.json")
        ):
            raise ModelLoadError(f"{path}: no tokenizer (tokenizer.json) in the folder", path=path)
        problem = self.hardware_problem()
        if problem is not None:
            from ...errors import BackendUnavailable

            raise BackendUnavailable(self.name, problem, self.extra)
        from .model import TransformersModel

        return TransformersModel(folder, cfg, self.device, self.name)


class TorchBackend(_TransformersBackend):
    """transformers on torch's CPU device: fp32, the threads the machine can spare."""

    name = "torch"


class _GPUBackend(_TransformersBackend):
    device = "cuda"
    build_field: ClassVar[str] = "cuda"  # the torch.version field that says the build has this GPU
    build_name: ClassVar[str] = "CUDA"
    device_files: ClassVar[tuple[str, ...]] = ()
    vendor: ClassVar[str] = ""

    def hardware_problem(self) -> str | None:
        build = torch_build()
        if build and not build.get(self.build_field):
            have = build.get("__version__") or "installed"
            return f"this torch build ({have}) has no {self.build_name} support"
        if sys.platform.startswith("linux") and not any(os.path.exists(f) for f in self.device_files):
            return f"no {self.vendor} GPU seen (none of {', '.join(self.device_files)} exists)"
        return self._ask_torch()

    def _ask_torch(self) -> str | None:
        """The device files are there: only torch can say whether the GPU is usable."""
        try:
            import torch
        except Exception as exc:  # a broken install is a reason, not a crash of `backends`
            return f"torch failed to import: {type(exc).__name__}: {exc}"
        if not getattr(torch.version, self.build_field, None):
            return f"this torch build ({torch.__version__}) has no {self.build_name} support"
        if not torch.cuda.is_available():
            return f"torch sees no {self.vendor} GPU (torch.cuda.is_available() is False)"
        return None


class CudaBackend(_GPUBackend):
    """transformers on an NVIDIA GPU (bfloat16)."""

    name = "cuda"
    build_field = "cuda"
    build_name = "CUDA"
    device_files = ("/dev/nvidiactl", "/proc/driver/nvidia/version", "/dev/dxg")  # dxg: WSL 2
    vendor = "NVIDIA"

    def hardware_problem(self) -> str | None:
        build = torch_build()
        if build.get("hip"):
            return f"this torch build ({build.get('__version__')}) is for ROCm: use the 'rocm' backend"
        return super().hardware_problem()


class RocmBackend(_GPUBackend):
    """transformers on an AMD GPU through a ROCm (HIP) build of torch (bfloat16)."""

    name = "rocm"
    build_field = "hip"
    build_name = "ROCm (HIP)"
    device_files = ("/dev/kfd", "/dev/dxg")  # dxg: WSL 2
    vendor = "AMD"


__all__ = ["CudaBackend", "RocmBackend", "TorchBackend", "torch_build"]
