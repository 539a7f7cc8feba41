"""The ``llama_cpp_batching`` suite: continuous batching on the ``llama_cpp`` backend (issue 14).

Concurrent streams against ``batch_generate`` on the same prompts and model, the
slowest stream's time between tokens among 16 against one stream alone, how soon a
deadline ends a ``classify`` or ``batch_generate`` of 1,000-token prompts, how long a
stream waits beside them (against beside another stream's long prompt), and prefix
reuse: a chat's turn 4 against its turn 1 (and against llama-cpp-python's kept cache),
4 chats interleaved, classify behind a shared instruction. The reference each target
names is measured in the same run.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Any

from .harness import BenchConfig, BenchError, Row, Side, Suite, Target
from .llama_cpp_suite import BATCH_PROMPTS, PARAGRAPH, _versions, _why_unavailable, first_token_ms

DEADLINE = 0.2  # seconds given to each call of the deadline row
LONG_PROMPT_TOKENS = 1000


def _prompts(n: int) -> list[str]:
    return [BATCH_PROMPTS[i % len(BATCH_PROMPTS)] + ("" if i < len(BATCH_PROMPTS) else f" ({i})")
            for i in range(n)]


def _streams(model: Any, prompts: list[str], n: int) -> list[list[float]]:
    """Every prompt streamed by its own thread at once; each stream's token arrival times."""
    times: list[list[float]] = [[] for _ in prompts]
    errors: list[BaseException] = []
    go = threading.Barrier(len(prompts))

    def run(i: int) -> None:
        try:
            go.wait()
            for _ in model.generate(prompts[i], max_tokens=n):
                times[i].append(time.perf_counter())
        except BaseException as exc:  # reported below, in the caller
            errors.append(exc)

    pool = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    if errors:
        raise BenchError(f"a stream failed: {errors[0]!r}")
    return times


def _gap(times: list[float]) -> float:
    """Mean seconds between a stream's tokens after its first."""
    if len(times) < 2:
        raise BenchError("a stream gave fewer than 2 tokens; pick longer max_tokens")
    return (times[-1] - times[0]) / (len(times) - 1)


def concurrency_row(path: str, cfg: BenchConfig, stack: ExitStack, streams: int) -> Row:
    """Aggregate tokens/s of ``streams`` concurrent generate calls vs batch_generate."""
    from .. import load_model

    model = stack.enter_context(load_model(path, backend="llama_cpp", threads=cfg.threads,
                                           parallel_slots=streams))
    prompts = _prompts(streams)
    n = cfg.batch_tokens

    def together() -> float:
        start = time.perf_counter()
        times = _streams(model, prompts, n)
        return sum(map(len, times)) / (time.perf_counter() - start)

    def batch() -> float:
        start = time.perf_counter()
        results = model.batch_generate(prompts, max_tokens=n)
        return sum(len(r.tokens) for r in results) / (time.perf_counter() - start)

    def alone() -> float:
        start = time.perf_counter()
        got = sum(1 for _ in model.generate(prompts[0], max_tokens=n))
        return got / (time.perf_counter() - start)

    from .invariant_worker import InvariantWorker

    invariant = InvariantWorker(path, cfg.threads, streams)
    stack.callback(invariant.close)

    conc, ref = f"ours: {streams} concurrent generate streams", "ours: batch_generate, same prompts"
    return Row(
        key=f"concurrent_{streams}",
        title=f"{streams} concurrent streams x {n} tokens vs batch_generate",
        unit="tokens/s",
        sides=[Side(conc, together, True), Side(ref, batch, True),
               Side("ours: one stream alone", alone, True),
               Side(f"ours: {streams} concurrent streams, batch_invariant=True",
                    lambda: invariant.run("streams", prompts, n), True)],
        reference=ref,
        targets=[Target(conc, ">=", 0.9, ref)],
        note="aggregate generated tokens/s, one model with parallel_slots equal to the streams; "
        "batch_invariant=True in a process of its own (it turns a kernel off for the whole process), "
        "timed there",
        info={"streams": streams, "max_tokens": n},
    )


