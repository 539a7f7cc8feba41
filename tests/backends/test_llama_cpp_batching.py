"""llama.cpp under load: streams decoded together, prefix reuse, fair turns and deadlines.

All on the real engine and the embedded default model. No timings are asserted: the
bench (``llama_cpp_batching``) measures speed; these check what happens.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import core_inference as ci
from core_inference.backends.llama_cpp import LlamaCppBackend
from core_inference.backends.llama_cpp.model import LlamaCppModel, _micro_batches, _reuse_start, _whole_pieces

from .conftest import ids
from .invariant_probe import one_after_another

SYSTEM = (
    "You are a careful assistant for a small public library. You answer questions about "
    "opening hours, borrowing rules, late fees, the reading room, printing, and the children's "
    "corner. Keep answers short and polite, and say when you do not know. "
) * 3
QUESTIONS = ["When do you open on Sunday?", "How many books can I borrow?", "Is there a printer?"]


def test_reuse_start_keeps_the_rows_of_a_whole_prefill() -> None:
    assert _reuse_start(0, 100, 512) == 0
    assert _reuse_start(3, 100, 512) == 0  # rounds down to a multiple of 4
    assert _reuse_start(30, 100, 512) == 28  # 72 rows left: enough
    assert _reuse_start(99, 100, 512) == 36  # the last 64 rows decoded again, from a multiple of 4
    assert _reuse_start(40, 50, 512) == 0  # fewer than 64 rows in all: from the start
    assert _reuse_start(600, 1000, 512) == 600
    assert _reuse_start(999, 1000, 512) == 936
    assert _reuse_start(520, 530, 512) == 512  # the last chunk alone is short: from its start


def test_the_same_prompt_twice_reads_the_cache_and_answers_the_same(
    model: LlamaCppModel, exact: LlamaCppModel
) -> None:
    prompt = SYSTEM + "Question: " + QUESTIONS[0] + "\nAnswer:"
    alone = ids(exact.generate(prompt, max_tokens=16))
    first = ids(model.generate(prompt, max_tokens=16))
    second = ids(model.generate(prompt, max_tokens=16))
    cached = model.metrics().cached_prompt_tokens
    n_prompt = model.metrics().prompt_tokens
    assert 0 < cached < n_prompt  # all but the rows that decoding alone would put in the last batch
    assert first == second == alone


def test_a_shared_system_prompt_is_prefilled_once(model: LlamaCppModel, exact: LlamaCppModel) -> None:
    for q in QUESTIONS:
        messages = [ci.Message("system", SYSTEM), ci.Message("user", q)]
        got = ids(model.chat(messages, max_tokens=12))
        assert got == ids(exact.chat(messages, max_tokens=12))  # resumed on the same rows: exact
    assert model.metrics().cached_prompt_tokens > len(model.tokenize(SYSTEM)) // 2


def test_a_prefix_held_by_a_running_stream_is_copied_not_prefilled(
    model_path: Path, exact: LlamaCppModel
) -> None:
    """Two chats with one system prompt at once: the second copies the first's cells while
    the first is still decoding, and neither answer changes."""
    first, second = (SYSTEM + "Question: " + q + "\nAnswer:" for q in QUESTIONS[:2])
    with LlamaCppBackend().load_model(model_path, parallel_slots=2) as m:
        running = m.generate(first, max_tokens=24)
        got_first = [next(running).id]  # prefilled, decoding: its slot is taken, not free
        assert not m._kept
        got_second = ids(m.generate(second, max_tokens=16))
        cached, system = m.metrics().cached_prompt_tokens, len(m.tokenize(SYSTEM))
        got_first += ids(running)
        assert len(m._kept) == 2  # the copy left the first stream's own cache whole
    assert cached > system - 64 - 4, (cached, system)  # all but the last rows of a whole prefill
    assert got_second == ids(exact.generate(second, max_tokens=16))
    assert got_first == ids(exact.generate(first, max_tokens=24))


def test_the_next_chat_turn_prefills_only_the_new_tokens(model_path: Path) -> None:
    with LlamaCppBackend().load_model(model_path, parallel_slots=2) as m:
        messages = [ci.Message("system", SYSTEM), ci.Message("user", QUESTIONS[1])]
        previous = 0
        for turn in range(3):
            reply = "".join(t.text for t in m.chat(messages, max_tokens=24))
            got = m.metrics()
            if turn:
                # the history (earlier prompts and replies) came from the cache
                assert got.cached_prompt_tokens >= previous - 64 - 4
            previous = got.prompt_tokens
            messages += [ci.Message("assistant", reply), ci.Message("user", QUESTIONS[turn % 3])]


def test_kept_caches_are_least_recently_used(model_path: Path) -> None:
    prompts = [SYSTEM + f"Note {i}: " + q for i, q in enumerate(QUESTIONS)]
    with LlamaCppBackend().load_model(model_path, parallel_slots=2) as m:
        for p in prompts:  # three prompts through two slots: the first one's cache is gone
            list(m.generate(p, max_tokens=2))
        list(m.generate(prompts[2] + " Please.", max_tokens=2))
        got = m.metrics()  # its own cache, kept: all but the last rows of a whole prefill
        assert got.cached_prompt_tokens >= got.prompt_tokens - 64 - 4
        list(m.generate(prompts[0], max_tokens=2))
        # prompt 0's own cache was dropped, but the shared system prompt lives in another slot
        assert 0 < m.metrics().cached_prompt_tokens < len(m.tokenize(prompts[0])) - 64
        assert len(m._kept) <= 2
    assert not m._kept  # close() drops them with the engine


def test_a_broken_stream_keeps_nothing_and_a_stopped_one_keeps_its_cache(model: LlamaCppModel) -> None:
    prompt = SYSTEM + "Question: " + QUESTIONS[2]
    ctx = ci.Context.background().with_cancel()
    with pytest.raises(ci.Cancelled):
        for i, _ in enumerate(model.generate(prompt + " (a)", max_tokens=40, ctx=ctx)):
            if i == 3:
                ctx.cancel()
    # the cancelled call's slot was emptied: nothing of it is reused ...
    list(model.generate(prompt + " (a)", max_tokens=1))
    assert model.metrics().cached_prompt_tokens <= len(model.tokenize(SYSTEM)) + 8
    # ... while a consumer that just stops reading (closing the stream) leaves it whole
    stream = model.generate(prompt + " (b)", max_tokens=40)
    next(stream)
    stream.close()
    list(model.generate(prompt + " (b)", max_tokens=1))
    assert model.metrics().cached_prompt_tokens > len(model.tokenize(prompt)) - 64 - 4


def test_one_cancelled_stream_leaves_the_others_as_they_are_alone(exact: LlamaCppModel) -> None:
    prompts = ["The capital of France is", "One plus one is", "A short poem about rain:"]
    alone = {p: ids(exact.generate(p, max_tokens=24)) for p in prompts}
    out: dict[str, list[int]] = {}
    ctx = ci.Context.background().with_cancel()
    errors: list[BaseException] = []

    def run(p: str) -> None:
        got: list[int] = []
        try:
            for i, t in enumerate(exact.generate(p, max_tokens=24, ctx=ctx if p == prompts[0] else None)):
                got.append(t.id)
                if p == prompts[0] and i == 4:
                    ctx.cancel()
        except ci.Cancelled as exc:
            errors.append(exc)
        out[p] = got

    threads = [threading.Thread(target=run, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errors) == 1 and out[prompts[0]] == alone[prompts[0]][:5]
    assert out[prompts[1]] == alone[prompts[1]] and out[prompts[2]] == alone[prompts[2]]
    assert exact._steps.stats.widest >= 2


def test_classify_decodes_a_shared_instruction_once(model: LlamaCppModel) -> None:
    sentences = ["I loved every minute of it.", "A dull, tedious mess.", "The best meal I have had.",
                 "Never again: rude staff and cold food.", "Wonderful, warm and funny."]
    prompts = [SYSTEM + "Review: " + s + "\nThe review is" for s in sentences]
    before = model.decode_calls
    shared = model.classify(prompts, return_logits=True)
    m = model.metrics()
    assert m.cached_prompt_tokens >= len(model.tokenize(SYSTEM)) * (len(prompts) - 1)
    # prefix, bodies, last positions: the instruction is not decoded five times
    assert model.decode_calls - before <= 3
    for p, res in zip(prompts, shared, strict=True):
        [alone] = model.classify([p], return_logits=True)
        assert res.err is None and res.logits is not None and alone.logits is not None
        # not bit for bit (other batch shapes), but within the noise that batch shapes make
        # anyway (docs/reliability.md: up to about 1.2 on this model)
        assert max(abs(a - b) for a, b in zip(res.logits, alone.logits, strict=True)) < 1.5


def test_a_long_classify_gives_a_concurrent_stream_its_turns(model_path: Path) -> None:
    """Found: a 1,000-token classify held the engine for seconds while a stream waited."""
    long = ["The quick brown fox jumps over the lazy dog. " * 100 + f"Case {i}." for i in range(4)]
    opts = {"prefix_cache": False}
    with LlamaCppBackend().load_model(model_path, parallel_slots=2, engine_options=opts) as m:
        done = threading.Event()
        during: list[int] = []

        def classify() -> None:
            m.classify(long)
            done.set()

        stream = m.generate("Count to fifty: one, two,", max_tokens=200)
        next(stream)
        worker = threading.Thread(target=classify)
        worker.start()
        for _ in stream:
            if done.is_set():
                break
            during.append(1)
        worker.join()
        stream.close()
        # about 8 classify decodes of 512 tokens; the stream gets a token between them
        assert len(during) >= 4, f"the stream got {len(during)} tokens during the classify"


@pytest.mark.parametrize("call", ["classify", "batch_generate"])
def test_classify_and_batch_generate_decode_in_the_streams_steps(model_path: Path, call: str) -> None:
    """Every decode of theirs is a work job of the streams' step loop, run after the
    streams' tokens of its step; with a stream running, they share steps with it."""
    prompts = ["The quick brown fox jumps over the lazy dog. " * 20 + f"Case {i}." for i in range(3)]
    with LlamaCppBackend().load_model(model_path, parallel_slots=2) as m:
        run: Callable[[], list[Any]] = (
            (lambda: m.classify(prompts)) if call == "classify"
            else (lambda: m.batch_generate(prompts, max_tokens=8))
        )
        alone = run()
        assert m._batch_ctx is not None
        stats, batch = m._steps.stats, m._batch_ctx
        work, decodes = stats.work, batch.decode_calls
        assert run() == alone
        # each of its decodes is a job (batch_generate's last one, with every prompt ended,
        # only hands out the last tokens: no decode)
        ran = batch.decode_calls - decodes
        assert 0 < ran <= stats.work - work <= ran + (call == "batch_generate")

        stream = m.generate("Count to fifty: one, two,", max_tokens=400)
        next(stream)
        got: list[list[Any]] = []
        worker = threading.Thread(target=lambda: got.append(run()))
        steps, work = stats.steps, stats.work
        worker.start()
        tokens = 0
        for _ in stream:
            tokens += 1
            if not worker.is_alive():
                break
        worker.join()
        stream.close()
        assert got == [alone]  # its own context: the stream beside it changes nothing
        ran = stats.work - work
        # the stream's tokens went on in the steps that ran the batch's decodes
        assert ran > 0 and tokens >= ran - 1
        # one step per stream token: fewer steps than tokens and work jobs means some held both
        assert stats.steps - steps < ran + tokens


