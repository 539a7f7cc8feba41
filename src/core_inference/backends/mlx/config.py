"""What mlx-lm must be told about a config that transformers v5 wrote in its newer names.

transformers v5 saves RoPE settings as ``rope_parameters`` (per layer type for Gemma 3)
and Gemma 3's attention pattern as ``layer_types``, where mlx-lm's model classes read
``rope_theta``/``rope_local_base_freq``/``rope_scaling`` and ``sliding_window_pattern``
(and fall back to defaults that may differ). These overrides, passed as mlx-lm's
``model_config``, say the same thing in the names it reads. Standard library only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ...errors import ModelLoadError
from ...formats.hf import HFFolder

SLIDING, FULL = "sliding_attention", "full_attention"


def mlx_config_overrides(folder: HFFolder) -> dict[str, Any]:
    """``model_config`` entries for ``mlx_lm.load`` (empty when the config already fits)."""
    config = folder.config
    out: dict[str, Any] = {}
    rope = config.get("rope_parameters")
    if isinstance(rope, Mapping):
        if isinstance(rope.get(FULL), Mapping) or isinstance(rope.get(SLIDING), Mapping):
            _per_layer_type(config, rope, out)
        else:
            _plain(config, rope, out)
    if folder.model_type in ("gemma3_text", "gemma3") and "sliding_window_pattern" not in config:
        pattern = _gemma3_pattern(folder)
        if pattern:
            out["sliding_window_pattern"] = pattern
    return out


def _plain(config: Mapping[str, Any], rope: Mapping[str, Any], out: dict[str, Any]) -> None:
    if "rope_theta" not in config and isinstance(rope.get("rope_theta"), (int, float)):
        out["rope_theta"] = rope["rope_theta"]
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default" and "rope_scaling" not in config:
        out["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}


def _per_layer_type(config: Mapping[str, Any], rope: Mapping[str, Any], out: dict[str, Any]) -> None:
    full, local = rope.get(FULL), rope.get(SLIDING)
    if isinstance(full, Mapping):
        _plain(config, full, out)
    if isinstance(local, Mapping) and "rope_local_base_freq" not in config:
        theta = local.get("rope_theta")
        if isinstance(theta, (int, float)):
            out["rope_local_base_freq"] = theta


def _gemma3_pattern(folder: HFFolder) -> int:
    """mlx-lm's ``sliding_window_pattern`` for ``layer_types`` (0: leave mlx-lm's default).

    mlx-lm's Gemma 3 makes every ``pattern``-th layer a global one and reads that layer's
    cache for the global mask, so a pattern with no global layer among the model's layers
    cannot run there: that is a clear error now, not an IndexError mid-generation.
    """
    config = folder.config
    types = config.get("layer_types")
    if not isinstance(types, list) or not types:
        hinted = config.get("_sliding_window_pattern")
        n = folder.num_layers
        if isinstance(hinted, int) and n and hinted > n:
            raise _unsupported(folder, f"a global-attention layer every {hinted} layers, but it has {n}")
        return hinted if isinstance(hinted, int) and hinted > 0 else 0
    for pattern in range(1, len(types) + 1):
        if all(t == (FULL if (i + 1) % pattern == 0 else SLIDING) for i, t in enumerate(types)):
            return pattern
    raise _unsupported(folder, f"layer_types {types}, which is not a sliding/global pattern "
                               "with a global layer every n layers")


def _unsupported(folder: HFFolder, what: str) -> ModelLoadError:
    return ModelLoadError(
        f"{folder.path}: mlx-lm's Gemma 3 needs every n-th layer to use global attention "
        f"(sliding_window_pattern); this model has {what}", path=folder.path,
    )


__all__ = ["mlx_config_overrides"]