def inter_token_row(path: str, cfg: BenchConfig, stack: ExitStack, streams: int = 16) -> Row:
    """The slowest stream's mean time between tokens among ``streams`` vs one stream alone."""
    from .. import load_model

    model = stack.enter_context(load_model(path, backend="llama_cpp", threads=cfg.threads,
                                           parallel_slots=streams))
    prompts = _prompts(streams)
    n = max(cfg.batch_tokens, 3)

    def slowest() -> float:
        return max(map(_gap, _streams(model, prompts, n))) * 1e3

    def alone() -> float:
        return _gap(_streams(model, prompts[:1], n)[0]) * 1e3

    worst, ref = f"ours: slowest of {streams} streams", "ours: one stream alone"
    return Row(
        key=f"inter_token_{streams}",
        title=f"time between tokens, slowest of {streams} streams vs one alone",
        unit="ms",
        sides=[Side(worst, slowest, True), Side(ref, alone, True)],
        reference=ref,
        higher_is_better=False,
        targets=[Target(worst, "<=", 6.0, ref)],
        note="each stream's mean gap between its tokens after the first; the slowest stream's",
        info={"streams": streams, "max_tokens": n},
    )


def _long_text(model: Any, size: int) -> str:
    """Words of ``PARAGRAPH`` over and over, cut to at most ``size`` tokens."""
    words = PARAGRAPH.split()
    text = " ".join(words[i % len(words)] for i in range(size))
    while len(model.tokenize(text)) > size:
        text = text.rsplit(" ", 1)[0]
    return text


def deadline_row(path: str, cfg: BenchConfig, stack: ExitStack) -> Row:
    """Seconds from the start of a call with a 0.2 s deadline to its DeadlineExceeded."""
    from .. import Context, DeadlineExceeded, load_model

    model = stack.enter_context(load_model(path, backend="llama_cpp", threads=cfg.threads,
                                           parallel_slots=2))
    size = 32 if cfg.quick else LONG_PROMPT_TOKENS
    text = _long_text(model, size)
    prompts = [text, text + " Again.", text + " Once more."]

    def ended(call: Callable[[Context], object]) -> Callable[[], float]:
        def run() -> float:
            start = time.perf_counter()
            try:
                call(Context.background().with_timeout(DEADLINE))
            except DeadlineExceeded:
                return time.perf_counter() - start
            if cfg.quick:
                return time.perf_counter() - start  # tiny prompts may finish first
            raise BenchError("the call finished before its deadline; use longer prompts")

        return run

    cls, bat = "ours: classify", "ours: batch_generate"
    gen = "ours: generate"
    return Row(
        key="deadline_long_prompts",
        title=f"a {DEADLINE} s deadline on 3 prompts of {size} tokens: seconds to end",
        unit="s",
        sides=[
            Side(cls, ended(lambda c: model.classify(prompts, ctx=c)), True),
            Side(bat, ended(lambda c: model.batch_generate(prompts, max_tokens=8, ctx=c)), True),
            Side(gen, ended(lambda c: list(model.generate(prompts[0], max_tokens=8, ctx=c))), True),
        ],
        reference=gen,
        higher_is_better=False,
        targets=[Target(cls, "<=", 0.3), Target(bat, "<=", 0.3)],
        note="from the call to its DeadlineExceeded (the deadline itself included)",
        info={"prompt_tokens": len(model.tokenize(text)), "deadline_s": DEADLINE},
    )