@pytest.mark.parametrize("call", ["classify", "batch_generate"])
def test_a_deadline_stops_a_long_batch_inside_a_decode(model_path: Path, call: str) -> None:
    long = ["The quick brown fox jumps over the lazy dog. " * 100 + f"Case {i}." for i in range(3)]
    with LlamaCppBackend().load_model(model_path, engine_options={"prefix_cache": False}) as m:
        run: Callable[[ci.Context | None], object] = (
            (lambda c: m.classify(long, ctx=c)) if call == "classify"
            else (lambda c: m.batch_generate(long, max_tokens=4, ctx=c))
        )
        run(None)  # the batch context exists at its size: the count below is this call's
        before = m.decode_calls
        with pytest.raises(ci.DeadlineExceeded):
            run(ci.Context.background().with_timeout(0.2))
        # about 3,000 tokens need 6 decodes of 512; the running one was stopped inside llama.cpp
        assert m.decode_calls - before <= 2
        assert isinstance(run(None), list)  # and the model is fine afterwards


@pytest.mark.parametrize("call", ["classify", "batch_generate"])
def test_a_batch_cut_short_leaves_the_next_one_working(model_path: Path, call: str) -> None:
    """Found: a classify ended by its deadline between decodes left its sequences filled
    (a shared prefix in sequence 0, copies pending), and the next call's decode failed."""
    head = SYSTEM.split(". Keep")[0]  # a shared prefix past MIN_SHARED_PREFIX, the whole call
    prompts = [f"{head}. Question {i}:" for i in range(2)]  # under WATCH_PREFILL_OVER: not aborted
    with LlamaCppBackend().load_model(model_path) as m:
        assert len(m.tokenize(head)) >= 32 and sum(len(m.tokenize(p)) for p in prompts) <= 128
        run: Callable[[ci.Context | None], Any] = (
            (lambda c: m.classify(prompts, ctx=c)) if call == "classify"
            else (lambda c: m.batch_generate(prompts, max_tokens=4, ctx=c))
        )
        want = run(None)
        for _ in range(3):
            ctx = ci.Context.background().with_cancel()
            before = m.decode_calls
            canceller = threading.Thread(target=_cancel_after_a_decode, args=(m, ctx, before))
            canceller.start()
            with pytest.raises(ci.Cancelled):
                run(ctx)
            canceller.join()
            got = run(None)
            assert [r.err for r in got] == [None] * len(prompts)
            assert [r.tokens if call == "batch_generate" else r.token for r in got] == [
                r.tokens if call == "batch_generate" else r.token for r in want
            ]


