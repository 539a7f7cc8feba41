"""``logprobs`` for models whose backend gives logits (``capabilities.logits``).

The contract's token stream carries no probabilities, so they are scored through the
contract too: ``classify(prefixes, return_logits=True)`` prefills the prompt plus the
answer up to each token and gives the logits at its last position; a token's logprob
is the log-softmax of those logits at its id. A non-streaming answer is scored in one
batched call after it ends; a stream scores each token as it comes (one more slot per
choice while it runs). The prefix is re-tokenized from text, so where a tokenizer would
split the answer's text differently from how it was generated, the logprob is that of
the model's own reading of the text (rare; never for whole-word answers).
"""

from __future__ import annotations

import asyncio
import heapq
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..protocols import TextModel
from ..types import Token


@dataclass(frozen=True)
class Scored:
    """One generated token with its logprob and the ``k`` likeliest alternatives."""

    token: Token
    logprob: float
    top: tuple[tuple[int, float], ...]  # (token id, logprob), likeliest first


def pick(logits: Any, token_id: int, k: int) -> tuple[float, tuple[tuple[int, float], ...]]:
    """Log-softmax of ``logits`` at ``token_id``, and the ``k`` likeliest ids with theirs."""
    try:
        import numpy as np
    except ImportError:  # pure Python: slower, same numbers
        values = [float(x) for x in logits]
        high = max(values)
        norm = high + math.log(sum(math.exp(x - high) for x in values))
        best = heapq.nlargest(k, range(len(values)), key=values.__getitem__) if k else []
        return values[token_id] - norm, tuple((i, values[i] - norm) for i in best)
    arr = np.asarray(logits, dtype=np.float64).ravel()
    high = float(arr.max())
    norm = high + float(np.log(np.exp(arr - high).sum()))
    top: tuple[tuple[int, float], ...] = ()
    if k:
        ids = np.argpartition(-arr, k - 1)[:k] if k < arr.size else np.arange(arr.size)
        ids = ids[np.argsort(-arr[ids], kind="stable")]
        top = tuple((int(i), float(arr[i]) - norm) for i in ids)
    return float(arr[token_id]) - norm, top


async def score(model: TextModel, base: str, tokens: Sequence[Token], k: int,
                before: Sequence[Token] = ()) -> list[Scored]:
    """Score ``tokens``, which follow ``base`` and the already generated ``before``, in one batch."""
    if not tokens:
        return []
    done = "".join(t.text for t in before)
    prefixes = []
    for t in tokens:
        prefixes.append(base + done)
        done += t.text
    results = await asyncio.to_thread(model.classify, prefixes, return_logits=True)
    out = []
    for t, r in zip(tokens, results, strict=True):
        if r.err is not None:
            raise r.err
        if r.logits is None:
            raise ValueError("logprobs: the model's backend returned no logits")
        lp, top = pick(r.logits, t.id, k)
        out.append(Scored(t, lp, top))
    return out


def _bytes(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def chat_format(items: Sequence[Scored], name: Callable[[int], str]) -> dict[str, Any]:
    """Chat's ``logprobs``: ``{"content": [{"token", "logprob", "bytes", "top_logprobs"}]}``."""
    return {"content": [
        {"token": s.token.text, "logprob": s.logprob, "bytes": _bytes(s.token.text),
         "top_logprobs": [{"token": name(i), "logprob": lp, "bytes": _bytes(name(i))} for i, lp in s.top]}
        for s in items
    ], "refusal": None}


def completion_format(items: Sequence[Scored], name: Callable[[int], str], offset: int) -> dict[str, Any]:
    """Completions' ``logprobs``: parallel lists of tokens, logprobs, top alternatives, text offsets."""
    offsets = []
    for s in items:
        offsets.append(offset)
        offset += len(s.token.text)
    return {
        "tokens": [s.token.text for s in items],
        "token_logprobs": [s.logprob for s in items],
        "top_logprobs": [{name(i): lp for i, lp in s.top} for s in items],
        "text_offset": offsets,
    }