def stall_row(path: str, cfg: BenchConfig, stack: ExitStack) -> Row:
    """A stream's longest wait between two tokens while a ``classify`` or ``batch_generate`` of
    1,000-token prompts runs beside it, against the same while another stream prefills one."""
    from .. import load_model

    model = stack.enter_context(load_model(path, backend="llama_cpp", threads=cfg.threads,
                                           parallel_slots=2, engine_options={"prefix_cache": False}))
    size = 32 if cfg.quick else LONG_PROMPT_TOKENS
    text = _long_text(model, size)
    prompts = [text, text + " Again.", text + " Once more."]

    def longest_gap(beside: Callable[[], object]) -> Callable[[], float]:
        def run() -> float:
            stream = model.generate("Count to two hundred: one, two, three,", max_tokens=2000)
            try:
                next(stream)
                worker = threading.Thread(target=beside)
                worker.start()
                last, worst = time.perf_counter(), 0.0
                for _ in stream:
                    now = time.perf_counter()
                    worst, last = max(worst, now - last), now
                    if not worker.is_alive():
                        break
                worker.join()
            finally:
                stream.close()
            return worst

        return run

    cls, bat = "ours: beside classify", "ours: beside batch_generate"
    ref = "ours: beside another stream's prompt"
    return Row(
        key="stall_beside_long_prompts",
        title=f"a stream's longest wait between tokens beside 3 prompts of {size} tokens (s)",
        unit="s",
        sides=[
            Side(cls, longest_gap(lambda: model.classify(prompts)), True),
            Side(bat, longest_gap(lambda: model.batch_generate(prompts, max_tokens=8)), True),
            Side(ref, longest_gap(lambda: list(model.generate(prompts[0], max_tokens=1))), True),
        ],
        reference=ref,
        higher_is_better=False,
        targets=[],
        note="classify and batch_generate decode in the streams' steps, within the same prefill "
             "budget per step as a starting stream's chunk, so a stream waits about as long beside "
             "them as beside another stream's long prompt (it waited 5.9 s and 4.6 s when they held "
             "the engine for their whole prefill)",
        info={"prompt_tokens": len(model.tokenize(text)), "prompts": len(prompts)},
    )


# -- prefix reuse (issue 14 item 3) -------------------------------------------------------

SYSTEM = (
    "You are the help desk of a small public library. You answer questions about opening hours, "
    "borrowing rules, late fees, the reading room, printing and the children's corner. Keep "
    "answers short and polite, and say so when you do not know."
)
QUESTIONS = (
    "Hello! I moved to the town last month and I would like to start using the library. What do "
    "I need to bring with me to get a card, and can my two children get cards of their own too?",
    "Thank you. How many books can each of us borrow at once, and for how long? My daughter reads "
    "very fast and would like to take out a whole series of novels in one go if that is allowed.",
    "That sounds fine. What happens if we bring something back late, say a week after the date? "
    "Are the fees the same for children's books and for films, and can they be paid online?",
    "Last question: is there a quiet room where I could work for a few hours with my laptop, and "
    "is there a printer I could use for a couple of pages? Do I have to book anything for that?",
)
REPLIES = (
    "Welcome to town! To get a card, bring a photo ID and something that shows your address, such "
    "as a utility bill or a rental agreement. Children under sixteen can have their own cards; "
    "they just need a parent or guardian to sign the form with them at the desk.",
    "Each card lets you borrow up to fifteen items at a time. Books are lent for three weeks and "
    "can be renewed twice, online or at the desk, as long as nobody else has reserved them. A "
    "whole series is fine, so your daughter can take all of it home at once.",
    "Late items cost twenty cents a day for books and one euro a day for films, up to a cap of "
    "ten euros per item. Children's books have no late fees at all. Fees can be paid online "
    "through your account, at the self-service machine or at the desk.",
)


def _chat_prompts(model: Any, session: str) -> list[str]:
    """The prompt text of each of the 4 turns of one chat (fixed replies), via the model's template."""
    from ..types import Message

    messages = [Message("system", f"[{session}] {SYSTEM}")]
    prompts = []
    for turn, question in enumerate(QUESTIONS):
        messages.append(Message("user", question))
        prompts.append(model._render_chat(messages))
        if turn < len(REPLIES):
            messages.append(Message("assistant", REPLIES[turn]))
    return prompts