def _cancel_after_a_decode(m: LlamaCppModel, ctx: ci.Context, before: int) -> None:
    while m.decode_calls == before:
        pass  # spin: cancel as soon as the first decode (the shared prefix) has run
    ctx.cancel()


def test_a_one_token_prompt_into_a_slot_that_kept_another_prompt(model_path: Path) -> None:
    # The prompt's only chunk is one token: it must still be a chunk that empties the
    # sequence first, not a decode beside the other streams' (llama.cpp refused the batch).
    with LlamaCppBackend().load_model(model_path, parallel_slots=1) as m:
        alone = ids(m.generate("", max_tokens=6))
        assert ids(m.generate("The capital of France is", max_tokens=6))
        assert ids(m.generate("", max_tokens=6)) == alone


def test_micro_batches_follow_llama_cpps_cut_of_a_decode() -> None:
    """``_micro_batches`` does what ``split_equal(sequential=true)`` does with a cache per
    sequence: runs of consecutive sequence ids, as many rows from each as the shortest has."""
    assert _micro_batches([(0, 1), (1, 1), (2, 1)], 512) == [{0: 1, 1: 1, 2: 1}]
    assert _micro_batches([(0, 1), (1, 1), (3, 1)], 512) == [{0: 1, 1: 1}, {3: 1}]  # a gap cuts
    assert _micro_batches([(0, 1), (1, 1), (2, 512)], 512) == [{0: 1, 1: 1, 2: 1}, {2: 511}]
    assert _micro_batches([(4, 8), (5, 10)], 512) == [{4: 8, 5: 8}, {5: 2}]
    assert _micro_batches([(0, 300), (1, 300)], 512) == [{0: 256, 1: 256}, {0: 44, 1: 44}]
    # batch_invariant lets a chunk ride only where each of its pieces has two rows or more
    assert not _whole_pieces([(0, 1), (1, 40)], {1}, 512)  # its first row beside a stream's
    assert _whole_pieces([(0, 1), (2, 40)], {2}, 512)  # a micro-batch of its own
    assert _whole_pieces([(4, 8), (5, 10)], {4, 5}, 512)
    assert not _whole_pieces([(4, 8), (5, 9)], {4, 5}, 512)  # one row left over


