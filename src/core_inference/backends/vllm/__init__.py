"""The ``vllm`` backend: Hugging Face folders on vLLM's V1 async engine (``AsyncLLM``).

vLLM splits one model over several GPUs (``tensor_parallel_size``) or pipeline stages
(``pipeline_parallel_size``), batches concurrent calls step by step, and aborts a request
the moment its caller leaves. This module imports only the core: vLLM is imported when a
model loads (``model.py``). vLLM starts its engine and workers as spawned processes, so
a script that loads a ``vllm`` model needs the ``if __name__ == "__main__":`` guard.
See docs/vllm.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ...backend import BaseBackend
from ...types import LoadConfig

if TYPE_CHECKING:
    from .model import VllmModel

# The engine options, each one of vLLM's ``AsyncEngineArgs`` fields except ``cpu_threads_bind``
# (vLLM's ``VLLM_CPU_OMP_THREADS_BIND`` for the processes this load starts) and ``engine_args``
# (any other ``AsyncEngineArgs`` fields, passed through as they are; vLLM judges them).
ENGINE_OPTIONS = frozenset({
    "tensor_parallel_size", "pipeline_parallel_size", "distributed_executor_backend", "enforce_eager",
    "dtype", "gpu_memory_utilization", "kv_cache_memory_bytes", "cpu_threads_bind", "engine_args",
})


class VllmBackend(BaseBackend):
    """Hugging Face safetensors folders on vLLM: GPUs, tensor/pipeline parallel; its CPU build here."""

    name = "vllm"
    extra = "vllm"
    engine_modules = ("vllm",)
    formats = ("safetensors",)
    engine_options = ENGINE_OPTIONS

    def _load(self, path: str, cfg: LoadConfig) -> VllmModel:
        from .model import VllmModel  # imports vllm

        return VllmModel(path, cfg)


__all__ = ["ENGINE_OPTIONS", "VllmBackend"]
