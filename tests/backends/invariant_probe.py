"""Run by ``test_llama_cpp_invariant.py`` in a fresh interpreter: ``batch_invariant`` turns a
kernel off for the whole process, before its first decode, so it cannot share pytest's.

``python invariant_probe.py MODEL answers`` prints, as JSON, each kind of sharing's answers
next to the same prompts' answers on a model that shares nothing;
``python invariant_probe.py MODEL late`` loads a default model, decodes, then asks for
``batch_invariant`` and prints the error it gets.
"""

from __future__ import annotations

import json
import sys
import threading
from typing import Any

import core_inference as ci

WORDS = ["river", "valley", "green", "stone", "house", "light", "morning", "quiet", "market", "bread"]
SYSTEM = "You are a careful assistant. Answer in one short sentence. " * 12


def text(n: int, k: int) -> str:
    return " ".join(WORDS[(i * k) % len(WORDS)] for i in range(n))


def prompts(model: Any) -> list[str]:
    """Prompts of 1 token (BOS alone) to past the 512-token prefill step and sliding window,
    with neighbours one token apart (a packed decode would leave one of them a single row)."""
    out = ["", "Hi", "Hi there", "The river", "The river is"]
    for n in (20, 21, 22, 120, 480, 515, 700):
        out.append(text(n, 5 + n % 7))
    lengths = [len(model.tokenize(p)) for p in out]
    assert len(set(lengths)) >= len(out) - 2, lengths
    return out


def ids(tokens: Any) -> list[int]:
    return [t.id for t in tokens]


def vec(logits: Any) -> list[float]:
    return [] if logits is None else [float(x) for x in logits]


def answers(path: str) -> dict[str, Any]:
    opts: dict[str, Any] = {"parallel_slots": 4, "context_len": 2048}
    nothing_shared = {"batch_invariant": True, "shared_decode": False, "prefix_cache": False}
    with ci.load_model(path, engine_options=nothing_shared, **opts) as ref:
        ps = prompts(ref)
        alone = [ids(ref.generate(p, max_tokens=8)) for p in ps]
        logits = [vec(ref.classify([p], return_logits=True)[0].logits) for p in ps]
        chats = [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}]
                 for q in ("Name a river.", "Name a mountain.", "Name a city.")]
        chat_alone = [ids(ref.chat(c, max_tokens=8)) for c in chats]
        second = chats[0] + [{"role": "assistant", "content": ref.detokenize(chat_alone[0])},
                             {"role": "user", "content": "And another?"}]
        second_alone = ids(ref.chat(second, max_tokens=8))
        # an instruction all prompts share: decoded once and copied by classify/batch_generate
        behind = [SYSTEM + q for q in ("Rivers", "Green stone houses", "Morning", "A quiet market", "X")]
        behind_alone = [ids(ref.generate(p, max_tokens=8)) for p in behind]
        behind_logits = [vec(ref.classify([p], return_logits=True)[0].logits) for p in behind]
        # streams of unequal lengths: the short ones leave gaps between the long ones' sequences
        uneven = [text(30, 3), "Hi there", "The river", text(40, 7)]
        uneven_lengths = [24, 2, 2, 24]
        uneven_alone = [ids(ref.generate(p, max_tokens=n))
                        for p, n in zip(uneven, uneven_lengths, strict=True)]
        # prompts continued after their answer: the next call finds the answer's cells kept
        firsts = [text(n, 3 + n % 5) for n in (5, 40, 130, 300, 600)]
        nexts = [f + ref.detokenize(ids(ref.generate(f, max_tokens=24))) + " and the" for f in firsts]
        nexts_alone = [ids(ref.generate(p, max_tokens=12)) for p in nexts]
    uneven_run = ragged(path, uneven, uneven_lengths, **opts)
    with ci.load_model(path, engine_options={"batch_invariant": True}, **opts) as m:
        batch = [ids(r.tokens) for r in m.batch_generate(ps, max_tokens=8)]
        cls = m.classify(ps, return_logits=True)
        together: dict[int, list[int]] = {}

        def worker(first: int) -> None:
            for i in range(first, len(ps), 4):
                together[i] = ids(m.generate(ps[i], max_tokens=8))

        pool = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        twice = [ids(m.generate(ps[-1], max_tokens=8)), m.metrics().cached_prompt_tokens]
        chat_out, chat_cached, chat_prompts = [], [], []
        for c in chats:
            chat_out.append(ids(m.chat(c, max_tokens=8)))
            chat_cached.append(m.metrics().cached_prompt_tokens)
            chat_prompts.append(m.metrics().prompt_tokens)
        second_out = ids(m.chat(second, max_tokens=8))
        second_cached = m.metrics().cached_prompt_tokens
        nexts_out, nexts_cached, firsts_tokens = [], [], []
        for f, p in zip(firsts, nexts, strict=True):
            m.generate(f, max_tokens=24).text()
            firsts_tokens.append(m.metrics().prompt_tokens)
            nexts_out.append(ids(m.generate(p, max_tokens=12)))
            nexts_cached.append(m.metrics().cached_prompt_tokens)
        behind_cls = m.classify(behind, return_logits=True)
        behind_cached = m.metrics().cached_prompt_tokens
        behind_equal = [vec(r.logits) == g for r, g in zip(behind_cls, behind_logits, strict=True)]
        behind_batch = [ids(r.tokens) for r in m.batch_generate(behind, max_tokens=8)]
        return {
            "packed": m._steps.stats.packed,
            "uneven_alone": uneven_alone,
            "uneven": uneven_run,
            "lengths": [len(m.tokenize(p)) for p in ps],
            "alone": alone,
            "batch_generate": batch,
            "concurrent": [together[i] for i in range(len(ps))],
            "classify_tokens": [r.token.id for r in cls],
            "classify_logits_equal": [vec(r.logits) == lg for r, lg in zip(cls, logits, strict=True)],
            "twice": twice,
            "chat_alone": chat_alone,
            "chat": chat_out,
            "chat_cached": chat_cached,
            "second_alone": second_alone,
            "second": second_out,
            "second_cached": second_cached,
            "first_turn_prompt": chat_prompts[0],
            "nexts_alone": nexts_alone,
            "nexts": nexts_out,
            "nexts_cached": nexts_cached,
            "firsts_tokens": firsts_tokens,
            "behind_alone": behind_alone,
            "behind_batch": behind_batch,
            "behind_tokens": [r.token.id for r in behind_cls],
            "behind_logits_equal": behind_equal,
            "behind_cached": behind_cached,
        }