def test_a_free_sequence_between_streams_gets_a_filler_row_and_keeps_its_cache(model_path: Path) -> None:
    """Short streams end between long ones: the long ones' decodes stay one micro-batch (a filler
    row in each gap), and what the short ones' sequences kept is read again unharmed."""
    # the short ones' prompts long enough to be read again from the cache (_reuse_start), the
    # long ones' longer (a filler row only goes where the cache is no longer than a stream's)
    prompts = [SYSTEM + QUESTIONS[0], " ".join(QUESTIONS * 6), " ".join(reversed(QUESTIONS * 6)),
               SYSTEM + QUESTIONS[1]]
    lengths = [24, 2, 2, 24]
    with LlamaCppBackend().load_model(model_path, parallel_slots=4, context_len=1024) as m:
        out = one_after_another(m, prompts, lengths)
        assert [len(o) for o in out] == lengths
        assert m._steps.stats.filled > 0
        for i in (1, 2):
            again = ids(m.generate(prompts[i], max_tokens=2))
            assert m.metrics().cached_prompt_tokens > 0
            assert again == out[i]


def test_a_call_ending_inside_a_shared_decode_leaves_the_others_their_tokens(model_path: Path) -> None:
    """A long prompt's chunk and a short one's share a step's decode; the long one's call is
    cancelled inside it. That call gets ``Cancelled``; the step is decoded again without it, so
    the short prompt gets the token it gets alone, and its cache holds exactly its prompt."""
    from core_inference.backends.llama_cpp.steps import Job

    long = " ".join(f"Paragraph {i} says that the river is long and the valley is green." for i in range(40))
    short = "The capital of France is"
    cfg = ci.GenerateConfig(max_tokens=1)
    with LlamaCppBackend().load_model(model_path, parallel_slots=4, context_len=2048) as m:
        alone = ids(m.generate(short, max_tokens=1))
        llama, engine = m._ctx, m._engine
        long_ids, short_ids = m._tokenize(long)[:512], m._tokenize(short)
        cancel, keep = ci.Context.background().with_cancel(), ci.Context.background()
        samplers = [engine.Sampler(cfg, m._model.n_vocab) for _ in range(2)]
        try:
            with m._watch(cancel, True) as me:
                jobs = [Job(0, long_ids, 0, False, samplers[0], cancel, me, reset=True),
                        Job(1, short_ids, 0, True, samplers[1], keep, None, reset=True)]

                def cancel_inside() -> None:
                    while me not in m._armed:
                        time.sleep(0.001)
                    cancel.cancel()

                watcher = threading.Thread(target=cancel_inside)
                watcher.start()
                with m._engine_lock:
                    m._run_step([], jobs)
                watcher.join()
            assert isinstance(jobs[0].error, ci.Cancelled)
            assert jobs[1].error is None and jobs[1].token == alone[0]
            assert m._steps.stats.redone == 1  # they shared one decode, then went apart
            with m._engine_lock:
                assert llama.seq_length(1) == len(short_ids) and llama.seq_length(0) == 0
        finally:
            for s in samplers:
                s.free()
            with m._engine_lock:
                llama.clear_seq(0)
                llama.clear_seq(1)
