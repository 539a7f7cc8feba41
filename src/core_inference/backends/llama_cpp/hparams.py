"""Header values that llama.cpp asserts instead of checking: refused before it loads a file.

Imports only the core, so the llama_cpp backend can check a file without importing the engine.
"""

from __future__ import annotations

from ...errors import ModelLoadError
from ...formats.gguf import GGUFHeader

# llama.cpp checks these header values with GGML_ASSERT, which aborts the whole process
# (llama-model.cpp, load_hparams); the limits are those of the llama.cpp this was built on.
LLAMA_MAX_LAYERS = 512
LLAMA_MAX_EXPERTS = 1024
ROPE_SCALING_TYPES = ("none", "linear", "yarn", "longrope")


def check_hparams(header: GGUFHeader) -> None:
    """Refuse header values that would make llama.cpp abort the process while loading.

    A structurally valid GGUF file can still carry, say, ``block_count = 0``: llama.cpp
    meets it with ``GGML_ASSERT``, which kills the process instead of returning an
    error. These are its generic hyperparameter asserts, checked here first.
    """
    arch = header.architecture
    md = header.metadata

    def num(key: str) -> int | None:
        value = md.get(f"{arch}.{key}")
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    def fail(what: str) -> ModelLoadError:
        return ModelLoadError(f"{header.path}: unsupported model: {what} (llama.cpp would abort on it)")

    layers = num("block_count")
    if layers is not None and not 1 <= layers <= LLAMA_MAX_LAYERS:
        raise fail(f"{arch}.block_count is {layers}, not in 1..{LLAMA_MAX_LAYERS}")
    for key in ("nextn_predict_layers", "posnet.block_count", "convnext.block_count"):
        n = num(key)
        if n is not None and layers is not None and n > layers:
            raise fail(f"{arch}.{key} is {n}, more than block_count {layers}")
    experts = num("expert_count") or 0
    used_value = md.get(f"{arch}.expert_used_count")
    used_items = used_value if isinstance(used_value, list) else [used_value]
    used = max((u for u in used_items if isinstance(u, int)), default=0)
    groups = num("expert_group_count") or 0
    group_used = num("expert_group_used_count") or 0
    if experts > LLAMA_MAX_EXPERTS:
        raise fail(f"{arch}.expert_count is {experts}, more than {LLAMA_MAX_EXPERTS}")
    if used > experts:
        raise fail(f"{arch}.expert_used_count is {used}, more than expert_count {experts}")
    if experts > 0:
        if used == 0:
            raise fail(f"{arch}.expert_count is {experts} but expert_used_count is 0")
        if groups >= experts:
            raise fail(f"{arch}.expert_group_count {groups} is not less than expert_count {experts}")
        if groups > 1 and (experts % groups or not 0 < group_used < groups):
            raise fail(
                f"{arch}.expert_group_count {groups} with expert_count {experts} and "
                f"expert_group_used_count {group_used}"
            )
    elif groups:
        raise fail(f"{arch}.expert_group_count is {groups} without experts")
    rope = md.get(f"{arch}.rope.scaling.type")
    if isinstance(rope, str) and rope not in ROPE_SCALING_TYPES:
        raise fail(f"{arch}.rope.scaling.type is {rope!r}, not one of {', '.join(ROPE_SCALING_TYPES)}")