def chat_turns_row(path: str, cfg: BenchConfig, stack: ExitStack) -> Row:
    """Time to first token of turn 4 of a chat against turn 1, and against llama-cpp-python's cache."""
    from .. import load_model
    from .llama_cpp_suite import _engine

    model = stack.enter_context(load_model(path, backend="llama_cpp", threads=cfg.threads))
    cold = stack.enter_context(load_model(path, backend="llama_cpp", threads=cfg.threads,
                                          engine_options={"prefix_cache": False}))
    llm = _engine(path, int(model.context_len), cfg.threads)
    stack.callback(llm.close)
    bos = model._bos_text
    sessions = iter(range(1_000_000))  # each run a new chat: nothing kept from the last run

    def ours(turn: int, m: Any) -> Callable[[], float]:
        def run() -> float:
            prompts = _chat_prompts(m, f"session {next(sessions)}")
            for p in prompts[:turn]:  # the earlier turns (their replies are fixed), untimed
                list(m.generate(p, max_tokens=1))
            return first_token_ms(m, prompts[turn])

        return run

    def engine(turn: int) -> Callable[[], float]:
        def run() -> float:
            prompts = [p.removeprefix(bos) for p in _chat_prompts(model, f"session {next(sessions)}")]
            for p in prompts[:turn]:
                llm.create_completion(p, max_tokens=1, temperature=0.0)
            start = time.perf_counter()
            next(iter(llm.create_completion(prompts[turn], max_tokens=1, temperature=0.0, stream=True)))
            return (time.perf_counter() - start) * 1e3

        return run

    sizes = [len(model.tokenize(p)) for p in _chat_prompts(model, "session 0")]
    t4, t1 = "ours: turn 4 (cache kept)", "ours: turn 1"
    lcp4 = "llama-cpp-python: turn 4 (its cache kept)"
    return Row(
        key="chat_turns",
        title=f"time to first token by chat turn ({', '.join(map(str, sizes))} prompt tokens)",
        unit="ms",
        sides=[Side(t4, ours(3, model), True), Side(t1, ours(0, model), True),
               Side("ours: turn 4, prefix_cache off", ours(3, cold), True),
               Side(lcp4, engine(3), False), Side("llama-cpp-python: turn 1", engine(0), False)],
        reference=t1,
        higher_is_better=False,
        targets=[Target(t4, "<=", 1.3, t1), Target(t4, "<=", 1.0, lcp4)],
        note="each run a new chat (a new system line) whose turns 1..3 ran first, untimed, with "
        "max_tokens=1; "
        "the replies are fixed text, prefilled by the next turn on both sides; llama-cpp-python: "
        "create_completion(stream=True) to its first chunk, its Llama keeping the last prompt's cache",
        info={"prompt_tokens": sizes},
    )


def interleaved_chats_row(path: str, cfg: BenchConfig, stack: ExitStack, chats: int = 4) -> Row:
    """``chats`` chats taking turns on one model: each chat's turn 4 against its turn 1."""
    from .. import load_model

    model = stack.enter_context(load_model(path, backend="llama_cpp", threads=cfg.threads,
                                           parallel_slots=chats))
    sessions = iter(range(1_000_000))

    def run_chats(turn: int) -> Callable[[], float]:
        def run() -> float:
            run_id = next(sessions)
            prompts = [_chat_prompts(model, f"run {run_id} chat {c}") for c in range(chats)]
            took: list[float] = []
            for t in range(turn + 1):
                for c in range(chats):  # turn t of every chat, then turn t + 1 of every chat
                    ms = first_token_ms(model, prompts[c][t])
                    if t == turn:
                        took.append(ms)
            return sum(took) / len(took)

        return run

    t4, t1 = f"ours: turn 4, {chats} chats interleaved", f"ours: turn 1, {chats} chats interleaved"
    return Row(
        key=f"interleaved_chats_{chats}",
        title=f"{chats} chats taking turns on one model: time to first token, turn 4 vs turn 1",
        unit="ms",
        sides=[Side(t4, run_chats(3), True), Side(t1, run_chats(0), True)],
        reference=t1,
        higher_is_better=False,
        targets=[Target(t4, "<=", 1.5, t1)],
        note="mean over the chats of each one's time to first token; turn t of every chat runs "
        "before turn t + 1 of any, so each chat finds its cache behind the others' (parallel_slots "
        "equal to the chats); llama-cpp-python's single kept cache would hold only the last chat",
        info={"chats": chats},
    )


