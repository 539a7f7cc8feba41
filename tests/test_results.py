"""The result per call, true metrics, token-exact stop handling, the async engine path, seeds."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core_inference import (
    Cancelled,
    Context,
    GenerateConfig,
    InferenceError,
    Message,
    Token,
    TokenStream,
)
from core_inference.backend import MetricsRecorder, Piece, TokenFinisher, engine_seed, finish_tokens
from core_inference.testing import AsyncFakeModel, FakeModel

PROMPT = "The quick brown fox"


def run(pieces: list[Piece], **kw: Any) -> tuple[list[Token], TokenFinisher, MetricsRecorder]:
    rec = MetricsRecorder()
    fin = TokenFinisher(GenerateConfig(**kw), rec)
    out = list(finish_tokens(iter(pieces), GenerateConfig(**kw), Context.background(), rec, None, fin))
    return out, fin, rec


# -- finish reasons ------------------------------------------------------------------


def test_finish_reasons_of_the_finisher() -> None:
    pieces: list[Piece] = [(1, b"a"), (2, b"b"), (3, b"c")]
    assert run(pieces, max_tokens=2)[1].finish_reason == "length"
    assert run(pieces, max_tokens=0)[1].finish_reason == "length"
    assert run(pieces)[1].finish_reason == "end_of_text"
    _, fin, _ = run(pieces, stop_tokens=[2])
    assert (fin.finish_reason, fin.stop) == ("stop", 2)
    _, fin, _ = run(pieces, stop=["bc", "zz"])
    assert (fin.finish_reason, fin.stop) == ("stop", "bc")


def test_context_full_is_what_the_engine_says() -> None:
    rec = MetricsRecorder()
    cfg = GenerateConfig()

    def engine() -> Iterator[Piece]:
        yield 1, b"a"
        rec.finish_reason = "context_full"  # no room for another token

    fin = TokenFinisher(cfg, rec)
    assert list(finish_tokens(engine(), cfg, Context.background(), rec, None, fin)) == [Token(1, "a")]
    assert fin.finish_reason == "context_full"


def test_a_stop_string_held_at_max_tokens_is_decided_then() -> None:
    toks, fin, _ = run([(1, b"ab"), (2, b"cx"), (3, b"yz")], stop=["xyz"], max_tokens=2)
    assert toks == [Token(1, "ab"), Token(2, "cx")] and fin.finish_reason == "length"
    toks, fin, _ = run([(1, b"ab"), (2, b"xy"), (3, b"z")], stop=["xy"], max_tokens=2)
    assert toks == [Token(1, "ab")] and (fin.finish_reason, fin.stop) == ("stop", "xy")


def test_a_stop_id_after_a_held_token_releases_it_whole() -> None:
    toks, fin, _ = run([(1, b"ab"), (2, b"x"), (9, b"")], stop=["xy"], stop_tokens=[9])
    assert toks == [Token(1, "ab"), Token(2, "x")] and (fin.finish_reason, fin.stop) == ("stop", 9)


# -- every token one engine token ------------------------------------------------------

_texts = st.lists(st.sampled_from(["a", "b", "x", "y", "ab", "xy", " ", "é", "🙂", "\n"]), max_size=12)


@settings(max_examples=300, deadline=None)
@given(_texts, st.lists(st.text(alphabet="abxy \n", min_size=1, max_size=3), min_size=1, max_size=3),
       st.integers(1, 14))
def test_stop_strings_yield_a_prefix_of_the_same_run(texts: list[str], stops: list[str], n: int) -> None:
    pieces: list[Piece] = []
    for i, text in enumerate(texts):  # split multi-byte characters over two tokens
        raw = text.encode()
        if len(raw) > 1 and i % 2:
            pieces += [(100 + i, raw[:1]), (200 + i, raw[1:])]
        else:
            pieces.append((100 + i, raw))
    full, _, _ = run(pieces, max_tokens=n)
    cut, fin, _ = run(pieces, max_tokens=n, stop=stops)
    ids = [t.id for t in cut]
    assert ids == [t.id for t in full[: len(cut)]]  # the engine's tokens, in order, none twice
    k = max(len(cut) - 1, 0)  # all but the last (which a stop may have cut) are whole
    assert [t.text for t in cut[:k]] == [t.text for t in full[:k]]
    text = "".join(t.text for t in full)
    hits = [text.find(s) for s in stops if s in text]
    want = text[: min(hits)] if hits else text
    assert "".join(t.text for t in cut) == want
    assert (fin.finish_reason == "stop") == bool(hits)


# -- the stream object -----------------------------------------------------------------


def test_stream_is_an_iterator_that_carries_its_result() -> None:
    with FakeModel() as model:
        stream = model.generate(PROMPT, max_tokens=4, stop=["lazy"])
        assert isinstance(stream, TokenStream) and stream.finish_reason is None
        assert next(stream).text
        rest = stream.text()
        assert stream.done and stream.err is None
        assert stream.finish_reason in ("length", "stop") and "lazy" not in rest
        assert stream.metrics.generated_tokens >= 1 and stream.prompt_tokens == 4
        assert repr(stream).startswith("<TokenStream")


def test_stream_result_after_an_engine_error() -> None:
    with FakeModel(fail_after=2) as model:
        stream = model.generate(PROMPT, max_tokens=10)
        with pytest.raises(InferenceError):
            list(stream)
        assert stream.finish_reason == "error" and stream.err is model.err()
        assert stream.metrics.generated_tokens == 2


def test_with_block_closes_the_stream_and_frees_the_slot() -> None:
    with FakeModel(parallel_slots=1) as model:
        with model.generate(PROMPT, max_tokens=1000) as stream:
            next(stream)
        assert stream.finish_reason == "cancelled"
        assert len(list(model.generate(PROMPT, max_tokens=2))) == 2


def test_batch_results_carry_their_own_result() -> None:
    with FakeModel() as model:
        results = model.batch_generate([PROMPT, "Hello there"], max_tokens=3, stop=["zzz"])
        assert [r.finish_reason for r in results] == ["length", "length"]
        assert [r.prompt_tokens for r in results] == [4, 2]
        assert all(r.metrics.generated_tokens == 3 for r in results)


# -- metrics that are true ---------------------------------------------------------------


def test_decode_speed_is_the_engines_not_the_consumers() -> None:
    with FakeModel(delay=0.002) as model:
        stream = model.generate(PROMPT, max_tokens=20)
        began = time.perf_counter()
        for _ in stream:
            time.sleep(0.02)  # a consumer ten times slower than the engine
        wall = time.perf_counter() - began
        m = stream.metrics
        assert m.total_duration == pytest.approx(wall, rel=0.2)
        assert m.decode_duration < wall / 3  # the consumer's 0.4 s are not the engine's
        assert m.decode_tokens_per_sec > 19 / (wall / 2)


def test_metrics_and_err_belong_to_the_calling_thread() -> None:
    with FakeModel(parallel_slots=2, delay=0.001) as model:
        seen: dict[str, Any] = {}

        def fail() -> None:
            with pytest.raises(Cancelled):
                ctx = Context.background().with_cancel()
                ctx.cancel()
                list(model.generate(PROMPT, ctx=ctx))
            seen["fail"] = (model.err(), model.metrics().generated_tokens)

        t = threading.Thread(target=fail)
        t.start()
        t.join(30)
        assert len(list(model.generate(PROMPT, max_tokens=5))) == 5
        assert model.err() is None and model.metrics().generated_tokens == 5
        assert isinstance(seen["fail"][0], Cancelled) and seen["fail"][1] == 0


# -- the async engine path ---------------------------------------------------------------


def test_an_async_engine_serves_the_sync_api_without_a_thread_per_token() -> None:
    with AsyncFakeModel() as model:
        list(model.generate(PROMPT, max_tokens=2))  # the engine loop starts once
        before = threading.active_count()
        counts = []
        for _tok in model.generate(PROMPT, max_tokens=200):
            counts.append(threading.active_count())
        assert len(counts) == 200 and max(counts) == before
        assert [t.id for t in model.generate(PROMPT, max_tokens=8)] == [
            t.id for t in FakeModel().generate(PROMPT, max_tokens=8)
        ]


def test_an_async_engine_streams_on_the_callers_loop() -> None:
    with AsyncFakeModel() as model:

        async def go() -> tuple[list[Token], str | None]:
            stream = model.agenerate(PROMPT, max_tokens=5)
            return [t async for t in stream], stream.finish_reason

        tokens, reason = asyncio.run(go())
        assert len(tokens) == 5 and reason == "length"


def test_cancelling_a_wait_on_an_async_engine() -> None:
    with AsyncFakeModel(delay=0.05) as model:
        ctx = Context.background().with_timeout(0.2)
        began = time.monotonic()
        with pytest.raises(InferenceError):
            list(model.generate(PROMPT, max_tokens=10_000, ctx=ctx))
        assert time.monotonic() - began < 5


def test_closing_an_async_engine_model_stops_its_loop() -> None:
    model = AsyncFakeModel()
    list(model.generate(PROMPT, max_tokens=2))
    loop_threads = [t for t in threading.enumerate() if "loop" in t.name]
    assert loop_threads
    model.close()
    assert all(not t.is_alive() for t in loop_threads)


# -- validation at the call ---------------------------------------------------------------


def test_async_calls_validate_when_called() -> None:
    with FakeModel() as model:
        with pytest.raises(ValueError):
            model.agenerate(PROMPT, max_tokens=-1)
        with pytest.raises(TypeError, match=r"messages\[1\]"):
            model.achat([Message("user", "hi"), 42])  # type: ignore[list-item]
        with pytest.raises(TypeError, match="unknown"):
            model.achat([Message("user", "hi")], bogus=1)


def test_a_message_that_is_not_a_message_is_a_clear_type_error() -> None:
    with FakeModel() as model, pytest.raises(TypeError, match=r"messages\[0\].*Message"):
        model.chat(["hello"])  # type: ignore[list-item]


# -- seeds ---------------------------------------------------------------------------------


def test_seeds_are_hashed_to_the_engines_width() -> None:
    assert engine_seed(5) == engine_seed(5)
    assert engine_seed(5) != engine_seed(2**32 + 5)
    assert len({engine_seed(s) for s in range(10_000)}) > 9_980  # no aliasing in practice
    assert all(engine_seed(s) != 0xFFFFFFFF for s in (0xFFFFFFFF, 2**64 - 1, 0))
    assert all(0 <= engine_seed(s, 64) < 2**64 - 1 for s in (0, 1, 2**70))


# -- interpreter exit ----------------------------------------------------------------------


def test_a_stream_left_open_at_exit_prints_nothing() -> None:
    code = (
        "from core_inference.testing import FakeModel\n"
        "m = FakeModel()\n"
        "s = m.generate('a b c', max_tokens=100)\n"
        "next(s)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    assert "LookupError" not in out.stderr and "Traceback" not in out.stderr, out.stderr
