"""The shared streaming helpers: whole UTF-8, stop strings, finish_tokens, slots."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core_inference import (
    Cancelled,
    Context,
    DeadlineExceeded,
    GenerateConfig,
    InferenceError,
    ModelClosed,
    Token,
)
from core_inference.streaming import (
    MetricsRecorder,
    Piece,
    SlotQueue,
    StopMatcher,
    Utf8Holdback,
    finish_tokens,
)

SAMPLES = ["🙂", "你好", "naïve café", "a🙂b你c", "👩‍👩‍👧 family", "€100 ∑ ok", "日本語のテキスト🎌"]


# -- Utf8Holdback ------------------------------------------------------------------


@pytest.mark.parametrize("text", SAMPLES)
def test_utf8_split_at_every_byte_boundary(text: str) -> None:
    data = text.encode()
    for cut in range(len(data) + 1):
        dec = Utf8Holdback()
        first = dec.feed(data[:cut])
        second = dec.feed(data[cut:])
        assert "\ufffd" not in first + second
        assert first + second + dec.flush() == text
        # what the first piece completes is exactly the whole characters inside it
        assert first == data[:cut].decode("utf-8", "ignore")


@pytest.mark.parametrize("text", SAMPLES)
def test_utf8_one_byte_per_piece(text: str) -> None:
    dec = Utf8Holdback()
    out = [dec.feed(bytes([b])) for b in text.encode()]
    assert "".join(out) == text
    assert all(piece == "" or piece in text for piece in out)
    assert dec.flush() == ""


@pytest.mark.parametrize("text", SAMPLES)
def test_utf8_split_into_three_pieces(text: str) -> None:
    data = text.encode()
    for i in range(len(data) + 1):
        for j in range(i, len(data) + 1):
            dec = Utf8Holdback()
            parts = [dec.feed(data[:i]), dec.feed(data[i:j]), dec.feed(data[j:])]
            assert "".join(parts) == text


def test_utf8_incomplete_tail_flushes_as_replacement() -> None:
    dec = Utf8Holdback()
    assert dec.feed("🙂".encode()[:2]) == ""
    assert dec.flush() == "\ufffd"


# -- StopMatcher -------------------------------------------------------------------


def run_matcher(stops: list[str], pieces: list[str]) -> tuple[str, bool, list[str]]:
    m = StopMatcher(stops)
    out: list[str] = []
    for piece in pieces:
        text, hit = m.feed(piece)
        out.append(text)
        if hit:
            return "".join(out), True, out
    text, hit = m.flush()
    out.append(text)
    return "".join(out), hit, out


def test_stop_string_split_over_two_pieces() -> None:
    text, hit, out = run_matcher(["</s>"], ["Hello </", "s> never"])
    assert (text, hit) == ("Hello ", True)
    assert out[0] == "Hello "  # "</" was held back


def test_stop_string_split_over_three_pieces() -> None:
    text, hit, out = run_matcher(["<|im_end|>"], ["Yes.<|im", "_e", "nd|>tail"])
    assert (text, hit) == ("Yes.", True)
    assert out == ["Yes.", "", ""]


def test_a_stop_held_behind_a_longer_one_is_a_hit_at_the_end() -> None:
    # found by hypothesis: "a#" is held (it may be the start of "a#a"); the stream ends
    assert run_matcher(["#", "a#a"], ["a#"])[:2] == ("a", True)


def test_held_prefix_is_released_when_no_stop_follows() -> None:
    m = StopMatcher(["###"])
    assert m.feed("a#") == ("a", False)
    assert m.feed("#") == ("", False)
    assert m.feed("b") == ("##b", False)
    assert m.flush() == ("", False)
    text, hit, _ = run_matcher(["###"], ["x", "##"])
    assert (text, hit) == ("x##", False)  # held to the end, then flushed


def test_earliest_of_several_stops_wins() -> None:
    assert run_matcher(["world", "lo w"], ["hello world"])[:2] == ("hel", True)
    assert run_matcher(["lo w", "world"], ["hel", "lo wor", "ld"])[:2] == ("hel", True)
    # a longer stop still pending must not hide a shorter one completed inside it
    assert run_matcher(["abcde", "cd"], ["abc", "dx"])[:2] == ("ab", True)


def test_stop_at_the_very_start() -> None:
    assert run_matcher(["STOP"], ["STOP now"])[:2] == ("", True)


@settings(max_examples=300, deadline=None)
@given(
    text=st.text(alphabet="ab#\n🙂", max_size=30),
    stops=st.lists(st.text(alphabet="ab#\n🙂", min_size=1, max_size=4), min_size=1, max_size=3),
    cuts=st.lists(st.integers(min_value=0, max_value=30), max_size=6),
)
def test_stop_matcher_equals_cutting_the_whole_text(text: str, stops: list[str], cuts: list[int]) -> None:
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    pieces = [text[a:b] for a, b in itertools.pairwise(bounds)]
    hits = [i for i in (text.find(s) for s in stops) if i != -1]
    expected = text[: min(hits)] if hits else text
    got, hit, _ = run_matcher(stops, pieces)
    assert hit == bool(hits)
    assert got == expected


# -- finish_tokens -----------------------------------------------------------------


class Source:
    """A raw engine stream that counts how far it was pulled."""

    def __init__(self, pieces: list[Piece], forever: bool = False) -> None:
        self.pieces = pieces
        self.forever = forever
        self.pulled = 0

    def __iter__(self) -> Iterator[Piece]:
        i = 0
        while i < len(self.pieces) or self.forever:
            self.pulled += 1
            yield self.pieces[i % len(self.pieces)]
            i += 1


def finish(pieces: Any, ctx: Context | None = None, closed: threading.Event | None = None,
           rec: MetricsRecorder | None = None, **kw: Any) -> list[Token]:
    return list(finish_tokens(iter(pieces), GenerateConfig(**kw), ctx or Context.background(),
                              rec or MetricsRecorder(), closed))


def test_max_tokens_stops_pulling_the_engine() -> None:
    src = Source([(1, b"a")], forever=True)
    rec = MetricsRecorder()
    toks = finish(src, rec=rec, max_tokens=3)
    assert toks == [Token(1, "a")] * 3
    assert src.pulled == 3
    assert rec.generated_tokens == 3 and rec.first_token > 0


def test_max_tokens_zero_yields_nothing_and_pulls_nothing() -> None:
    src = Source([(1, b"a")], forever=True)
    assert finish(src, max_tokens=0) == []
    assert src.pulled == 0


def test_stop_ids_end_the_stream_and_are_not_yielded() -> None:
    src = Source([(1, b"a"), (2, b"b"), (9, b"<eos>"), (3, b"c")])
    rec = MetricsRecorder()
    toks = finish(src, rec=rec, stop_tokens=[9, 8])
    assert toks == [Token(1, "a"), Token(2, "b")]
    assert src.pulled == 3 and rec.generated_tokens == 2


def test_split_character_is_held_back_and_ids_are_kept() -> None:
    smile = "🙂".encode()
    toks = finish([(5, b"hi "), (6, smile[:1]), (7, smile[1:3]), (8, smile[3:] + b"!")])
    assert [t.id for t in toks] == [5, 6, 7, 8]
    assert [t.text for t in toks] == ["hi ", "", "", "🙂!"]


def test_str_pieces_pass_through() -> None:
    assert finish([(1, "x"), (2, "y")]) == [Token(1, "x"), Token(2, "y")]


def test_stop_string_across_tokens() -> None:
    pieces = [(1, b"The "), (2, b"answer<"), (3, b"|"), (4, b"end|>"), (5, b" more")]
    toks = finish(pieces, stop=["<|end|>"])
    assert "".join(t.text for t in toks) == "The answer"
    assert all(t.id in (1, 2) for t in toks if t.text)


def test_stop_string_prefix_released_at_end_of_stream() -> None:
    toks = finish([(1, b"a"), (2, b"b#")], stop=["##"])
    assert "".join(t.text for t in toks) == "ab#"
    assert toks == [Token(1, "a"), Token(2, "b#")]  # the held token comes whole, once


def test_stop_string_prefix_released_at_max_tokens_without_an_extra_token() -> None:
    toks = finish([(1, b"ab"), (2, b"cx"), (3, b"yz")], stop=["xyz"], max_tokens=2)
    assert len(toks) <= 2
    assert "".join(t.text for t in toks) == "abcx"


def test_cancel_between_tokens() -> None:
    ctx = Context.background().with_cancel()
    src = Source([(1, b"a")], forever=True)
    got = []
    gen = finish_tokens(iter(src), GenerateConfig(max_tokens=1000), ctx, MetricsRecorder())
    with pytest.raises(Cancelled):
        for tok in gen:
            got.append(tok)
            if len(got) == 2:
                ctx.cancel()
    assert len(got) == 2


def test_deadline_already_past_ends_before_the_first_token() -> None:
    import time

    ctx = Context.background().with_deadline(time.monotonic() - 1)
    with pytest.raises(DeadlineExceeded):
        finish([(1, b"a")], ctx=ctx)


def test_closed_event_ends_the_stream_with_model_closed() -> None:
    closed = threading.Event()
    got = []
    gen = finish_tokens(iter(Source([(1, b"a")], forever=True)), GenerateConfig(max_tokens=100),
                        Context.background(), MetricsRecorder(), closed)
    with pytest.raises(ModelClosed):
        for tok in gen:
            got.append(tok)
            if len(got) == 3:
                closed.set()
    assert len(got) == 3


def test_metrics_recorder_finish() -> None:
    rec = MetricsRecorder()
    rec.prefill_done(10)
    rec.generated_tokens = 4
    m = rec.finish()
    assert m.prompt_tokens == 10 and m.generated_tokens == 4
    assert m.total_duration >= m.prefill_duration >= 0 and m.decode_duration >= 0
    assert m.total_duration == pytest.approx(m.prefill_duration + m.decode_duration)
    empty = MetricsRecorder().finish()
    assert empty.prompt_tokens == 0 and empty.prefill_tokens_per_sec >= 0


# -- SlotQueue ---------------------------------------------------------------------


def test_slot_queue_size_is_at_least_one() -> None:
    assert SlotQueue(0).size == 1
    assert SlotQueue(3).size == 3


def _acquire_in_thread(q: SlotQueue, ctx: Context, closed: threading.Event) -> tuple[
    threading.Thread, threading.Event, list[BaseException]
]:
    got = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            q.acquire(ctx, closed)
            got.set()
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=run)
    t.start()
    return t, got, errors


def test_slot_queue_waits_for_a_release() -> None:
    q, closed, bg = SlotQueue(1), threading.Event(), Context.background()
    q.acquire(bg, closed)
    t, got, errors = _acquire_in_thread(q, bg, closed)
    assert not got.wait(0.1)  # still waiting: the only slot is taken
    q.release()
    assert got.wait(10)
    t.join()
    assert not errors
    q.release()


def test_slot_queue_holds_n_at_once() -> None:
    q, closed, bg = SlotQueue(2), threading.Event(), Context.background()
    q.acquire(bg, closed)
    q.acquire(bg, closed)  # the second slot: no wait
    t, got, _ = _acquire_in_thread(q, bg, closed)
    assert not got.wait(0.05)
    q.release()
    assert got.wait(10)
    t.join()


def test_slot_queue_wait_is_cancelled_by_context() -> None:
    q, closed = SlotQueue(1), threading.Event()
    q.acquire(Context.background(), closed)
    ctx = Context.background().with_cancel()
    t, got, errors = _acquire_in_thread(q, ctx, closed)
    ctx.cancel()
    t.join(10)
    assert not t.is_alive() and not got.is_set()
    assert len(errors) == 1 and isinstance(errors[0], Cancelled)


def test_slot_queue_wait_ends_at_deadline() -> None:
    q, closed = SlotQueue(1), threading.Event()
    q.acquire(Context.background(), closed)
    t, got, errors = _acquire_in_thread(q, Context.background().with_timeout(0.05), closed)
    t.join(10)
    assert not got.is_set() and len(errors) == 1 and isinstance(errors[0], DeadlineExceeded)


def test_slot_queue_refuses_a_thread_that_holds_every_slot() -> None:
    q, closed = SlotQueue(2), threading.Event()
    q.acquire(Context.background(), closed)
    q.acquire(Context.background(), closed)
    with pytest.raises(InferenceError, match="already holds all 2"):
        q.acquire(Context.background(), closed)  # would wait for itself forever
    q.release()
    q.acquire(Context.background(), closed)  # one given back: no error, no wait


def test_slot_queue_wait_ends_when_the_model_closes() -> None:
    q, closed = SlotQueue(1), threading.Event()
    q.acquire(Context.background(), closed)
    t, got, errors = _acquire_in_thread(q, Context.background(), closed)
    closed.set()
    t.join(10)
    assert not t.is_alive() and not got.is_set()
    assert len(errors) == 1 and isinstance(errors[0], ModelClosed)