def classify_prefix_row(path: str, cfg: BenchConfig, stack: ExitStack) -> Row:
    """classify of sentences behind one shared instruction, with and without prefix reuse."""
    from .. import load_model
    from .llama_cpp_suite import _sentences

    model = stack.enter_context(load_model(path, backend="llama_cpp", threads=cfg.threads))
    cold = stack.enter_context(load_model(path, backend="llama_cpp", threads=cfg.threads,
                                          engine_options={"prefix_cache": False}))
    words = PARAGRAPH.split()
    size = 24 if cfg.quick else 200
    instruction = "Say whether the sentence below describes something good or bad. " + " ".join(
        words[i % len(words)] for i in range(size))
    while len(model.tokenize(instruction)) > size:
        instruction = instruction.rsplit(" ", 1)[0]
    prompts = [f"{instruction}\nSentence: {s}\nAnswer:" for s in _sentences(cfg.classify_sentences)]

    def rate(m: Any) -> Callable[[], float]:
        def run() -> float:
            start = time.perf_counter()
            n = len(m.classify(prompts))
            return n / (time.perf_counter() - start)

        return run

    shared, plain = "ours: classify, shared prefix decoded once", "ours: classify, prefix_cache off"
    return Row(
        key="classify_shared_prefix",
        title=f"classify of {len(prompts)} sentences behind a shared "
        f"{len(model.tokenize(instruction))}-token instruction",
        unit="sentences/s",
        sides=[Side(shared, rate(model), True), Side(plain, rate(cold), True)],
        reference=plain,
        targets=[Target(shared, ">=", 3.0, plain)],
        note="the prefix every prompt of a packed group shares is decoded once and copied to the "
        "group's other sequences with llama.cpp's sequence copy",
        runs=None if cfg.quick else min(cfg.runs, 2),  # the plain side takes about 90 s a run here
        info={"sentences": len(prompts), "instruction_tokens": len(model.tokenize(instruction))},
    )


def _rows(cfg: BenchConfig) -> Iterator[Row]:
    from ..default_model import default_model_path

    path = cfg.model or str(default_model_path(progress=False))
    makers: list[Callable[[ExitStack], Row]] = [
        lambda s: concurrency_row(path, cfg, s, 4),
        lambda s: concurrency_row(path, cfg, s, 16),
        lambda s: inter_token_row(path, cfg, s, 16),
        lambda s: deadline_row(path, cfg, s),
        lambda s: stall_row(path, cfg, s),
        lambda s: chat_turns_row(path, cfg, s),
        lambda s: interleaved_chats_row(path, cfg, s),
        lambda s: classify_prefix_row(path, cfg, s),
    ]
    for make in makers:
        with ExitStack() as stack:  # each row's model is freed before the next row
            row = make(stack)
            row.info.update({"model": os.path.basename(path), "threads": cfg.threads})
            yield row


SUITE = Suite(
    name="llama_cpp_batching",
    engine="llama-cpp-python (its Llama's kept cache, in the chat_turns row); every other side is ours",
    rows=_rows,
    why_unavailable=_why_unavailable,
    versions=_versions,
)


__all__ = [
    "SUITE", "chat_turns_row", "classify_prefix_row", "concurrency_row", "deadline_row",
    "inter_token_row", "interleaved_chats_row", "stall_row",
]
