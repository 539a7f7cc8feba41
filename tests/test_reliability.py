"""Reliability on the real engine and the embedded default model.

Bad arguments give a clear error or a defined result, never an engine crash or a
hang; a storm of cancelled generations leaks nothing; many threads on one model get
exactly the answers they would get alone; ``close()`` from another thread ends a
stream within one token; a dropped model is freed by the garbage collector.

The long versions are ``stress/storm.py`` and ``stress/concurrency.py``; the short ones
here import the same code. Every model here runs llama.cpp on one thread: on a
machine other work shares, more threads than free cores spin-wait and run far slower.
"""

from __future__ import annotations

import asyncio
import gc
import importlib.util
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, cast

import pytest

import core_inference as ci
from core_inference import ContextLengthExceeded, InferenceError, ModelClosed

if TYPE_CHECKING:
    from core_inference.backends.llama_cpp.model import LlamaCppModel

pytest.importorskip("llama_cpp")

STRESS = Path(__file__).resolve().parents[1] / "stress"
PROMPT = "The capital of France is"
LONG = "word " * 300  # about 300 tokens
CHAT = [{"role": "user", "content": "Hi"}]
MiB = 1 << 20


def stress_module(name: str) -> ModuleType:
    """Import ``stress/<name>.py`` (not a package) so the suite runs the stress script's own code."""
    spec = importlib.util.spec_from_file_location(f"_stress_{name}", STRESS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def texts(tokens: Any) -> str:
    return "".join(t.text for t in tokens)


UNSHARED = {"shared_decode": False, "prefix_cache": False}


@pytest.fixture(scope="module")
def model(default_model_file: Path) -> Iterator[Any]:
    m = ci.load_model(default_model_file, parallel_slots=4, threads=1)
    yield m
    m.close()


@pytest.fixture(scope="module")
def small(default_model_file: Path) -> Iterator[Any]:
    """A 128-token context: long prompts are cheap to build."""
    m = ci.load_model(default_model_file, context_len=128, parallel_slots=2, threads=1)
    yield m
    m.close()


async def _collect(stream: Any) -> list[ci.Token]:
    return [t async for t in stream]


def call(model: Any, api: str, prompt: str = PROMPT, **kw: Any) -> Any:
    """One call through the public API, consumed to the end."""
    if api == "generate":
        return list(model.generate(prompt, **kw))
    if api == "chat":
        return list(model.chat([{"role": "user", "content": prompt}], **kw))
    if api == "classify":
        return model.classify([prompt], **kw)
    if api == "batch_generate":
        return model.batch_generate([prompt], **kw)
    if api == "agenerate":
        return asyncio.run(_collect(model.agenerate(prompt, **kw)))
    if api == "achat":
        return asyncio.run(_collect(model.achat([{"role": "user", "content": prompt}], **kw)))
    if api == "aclassify":
        return asyncio.run(model.aclassify([prompt], **kw))
    if api == "abatch_generate":
        return asyncio.run(model.abatch_generate([prompt], **kw))
    raise ValueError(api)


APIS = [
    "generate", "chat", "classify", "batch_generate", "agenerate", "achat", "aclassify", "abatch_generate"
]

# -- 2. bad arguments ---------------------------------------------------------------------

BAD_OPTIONS: list[tuple[dict[str, Any], type[Exception], str]] = [
    ({"max_tokens": -1}, ValueError, "max_tokens"),
    ({"max_tokens": 1.5}, TypeError, "max_tokens"),
    ({"max_tokens": "8"}, TypeError, "max_tokens"),
    ({"max_tokens": True}, TypeError, "max_tokens"),
    ({"max_tokens": None}, TypeError, "max_tokens"),
    ({"temperature": -0.1}, ValueError, "temperature"),
    ({"temperature": float("nan")}, ValueError, "temperature"),
    ({"temperature": float("inf")}, ValueError, "temperature"),
    ({"temperature": 1e9}, ValueError, "temperature"),
    ({"temperature": "hot"}, TypeError, "temperature"),
    ({"temperature": None}, TypeError, "temperature"),
    ({"top_k": -1}, ValueError, "top_k"),
    ({"top_k": 2.5}, TypeError, "top_k"),
    ({"top_k": "5"}, TypeError, "top_k"),
    ({"top_p": -0.1}, ValueError, "top_p"),
    ({"top_p": 1.5}, ValueError, "top_p"),
    ({"top_p": float("nan")}, ValueError, "top_p"),
    ({"top_p": "x"}, TypeError, "top_p"),
    ({"stop_tokens": 5}, TypeError, "stop_tokens"),
    ({"stop_tokens": "a"}, TypeError, "stop_tokens"),
    ({"stop_tokens": [1.5]}, TypeError, "stop_tokens"),
    ({"stop_tokens": [True]}, TypeError, "stop_tokens"),
    ({"stop": [""]}, ValueError, "stop"),
    ({"stop": [3]}, TypeError, "stop"),
    ({"stop": 3}, TypeError, "stop"),
    ({"repeat_penalty": -1.0}, ValueError, "repeat_penalty"),
    ({"repeat_penalty": float("nan")}, ValueError, "repeat_penalty"),
    ({"repeat_penalty": float("inf")}, ValueError, "repeat_penalty"),
    ({"repeat_penalty": 1e6}, ValueError, "repeat_penalty"),
    ({"repeat_penalty": "x"}, TypeError, "repeat_penalty"),
    ({"return_logits": 1}, TypeError, "return_logits"),
    ({"return_logits": "yes"}, TypeError, "return_logits"),
    ({"seed": -1}, ValueError, "seed"),
    ({"seed": 1.5}, TypeError, "seed"),
    ({"seed": "7"}, TypeError, "seed"),
    ({"bogus": 1}, TypeError, "bogus"),
    ({"max_token": 8}, TypeError, "max_token"),
]


@pytest.mark.parametrize(("kw", "exc", "field"), BAD_OPTIONS, ids=lambda v: repr(v)[:30])
def test_bad_option_is_a_clear_error_on_every_api(
    model: Any, kw: dict[str, Any], exc: type, field: str
) -> None:
    before = model.decode_calls
    for api in APIS:
        with pytest.raises(exc, match=field):
            call(model, api, **kw)
    assert model.decode_calls == before, "the engine ran for a call with a bad option"


def test_bad_option_raises_at_call_time_not_at_first_token(model: Any) -> None:
    with pytest.raises(ValueError, match="max_tokens"):
        model.generate(PROMPT, max_tokens=-1)  # not iterated: raised by the call itself
    with pytest.raises(ValueError, match="temperature"):
        model.chat(CHAT, ci.with_temperature(-1.0))
    with pytest.raises(TypeError, match="expected an option"):
        model.generate(PROMPT, 42)


EXTREME_BUT_VALID: list[dict[str, Any]] = [
    {"max_tokens": 2**63},
    {"temperature": 100.0, "seed": 1},
    {"temperature": 1e-30, "seed": 1},
    {"temperature": 1.0, "top_k": 10**9, "seed": 1},
    {"temperature": 1.0, "top_p": 1e-30, "seed": 1},
    {"temperature": 1.0, "top_p": 1.0, "top_k": 1, "seed": 1},
    {"repeat_penalty": 100.0},
    {"repeat_penalty": 1e-30},
    {"stop_tokens": [10**12, -1, 0]},
    {"stop": ["\x00", "🦙" * 50]},
    {"temperature": 1.0, "seed": 2**70},
]


@pytest.mark.parametrize("kw", EXTREME_BUT_VALID, ids=lambda v: repr(v)[:40])
def test_extreme_but_valid_options_give_a_result(small: Any, kw: dict[str, Any]) -> None:
    capped = {**kw, "max_tokens": min(kw.get("max_tokens", 3), 3)}
    assert 0 < len(list(small.generate(PROMPT, **capped))) <= 3
    [res] = small.batch_generate([PROMPT], **capped)
    assert res.err is None and 0 < len(res.tokens) <= 3
    if kw.get("max_tokens") == 2**63:  # bounded by the context, not by max_tokens
        n = len(list(small.generate(LONG[:400], max_tokens=2**63)))
        assert 0 < n <= 128


def test_empty_prompt_generates_from_bos_only(model: Any) -> None:
    tokens = list(model.generate("", max_tokens=4))
    assert tokens and all(isinstance(t, ci.Token) for t in tokens)
    assert model.metrics().prompt_tokens == 1  # <bos> alone
    assert model.err() is None
    [res] = model.batch_generate([""], max_tokens=4)
    assert res.err is None and res.tokens
    [cls] = model.classify([""])
    assert cls.token.id == tokens[0].id
    assert asyncio.run(_collect(model.agenerate("", max_tokens=4))) == tokens


def test_empty_lists(model: Any) -> None:
    before = model.decode_calls
    assert model.classify([]) == []
    assert model.batch_generate([]) == []
    assert asyncio.run(model.aclassify([])) == []
    assert asyncio.run(model.abatch_generate([])) == []
    assert model.decode_calls == before


@pytest.mark.parametrize(
    ("messages", "exc", "needle"),
    [
        ([], ValueError, "conversation is empty"),
        ((), ValueError, "conversation is empty"),
        ("Hi", TypeError, "messages"),
        (None, TypeError, "messages"),
        ([{"role": "bot", "content": "x"}], ValueError, "unknown role 'bot'"),
        ([{"role": "User", "content": "x"}], ValueError, "unknown role"),
        ([{"role": "tool", "content": "x"}], ValueError, "unknown role"),
        ([{"role": "user"}], ValueError, "content"),
        ([{"content": "x"}], ValueError, "role"),
        ([{"role": "user", "content": 5}], TypeError, "content"),
        ([{"role": "user", "content": None}], TypeError, "content"),
    ],
    ids=lambda v: repr(v)[:30],
)
def test_bad_conversations(model: Any, messages: Any, exc: type, needle: str) -> None:
    before = model.decode_calls
    with pytest.raises(exc, match=needle):
        model.chat(messages)
    with pytest.raises(exc, match=needle):
        asyncio.run(_collect(model.achat(messages)))
    assert model.decode_calls == before


def test_odd_but_valid_conversations(model: Any) -> None:
    for messages in (
        [{"role": "user", "content": ""}],
        [{"role": "system", "content": "Be brief."}],
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
        [ci.Message("user", "a\x00b")],
    ):
        assert len(list(model.chat(messages, max_tokens=3))) <= 3
        assert model.err() is None


@pytest.mark.parametrize("bad", ["Hi", [1], [None], [b"x"], None, 5])
def test_bad_prompt_lists(model: Any, bad: Any) -> None:
    with pytest.raises(TypeError, match="prompts"):
        model.classify(bad)
    with pytest.raises(TypeError, match="prompts"):
        model.batch_generate(bad)


@pytest.mark.parametrize("bad", [None, b"Hi", 5, ["Hi"]])
def test_bad_prompt_type(model: Any, bad: Any) -> None:
    with pytest.raises(TypeError, match="prompt"):
        model.generate(bad)
    with pytest.raises(TypeError, match="prompt"):
        asyncio.run(_collect(model.agenerate(bad)))


def test_prompt_that_is_not_encodable(model: Any) -> None:
    bad = "a\ud800b"  # a lone surrogate cannot be UTF-8
    with pytest.raises(ValueError):
        list(model.generate(bad))
    assert isinstance(model.err(), ValueError)
    [res, ok] = model.batch_generate([bad, PROMPT], max_tokens=2)
    assert isinstance(res.err, ValueError) and ok.err is None and ok.tokens
    assert list(model.generate(PROMPT, max_tokens=2))  # the model is fine afterwards


@pytest.mark.parametrize("api", ["generate", "chat", "classify", "agenerate", "achat", "aclassify"])
def test_prompt_longer_than_context_fails_before_any_compute(small: Any, api: str) -> None:
    before = small.decode_calls
    if api in ("classify", "aclassify"):  # a classify result carries its own prompt's failure
        [result] = call(small, api, LONG)
        exc = result.err
        assert isinstance(exc, ContextLengthExceeded) and result.finish_reason == "error"
    else:
        with pytest.raises(ContextLengthExceeded) as info:
            call(small, api, LONG)
        exc = info.value
        assert isinstance(small.err(), ContextLengthExceeded) or api.startswith("a")
    assert exc.limit == 128 and exc.requested > 128
    assert exc.context_len == 128 and exc.prompt_tokens > 128  # the names before 0.2
    assert small.decode_calls == before, "the engine decoded part of a prompt that cannot fit"


def test_prompt_longer_than_context_in_a_batch_sinks_only_itself(small: Any) -> None:
    results = small.batch_generate([PROMPT, LONG, "One plus one is"], max_tokens=3)
    assert isinstance(results[1].err, ContextLengthExceeded)
    assert results[0].err is None and results[2].err is None
    assert results[0].tokens and results[2].tokens


def test_prompt_that_just_fits_leaves_room_for_one_token(small: Any) -> None:
    prompt = "word" + " word" * 125  # <bos>, "word", 125 x " word": 127 tokens
    assert len(small._model.tokenize(prompt, add_special=True)) == 127
    with pytest.raises(ContextLengthExceeded):  # one more, and there is no room to generate
        list(small.generate(prompt + " word"))
    assert len(list(small.generate(prompt, max_tokens=50))) == 1


@pytest.mark.parametrize("api", ["generate", "chat", "batch_generate", "agenerate", "achat"])
def test_max_tokens_zero_is_an_empty_result(model: Any, api: str) -> None:
    before = model.decode_calls
    out = call(model, api, max_tokens=0)
    if api == "batch_generate":
        assert [r.tokens for r in out] == [()] and out[0].finish_reason == "length"
    else:
        assert out == []
    assert model.decode_calls == before  # nothing to generate: the engine never runs
    assert model.err() is None or api.startswith("a")


def test_batch_generate_with_huge_max_tokens_is_bounded_by_the_context(small: Any) -> None:
    """Found here: batch_generate sized its KV cache by max_tokens, beyond the context
    (max_tokens=100_000 ran for minutes; 2**63 overflowed llama.cpp's uint32 n_ctx)."""
    for max_tokens in (100_000, 2**63):
        [res] = small.batch_generate(["Count: 1, 2, 3,"], max_tokens=max_tokens)
        assert res.err is None and 0 < len(res.tokens) <= 128
        assert small._batch_ctx.per_seq <= 256


def test_batch_generate_of_many_prompts(small: Any) -> None:
    """Found here: more prompts than llama.cpp's sequence limit (256) failed the whole batch."""
    results = small.batch_generate(["Hi"] * 300, max_tokens=2)
    assert len(results) == 300
    assert all(r.err is None and 0 < len(r.tokens) <= 2 for r in results)
    assert len({r.text for r in results[:64]}) == 1


BAD_LOAD: list[tuple[dict[str, Any], type[Exception], str]] = [
    ({"context_len": -1}, ValueError, "context_len"),
    ({"context_len": "5"}, TypeError, "context_len"),
    ({"context_len": 1.5}, TypeError, "context_len"),
    ({"parallel_slots": -1}, ValueError, "parallel_slots"),
    ({"threads": -1}, ValueError, "threads"),
    ({"gpu_layers": -2}, ValueError, "gpu_layers"),
    ({"backend": 5}, TypeError, "backend"),
    ({"backend": "nope"}, ci.BackendNotRegistered, "nope"),
    ({"engine_options": "x"}, TypeError, "engine_options"),
    ({"bogus": 1}, TypeError, "bogus"),
    ({"context_len": 2**33}, ValueError, "context_len"),
    ({"engine_options": {"prefill_chunk": "x"}}, ValueError, "prefill_chunk"),
]


@pytest.mark.parametrize(("kw", "exc", "needle"), BAD_LOAD, ids=lambda v: repr(v)[:30])
def test_bad_load_options(default_model_file: Path, kw: dict[str, Any], exc: type, needle: str) -> None:
    with pytest.raises(exc, match=needle):
        ci.load_model(default_model_file, **kw)


def test_tiny_and_odd_load_options_give_a_working_model(default_model_file: Path) -> None:
    for kw in ({"context_len": 1}, {"engine_options": {"prefill_chunk": 0}}, {"threads": 64}):
        with ci.load_model(default_model_file, **kw) as m:
            if kw.get("context_len") == 1:
                with pytest.raises(ContextLengthExceeded):
                    list(m.generate(PROMPT))
            else:
                assert list(m.generate(PROMPT, max_tokens=2))


def test_failed_load_frees_what_it_made(default_model_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found here: a load that failed after the weights were read leaked them (~290 MB each)
    and its half-built model's __del__ raised AttributeError ('no attribute _batch_ctx')."""
    unraisable: list[Any] = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    gc.collect()
    before = rss()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            with pytest.raises(InferenceError, match="context"):  # more sequences than llama.cpp allows
                ci.load_model(default_model_file, parallel_slots=300, threads=1)
            gc.collect()
    grown = rss() - before
    assert unraisable == [], [u.exc_value for u in unraisable]
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]
    assert grown < 150 * MiB, f"RSS grew {grown / MiB:.0f} MiB over 3 failed loads"


# -- 4. concurrency -----------------------------------------------------------------------


def test_concurrent_batch_calls_do_not_mix(model: Any) -> None:
    """Found here: classify and batch_generate shared one batch context without a lock, so
    concurrent calls overwrote each other's sequences (mixed outputs, llama_decode errors)."""
    lists = [[PROMPT, "One plus one is"], ["The sky is", "Hello, my name", "Dogs are"]]
    ref_batch = [[r.text for r in model.batch_generate(p, max_tokens=6)] for p in lists]
    ref_cls = [[r.token.id for r in model.classify(p)] for p in lists]
    bad: list[str] = []

    def work(w: int) -> None:
        for k in range(3):
            i = (w + k) % 2
            try:
                if (w + k) % 3 == 0:
                    got_c = [r.token.id for r in model.classify(lists[i])]
                    if got_c != ref_cls[i]:
                        bad.append(f"classify {i}: {got_c}")
                else:
                    results = model.batch_generate(lists[i], max_tokens=6)
                    got_b = [r.text if r.err is None else repr(r.err) for r in results]
                    if got_b != ref_batch[i]:
                        bad.append(f"batch {i}: {got_b}")
            except Exception as exc:
                bad.append(repr(exc))

    pool = [threading.Thread(target=work, args=(w,)) for w in range(4)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    assert bad == []


@pytest.fixture(scope="module")
def unshared(default_model_file: Path) -> Iterator[Any]:
    """Nothing shared between streams: each answer is its prompt's alone (docs/reliability.md, 4)."""
    m = ci.load_model(default_model_file, parallel_slots=4, threads=1, engine_options=UNSHARED)
    yield m
    m.close()


def test_concurrency_short(unshared: Any) -> None:
    """8 threads x 5 calls mixing all four kinds (stress/concurrency.py runs 16 x 50).

    With the default options a token decoded in one step with other streams' tokens may
    differ from the same token decoded alone (83.5% of 200 prompts kept every token), so
    "equal to alone" is checked where it is promised: nothing shared.
    """
    result = stress_module("concurrency").run_concurrency(unshared, threads=8, calls=5, max_tokens=6, seed=3)
    assert result["errors"] == []
    assert result["mismatches"] == []
    assert sum(result["by_kind"].values()) == 40


# -- 3. cancellation storm ----------------------------------------------------------------


def test_cancellation_storm_short(default_model_file: Path) -> None:
    """60 generations ended by cancel, deadline, break or a cancelled asyncio task."""
    storm = stress_module("storm")
    with ci.load_model(default_model_file, parallel_slots=2, threads=1) as m:
        result = storm.run_storm(m, 60, seed=7, max_tokens=12, warmup=12)
    assert storm.check(result, floor_bytes=32 * MiB) == [], result
    assert set(result["modes"]) == set(storm.MODES)
    assert result["outcomes"].get("Cancelled", 0) and result["outcomes"].get("break", 0)


def test_cancelled_slot_is_free_at_once(default_model_file: Path) -> None:
    with ci.load_model(default_model_file, parallel_slots=1, threads=1) as m:
        for _ in range(5):
            for _tok in m.generate(PROMPT, max_tokens=50):
                break
            ctx = ci.Context.background().with_cancel()
            with pytest.raises(ci.Cancelled):
                for _tok in m.generate(PROMPT, max_tokens=50, ctx=ctx):
                    ctx.cancel()
        # the only slot is free again: the next call gets it and finishes
        ctx = ci.Context.background().with_timeout(30)
        assert list(m.generate(PROMPT, max_tokens=2, ctx=ctx))


# -- 5. close under fire ------------------------------------------------------------------


@pytest.mark.parametrize("after", [0, 3])
def test_close_from_another_thread_ends_the_stream_within_one_token(
    default_model_file: Path, after: int
) -> None:
    m = ci.load_model(default_model_file, threads=1)
    engine = cast("LlamaCppModel", m)._model
    prompt = PROMPT if after else "Summarise: " + "the cat sat on the mat. " * 60  # closed in prefill
    started, closed, entered = threading.Event(), threading.Event(), threading.Event()
    before: list[ci.Token] = []
    late: list[ci.Token] = []
    ended: list[BaseException] = []
    errs: list[BaseException | None] = []

    def consume() -> None:
        entered.set()
        try:
            for tok in m.generate(prompt, max_tokens=500):
                (late if closed.is_set() else before).append(tok)
                if len(before) >= after:
                    started.set()
        except BaseException as exc:
            ended.append(exc)
            errs.append(m.err())  # err() is the calling thread's
        started.set()

    t = threading.Thread(target=consume)
    t.start()
    if after:
        assert started.wait(60)
    else:
        assert entered.wait(60)
        time.sleep(0.3)  # well inside the prefill of ~400 tokens
    m.close()
    closed.set()
    t.join(60)
    assert not t.is_alive()
    assert len(ended) == 1 and isinstance(ended[0], ModelClosed), ended
    assert len(late) <= 1, f"{len(late)} tokens after close() returned"
    if after:
        assert errs == [ended[0]]
    else:
        assert before == []
    assert engine.ptr is None, "the engine was not freed when the stream ended"
    m.close()  # a second close is harmless
    with pytest.raises(ModelClosed):
        m.generate(PROMPT)
    with pytest.raises(ModelClosed):
        m.classify([PROMPT])


def test_close_wakes_calls_waiting_for_a_slot(default_model_file: Path) -> None:
    m = ci.load_model(default_model_file, parallel_slots=1, threads=1)
    results: dict[str, BaseException | None] = {}
    busy = threading.Event()

    def holder() -> None:
        try:
            for _ in m.generate(PROMPT, max_tokens=500):
                busy.set()
            results["holder"] = None
        except BaseException as exc:
            results["holder"] = exc
        busy.set()

    def waiter(name: str, fn: Any) -> None:
        try:
            fn()
            results[name] = None
        except BaseException as exc:
            results[name] = exc

    threads = [threading.Thread(target=holder)]
    threads[0].start()
    assert busy.wait(60)
    for name, fn in [
        ("generate", lambda: list(m.generate(PROMPT, max_tokens=3))),
        ("classify", lambda: m.classify([PROMPT])),
        ("batch_generate", lambda: m.batch_generate([PROMPT], max_tokens=3)),
        ("agenerate", lambda: asyncio.run(_collect(m.agenerate(PROMPT, max_tokens=3)))),
    ]:
        threads.append(threading.Thread(target=waiter, args=(name, fn)))
        threads[-1].start()
    time.sleep(0.3)
    t0 = time.monotonic()
    m.close()
    for t in threads:
        t.join(30)
    assert time.monotonic() - t0 < 10
    assert all(isinstance(e, ModelClosed) for e in results.values()), results
    assert len(results) == 5


def test_close_during_batch_generate_and_agenerate(default_model_file: Path) -> None:
    m = ci.load_model(default_model_file, parallel_slots=2, threads=1)
    engine = cast("LlamaCppModel", m)._model
    out: dict[str, Any] = {}

    def batch() -> None:
        try:
            out["batch"] = m.batch_generate([PROMPT, "The sky is"], max_tokens=400)
        except BaseException as exc:
            out["batch"] = exc

    async def stream() -> None:
        try:
            async for _tok in m.agenerate(PROMPT, max_tokens=400):
                out.setdefault("first", True)
        except BaseException as exc:
            out["stream"] = exc

    t1 = threading.Thread(target=batch)
    t2 = threading.Thread(target=lambda: asyncio.run(stream()))
    t1.start()
    t2.start()
    deadline = time.monotonic() + 60
    while "first" not in out and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)
    m.close()
    t1.join(60)
    t2.join(60)
    assert isinstance(out["stream"], ModelClosed), out
    assert isinstance(out["batch"], ModelClosed) or all(r.err is None for r in out["batch"]), out
    assert engine.ptr is None


def test_dropped_model_is_freed_by_the_garbage_collector(default_model_file: Path) -> None:
    gc.collect()
    m = ci.load_model(default_model_file, threads=1)
    assert list(m.generate(PROMPT, max_tokens=2))
    engine, ctx = cast("LlamaCppModel", m)._model, cast("LlamaCppModel", m)._ctx
    loaded = rss()
    with pytest.warns(ResourceWarning, match="not closed"):
        del m
        gc.collect()
    assert engine.ptr is None and ctx.ptr is None
    freed = loaded - rss()
    assert freed > 150 * MiB, f"RSS fell by only {freed / MiB:.0f} MiB"


def test_dropped_model_with_an_abandoned_stream_is_freed(default_model_file: Path) -> None:
    m = ci.load_model(default_model_file, threads=1)
    engine = cast("LlamaCppModel", m)._model
    stream = m.generate(PROMPT, max_tokens=50)
    next(stream)
    with pytest.warns(ResourceWarning, match="not closed"):
        del m, stream
        gc.collect()
    assert engine.ptr is None