def one_after_another(m: Any, prompts: list[str], lengths: list[int]) -> list[list[int]]:
    """Streams started in turn (each once the last has its first token, so they take sequences
    0, 1, 2, ... of a fresh model), running together; each stream's token ids."""
    out: dict[int, list[int]] = {}
    threads = []
    for i, (p, n) in enumerate(zip(prompts, lengths, strict=True)):
        first = threading.Event()

        def run(i: int = i, p: str = p, n: int = n, first: threading.Event = first) -> None:
            got: list[int] = []
            for t in m.generate(p, max_tokens=n):
                got.append(t.id)
                first.set()
            out[i] = got
            first.set()

        threads.append(threading.Thread(target=run))
        threads[-1].start()
        first.wait(120)
    for t in threads:
        t.join()
    return [out[i] for i in range(len(prompts))]


def ragged(path: str, prompts: list[str], lengths: list[int], **opts: Any) -> dict[str, Any]:
    """Streams started one after another (so they take sequences 0, 1, 2, ... in turn), of the
    given lengths: the short ones end and leave free sequences between the long ones, which
    filler rows keep in one micro-batch. Then each short prompt again, from its kept cache."""
    with ci.load_model(path, engine_options={"batch_invariant": True}, **opts) as m:
        out = one_after_another(m, prompts, lengths)
        again, cached = [], []
        for p, n in zip(prompts, lengths, strict=True):
            if n < max(lengths):
                again.append(ids(m.generate(p, max_tokens=n)))
                cached.append(m.metrics().cached_prompt_tokens)
        stats = m._steps.stats
        return {"out": out, "again": again, "cached": cached, "filled": stats.filled}


def late(path: str) -> dict[str, Any]:
    with ci.load_model(path) as m:
        list(m.generate("Hello", max_tokens=2))
    try:
        ci.load_model(path, engine_options={"batch_invariant": True}).close()
    except ValueError as exc:
        return {"error": str(exc)}
    return {"error": None}


if __name__ == "__main__":
    path, what = sys.argv[1], sys.argv[2]
    print(json.dumps(answers(path) if what == "answers" else late(path)))
