"""Continuous batching: concurrent streams share one forward pass per decode step.

With ``parallel_slots`` > 1 every stream keeps its own ``DynamicCache`` (so streams join
and leave at any step, and a cancelled one just stops asking), and each decode step goes
through ``StepBatcher.step``. The first stream to ask becomes the step's leader: it waits
briefly for the other decoding streams to ask too, then runs them as one left-padded
batch: every layer's keys and values laid side by side (right-aligned, padding masked),
the position of each row given explicitly, and each row's new key/value column appended
to its own cache afterwards. That is the state a left-padded ``batch_generate`` batch
would have, so each stream gets the tokens it would get alone.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .sampling import Sampler

if TYPE_CHECKING:
    from .model import TransformersModel

GATHER_SECONDS = 0.002  # how long a step's leader waits for the other decoding streams


@dataclass(eq=False)
class _Ask:
    """One stream's request for its next token."""

    tid: int
    cache: Any
    pos: int  # tokens already in the cache: the position of ``tid``
    sampler: Sampler
    done: bool = False
    result: int = -1
    error: BaseException | None = None
    seconds: float = 0.0  # the forward pass this request was part of
    batch: int = field(default=0)  # how many streams shared it


def can_batch(cache: Any) -> bool:
    """True when every layer of the model's cache holds plain keys and values (no linear
    attention or recurrent state, which cannot be padded side by side)."""
    from transformers.cache_utils import DynamicLayer

    return bool(cache.layers) and all(isinstance(layer, DynamicLayer) for layer in cache.layers)


class StepBatcher:
    """Runs the decode steps of concurrent streams of one model together."""

    def __init__(self, model: TransformersModel) -> None:
        self._model = model
        self._cv = threading.Condition()
        self._pending: list[_Ask] = []
        self._leading = False
        self._decoding = 0  # streams between their prefill and their end
        self.steps = 0  # forward passes run (for tests and stats)
        self.shared_steps = 0  # ... of which served more than one stream

    def joined(self) -> None:
        """A stream finished its prefill and will ask for decode steps."""
        with self._cv:
            self._decoding += 1

    def left(self) -> None:
        """A stream ended (or was abandoned): nobody waits for it any more."""
        with self._cv:
            self._decoding -= 1
            self._cv.notify_all()

    def step(self, tid: int, cache: Any, pos: int, sampler: Sampler) -> tuple[int, float]:
        """Feed ``tid`` at position ``pos``; the next token and the time of the forward pass."""
        ask = _Ask(tid, cache, pos, sampler)
        with self._cv:
            self._pending.append(ask)
            self._cv.notify_all()
            while not ask.done:
                if self._leading:
                    self._cv.wait()
                    continue
                # lead this step: give the other decoding streams a moment to ask too
                self._leading = True
                deadline = time.monotonic() + GATHER_SECONDS
                while len(self._pending) < self._decoding:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cv.wait(left)
                batch, self._pending = self._pending, []
                self._cv.release()
                try:
                    self._run(batch)
                finally:
                    self._cv.acquire()
                    self._leading = False
                    self._cv.notify_all()
        if ask.error is not None:
            raise ask.error
        return ask.result, ask.seconds

    def _run(self, batch: list[_Ask]) -> None:
        model = self._model
        began = time.perf_counter()
        try:
            with model._engine_lock, torch.inference_mode():
                if len(batch) == 1:
                    a = batch[0]
                    ids = torch.tensor([[a.tid]], device=model.device)
                    a.result = a.sampler.sample(model._forward(ids, a.cache)[0])
                else:
                    picks = self._together(batch)
                    for a, tid in zip(batch, picks, strict=True):
                        a.result = tid
            self.steps += 1
            self.shared_steps += len(batch) > 1
        except BaseException as exc:  # every stream of the step gets the failure
            for a in batch:
                a.error = exc
        seconds = time.perf_counter() - began
        for a in batch:
            a.seconds, a.batch, a.done = seconds, len(batch), True

    def _together(self, batch: list[_Ask]) -> list[int]:
        """One forward pass for several streams, each with its own cache."""
        from transformers import DynamicCache

        model = self._model
        dev = model.device
        longest = max(a.pos for a in batch)
        shared: Any = DynamicCache(config=model._model.config)
        for i, layer in enumerate(shared.layers):
            parts = [a.cache.layers[i] for a in batch]
            width = max(p.keys.shape[-2] for p in parts)
            keys = torch.cat([_left_pad(p.keys, width) for p in parts])
            values = torch.cat([_left_pad(p.values, width) for p in parts])
            layer.update(keys, values)
            if hasattr(layer, "cumulative_length"):  # a sliding-window layer: it counts every position
                layer.cumulative_length = longest
        mask = torch.zeros((len(batch), longest + 1), dtype=torch.long, device=dev)
        for b, a in enumerate(batch):
            mask[b, longest - a.pos :] = 1
        positions = torch.tensor([[a.pos] for a in batch], device=dev)
        ids = torch.tensor([[a.tid] for a in batch], device=dev)
        logits = model._forward(ids, shared, mask, positions)
        for i, layer in enumerate(shared.layers):
            new_k, new_v = layer.keys[:, :, -1:, :], layer.values[:, :, -1:, :]
            for b, a in enumerate(batch):
                a.cache.layers[i].update(new_k[b : b + 1].clone(), new_v[b : b + 1].clone())
        return model._pick([a.sampler for a in batch], logits, range(len(batch)))


def _left_pad(t: torch.Tensor, width: int) -> torch.Tensor:
    """``t`` (1, heads, n, dim) with zeros before it up to ``width`` positions."""
    short = width - t.shape[-2]
    if short <= 0:
        return t
    pad = t.new_zeros((*t.shape[:-2], short, t.shape[-1]))
    return torch.cat([pad, t], dim=-2)


__all__ = ["GATHER_SECONDS", "StepBatcher", "can_batch"]
