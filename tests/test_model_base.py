"""BaseModel's contract machinery, exercised through the public FakeModel."""

from __future__ import annotations

import asyncio
import gc
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from core_inference import (
    BatchResult,
    Cancelled,
    Context,
    DeadlineExceeded,
    EngineError,
    GenerateConfig,
    InferenceError,
    Message,
    ModelClosed,
    TextModel,
    Token,
)
from core_inference.streaming import MetricsRecorder, Piece
from core_inference.testing import FakeModel

PROMPT = "The quick brown fox"


def solo(model: FakeModel, prompt: str = PROMPT, **kw: Any) -> list[Token]:
    return list(model.generate(prompt, **kw))


def soon(seconds: float = 30.0) -> Context:
    """A deadline that only a leaked slot or a hung stream would reach."""
    return Context.background().with_timeout(seconds)


class CountingModel(FakeModel):
    """Counts engine streams running at once and engine closes."""

    def __init__(self, *args: Any, barrier: threading.Barrier | None = None, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.counter_lock = threading.Lock()
        self.running = 0
        self.peak = 0
        self.events: list[tuple[str, str]] = []
        self.barrier = barrier
        self.engine_closes = 0

    def _engine_generate(
        self, prompt: str, cfg: GenerateConfig, ctx: Context, rec: MetricsRecorder
    ) -> Iterator[Piece]:
        with self.counter_lock:
            self.running += 1
            self.peak = max(self.peak, self.running)
            self.events.append(("start", prompt))
        try:
            if self.barrier is not None:
                self.barrier.wait(timeout=30)
            yield from super()._engine_generate(prompt, cfg, ctx, rec)
        finally:
            with self.counter_lock:
                self.running -= 1
                self.events.append(("end", prompt))

    def _close_engine(self) -> None:
        self.engine_closes += 1
        super()._close_engine()


class PickyModel(FakeModel):
    """Fails on prompts containing "bad"; closes itself on "closeme"."""

    def _engine_generate(
        self, prompt: str, cfg: GenerateConfig, ctx: Context, rec: MetricsRecorder
    ) -> Iterator[Piece]:
        if "bad" in prompt:
            raise ValueError(f"cannot do {prompt!r}")
        if "closeme" in prompt:
            self.close()
        yield from super()._engine_generate(prompt, cfg, ctx, rec)


@pytest.fixture
def model() -> Iterator[FakeModel]:
    with FakeModel() as m:
        yield m


# -- basics ------------------------------------------------------------------------


def test_fake_model_is_a_text_model(model: FakeModel) -> None:
    assert isinstance(model, TextModel)
    assert model.model_type == "fake" and model.info().architecture == "fake"


def test_generate_streams_and_records_metrics(model: FakeModel) -> None:
    toks = solo(model, max_tokens=5)
    assert len(toks) == 5 and all(isinstance(t, Token) for t in toks)
    m = model.metrics()
    assert m.generated_tokens == 5 and m.prompt_tokens == len(PROMPT.split())
    assert model.err() is None


def test_generate_is_deterministic(model: FakeModel) -> None:
    assert solo(model, max_tokens=8) == solo(model, max_tokens=8)


def test_chat_uses_the_chat_prompt(model: FakeModel) -> None:
    msgs = [Message("system", "Be brief."), Message("user", "Hello there")]
    as_dicts = [m.to_dict() for m in msgs]
    via_chat = list(model.chat(msgs, max_tokens=6))
    assert via_chat == list(model.chat(as_dicts, max_tokens=6))
    assert via_chat == solo(model, model.chat_prompt(msgs), max_tokens=6)


# -- err() parity ------------------------------------------------------------------


def test_err_is_the_raised_exception_then_none_after_success() -> None:
    with FakeModel(fail_after=2) as model:
        got = []
        with pytest.raises(InferenceError) as info:
            for tok in model.generate(PROMPT, max_tokens=10):
                got.append(tok)
        assert len(got) == 2  # fail_after: the tokens before the failure were streamed
        assert model.err() is info.value
        assert model.err() is info.value  # stable until the next call
        model.fail_after = None
        assert len(solo(model, max_tokens=3)) == 3
        assert model.err() is None


def test_err_carries_the_engines_own_exception() -> None:
    boom = RuntimeError("engine exploded")
    with FakeModel(fail_after=1, error=boom) as model:
        with pytest.raises(EngineError) as info:
            solo(model)
        assert info.value.__cause__ is boom and model.err() is info.value
        assert "engine exploded" in str(info.value)


def test_err_after_cancel_is_the_raised_cancelled(model: FakeModel) -> None:
    ctx = Context.background().with_cancel()
    got = []
    with pytest.raises(Cancelled) as info:
        for tok in model.generate(PROMPT, max_tokens=1000, ctx=ctx):
            got.append(tok)
            if len(got) == 2:
                ctx.cancel()
    assert len(got) == 2
    assert model.err() is info.value


def test_err_after_deadline(model: FakeModel) -> None:
    ctx = Context.background().with_timeout(0.05)
    ctx.wait(5)
    with pytest.raises(DeadlineExceeded) as info:
        solo(model, ctx=ctx)
    assert model.err() is info.value


# -- close -------------------------------------------------------------------------


def test_close_from_another_thread_ends_the_stream_within_one_token() -> None:
    model = FakeModel(delay=0.01)
    got: list[Token] = []
    three = threading.Event()
    outcome: dict[str, BaseException | None] = {}

    def consume() -> None:
        try:
            for tok in model.generate(PROMPT, max_tokens=100_000):
                got.append(tok)
                if len(got) == 3:
                    three.set()
        except BaseException as exc:
            outcome["exc"] = exc
            outcome["err"] = model.err()  # err() is per thread: read it in the calling thread

    t = threading.Thread(target=consume)
    t.start()
    assert three.wait(30)
    model.close()
    seen_at_close = len(got)
    t.join(30)
    assert not t.is_alive()
    assert isinstance(outcome.get("exc"), ModelClosed)
    assert len(got) <= seen_at_close + 1
    assert outcome["err"] is outcome["exc"]
    assert model.engine_closed


def test_close_is_idempotent_and_every_call_after_it_raises_model_closed() -> None:
    model = CountingModel()
    solo(model, max_tokens=2)
    model.close()
    model.close()
    assert model.closed and model.engine_closes == 1
    with pytest.raises(ModelClosed):
        model.generate(PROMPT)
    with pytest.raises(ModelClosed):
        model.chat([Message("user", "hi")])
    with pytest.raises(ModelClosed):
        model.classify([PROMPT])
    with pytest.raises(ModelClosed):
        model.batch_generate([PROMPT])

    async def agen() -> list[Token]:
        return [t async for t in model.agenerate(PROMPT)]

    with pytest.raises(ModelClosed):
        asyncio.run(agen())


def test_close_engine_is_deferred_until_the_running_stream_ends() -> None:
    model = CountingModel()
    stream = model.generate(PROMPT, max_tokens=100)
    first = next(stream)
    assert isinstance(first, Token)
    model.close()
    assert model.closed
    assert model.engine_closes == 0 and not model.engine_closed  # the stream still runs
    with pytest.raises(ModelClosed):
        next(stream)
    assert model.engine_closes == 1 and model.engine_closed
    model.close()
    assert model.engine_closes == 1


def test_close_engine_once_when_the_stream_is_closed_not_resumed() -> None:
    model = CountingModel()
    stream = model.generate(PROMPT, max_tokens=100)
    next(stream)
    model.close()
    assert model.engine_closes == 0
    stream.close()
    assert model.engine_closes == 1


def test_context_manager_closes() -> None:
    with CountingModel() as model:
        solo(model, max_tokens=1)
    assert model.closed and model.engine_closes == 1
    with pytest.raises(ModelClosed):
        solo(model)


def test_a_model_dropped_without_close_warns_and_frees() -> None:
    freed: list[str] = []

    class Tracked(FakeModel):
        def _close_engine(self) -> None:
            freed.append("closed")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dropped = Tracked()
        solo(dropped, max_tokens=2)
        del dropped
        gc.collect()
    assert any(issubclass(w.category, ResourceWarning) for w in caught), caught
    assert freed == ["closed"]

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        closed_first = Tracked()
        closed_first.close()
        del closed_first
        gc.collect()
    assert not any(issubclass(w.category, ResourceWarning) for w in caught)
    assert freed == ["closed", "closed"]


def test_close_while_waiting_for_a_slot_raises_model_closed() -> None:
    model = FakeModel(parallel_slots=1)
    holder = model.generate(PROMPT, max_tokens=100)
    next(holder)  # holds the only slot
    outcome: dict[str, BaseException] = {}
    waiting = threading.Event()

    def wait_for_slot() -> None:
        stream = model.generate(PROMPT, max_tokens=2)
        waiting.set()
        try:
            list(stream)
        except BaseException as exc:
            outcome["exc"] = exc

    t = threading.Thread(target=wait_for_slot)
    t.start()
    assert waiting.wait(10)
    model.close()
    t.join(30)
    assert not t.is_alive()
    assert isinstance(outcome.get("exc"), ModelClosed)
    holder.close()
    assert model.engine_closed


# -- slots -------------------------------------------------------------------------


def test_break_and_iterator_close_free_the_slot() -> None:
    with FakeModel(parallel_slots=1, delay=0.001) as model:
        for _ in range(3):
            for _tok in model.generate(PROMPT, max_tokens=100_000):
                break
        assert len(solo(model, max_tokens=2, ctx=soon())) == 2
        stream = model.generate(PROMPT, max_tokens=100_000)
        next(stream)
        # the open stream holds the only slot: another thread waits for it ...
        waited: list[BaseException] = []

        def other() -> None:
            try:
                solo(model, max_tokens=2, ctx=Context.background().with_timeout(0.05))
            except BaseException as exc:
                waited.append(exc)

        t = threading.Thread(target=other)
        t.start()
        t.join(30)
        assert len(waited) == 1 and isinstance(waited[0], DeadlineExceeded)
        # ... and this thread, which holds it, is told so at once instead of waiting forever
        with pytest.raises(InferenceError, match="already holds all 1"):
            solo(model, max_tokens=2)
        stream.close()
        assert len(solo(model, max_tokens=2, ctx=soon())) == 2


def test_generate_never_iterated_holds_no_slot() -> None:
    with FakeModel(parallel_slots=1) as model:
        idle = [model.generate(PROMPT, max_tokens=5) for _ in range(3)]
        assert len(solo(model, max_tokens=2, ctx=soon())) == 2
        assert len(list(idle[0])) == 5  # and each still works when iterated later


@pytest.mark.parametrize("slots", [1, 2, 3])
def test_calls_beyond_parallel_slots_wait_their_turn(slots: int) -> None:
    # the barrier trips only when `slots` streams are inside the engine at once,
    # so reaching the peak needs no timing; the counter proves it is never passed
    model = CountingModel(parallel_slots=slots, barrier=threading.Barrier(slots))
    prompts = [f"prompt number {i}" for i in range(2 * slots)]
    alone = {}
    with FakeModel() as reference:
        for p in prompts:
            alone[p] = solo(reference, p, max_tokens=6)
    results: dict[str, list[Token]] = {}
    errors: list[BaseException] = []

    def work(p: str) -> None:
        try:
            results[p] = solo(model, p, max_tokens=6, ctx=soon())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    model.close()
    assert not errors, errors
    assert model.peak == slots
    assert results == alone  # outputs never mix
    if slots == 1:  # strictly one after another
        kinds = [kind for kind, _ in model.events]
        assert kinds == ["start", "end"] * len(prompts)
        for i in range(0, len(model.events), 2):
            assert model.events[i][1] == model.events[i + 1][1]


# -- classify and batch --------------------------------------------------------------


def test_classify(model: FakeModel) -> None:
    results = model.classify([PROMPT, "Hello"])
    assert len(results) == 2 and all(r.logits is None for r in results)
    with_logits = model.classify([PROMPT], return_logits=True)
    assert with_logits[0].logits is not None and len(with_logits[0].logits) == len(model.vocab)
    assert with_logits[0].token == results[0].token
    assert model.err() is None


def test_batch_generate_matches_generate_and_sums_metrics(model: FakeModel) -> None:
    prompts = [PROMPT, "Hello", "one two three"]
    results = model.batch_generate(prompts, max_tokens=4)
    assert [r.err for r in results] == [None, None, None]
    assert [list(r.tokens) for r in results] == [solo(model, p, max_tokens=4) for p in prompts]
    model.batch_generate(prompts, max_tokens=4)
    m = model.metrics()
    assert m.generated_tokens == 12
    assert m.prompt_tokens == sum(len(p.split()) for p in prompts)


def test_batch_generate_failure_stays_with_its_prompt() -> None:
    with PickyModel() as model:
        results = model.batch_generate(["good one", "a bad one", "good two"], max_tokens=3)
        assert len(results) == 3
        assert isinstance(results[1], BatchResult)
        assert isinstance(results[1].err, ValueError) and results[1].tokens == ()
        assert results[0].err is None and len(results[0].tokens) == 3
        assert results[2].err is None and list(results[2].tokens) == solo(model, "good two", max_tokens=3)
        assert model.err() is None


def test_batch_generate_cancelled_context_sinks_the_whole_call(model: FakeModel) -> None:
    ctx = Context.background().with_cancel()
    ctx.cancel()
    with pytest.raises(Cancelled) as info:
        model.batch_generate([PROMPT, "Hello"], ctx=ctx)
    assert model.err() is info.value


def test_batch_generate_model_closed_mid_batch_raises() -> None:
    model = PickyModel()
    with pytest.raises(ModelClosed):
        model.batch_generate(["one", "closeme now", "two"], max_tokens=3)
    assert model.closed and model.engine_closed


# -- validation --------------------------------------------------------------------


def test_empty_message_list_is_value_error(model: FakeModel) -> None:
    with pytest.raises(ValueError, match="empty"):
        model.chat([])


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "robot", "content": "hi"}],
        [{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}],
    ],
)
def test_unknown_role_is_value_error(model: FakeModel, messages: list[dict[str, str]]) -> None:
    with pytest.raises(ValueError, match="role"):
        model.chat(messages)


def test_bad_message_shapes(model: FakeModel) -> None:
    with pytest.raises(TypeError):
        model.chat("just a string")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        model.chat([{"role": "user"}])


@pytest.mark.parametrize("prompt", [None, 42, b"bytes", ["a list"]])
def test_non_str_prompt_is_type_error(model: FakeModel, prompt: Any) -> None:
    with pytest.raises(TypeError, match="prompt"):
        model.generate(prompt)


def test_non_str_prompts_in_lists_are_type_errors(model: FakeModel) -> None:
    with pytest.raises(TypeError):
        model.classify("not a list")
    with pytest.raises(TypeError):
        model.classify(["ok", 3])  # type: ignore[list-item]
    with pytest.raises(TypeError):
        model.batch_generate([None])  # type: ignore[list-item]


# -- async -------------------------------------------------------------------------


def test_agenerate_and_achat_match_the_sync_calls(model: FakeModel) -> None:
    msgs = [Message("user", "Hello there")]

    async def run() -> tuple[list[Token], list[Token]]:
        a = [t async for t in model.agenerate(PROMPT, max_tokens=7)]
        b = [t async for t in model.achat(msgs, max_tokens=7)]
        return a, b

    a, b = asyncio.run(run())
    assert a == solo(model, max_tokens=7)
    assert b == list(model.chat(msgs, max_tokens=7))


def test_agenerate_raises_the_engine_error_and_err_matches() -> None:
    with FakeModel(fail_after=2) as model:

        async def run() -> list[Token]:
            return [t async for t in model.agenerate(PROMPT, max_tokens=10)]

        with pytest.raises(InferenceError) as info:
            asyncio.run(run())
        assert model.err() is info.value


def test_agenerate_does_not_block_the_event_loop() -> None:
    with FakeModel(delay=0.02) as model:

        async def run() -> tuple[int, int]:
            ticks = 0
            done = False

            async def ticker() -> None:
                nonlocal ticks
                while not done:
                    ticks += 1
                    await asyncio.sleep(0)

            task = asyncio.create_task(ticker())
            toks = [t async for t in model.agenerate(PROMPT, max_tokens=5)]
            done = True
            await task
            return len(toks), ticks

        n, ticks = asyncio.run(run())
        assert n == 5 and ticks > 5


def test_breaking_out_of_async_for_frees_the_slot() -> None:
    with FakeModel(parallel_slots=1, delay=0.01) as model:

        async def run() -> tuple[list[Token], list[Token]]:
            async for _tok in model.agenerate(PROMPT, max_tokens=100_000):
                break
            awaited = [t async for t in model.agenerate(PROMPT, max_tokens=2, ctx=soon())]
            async for _tok in model.agenerate(PROMPT, max_tokens=100_000):
                break
            # a blocking call straight after the break, without giving the loop a turn
            blocking = solo(model, max_tokens=2, ctx=soon())
            return awaited, blocking

        awaited, blocking = asyncio.run(run())
        assert len(awaited) == 2 and len(blocking) == 2


def test_aclose_frees_the_slot() -> None:
    with FakeModel(parallel_slots=1, delay=0.01) as model:

        async def run() -> list[Token]:
            stream: Any = model.agenerate(PROMPT, max_tokens=100_000)
            await stream.__anext__()
            await stream.aclose()
            return [t async for t in model.agenerate(PROMPT, max_tokens=2, ctx=soon())]

        assert len(asyncio.run(run())) == 2


def test_cancelling_the_consuming_task_frees_the_slot() -> None:
    with FakeModel(parallel_slots=1, delay=0.01) as model:

        async def run() -> list[Token]:
            started = asyncio.Event()

            async def consume() -> None:
                async for _tok in model.agenerate(PROMPT, max_tokens=100_000):
                    started.set()

            task = asyncio.create_task(consume())
            await asyncio.wait_for(started.wait(), 30)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            return [t async for t in model.agenerate(PROMPT, max_tokens=2, ctx=soon())]

        assert len(asyncio.run(run())) == 2


def test_agenerate_context_cancel() -> None:
    with FakeModel(delay=0.005) as model:
        ctx = Context.background().with_cancel()

        async def run() -> int:
            n = 0
            async for _tok in model.agenerate(PROMPT, max_tokens=100_000, ctx=ctx):
                n += 1
                if n == 2:
                    ctx.cancel()
            return n

        with pytest.raises(Cancelled):
            asyncio.run(run())


def test_agenerate_context_cancel_always_raises() -> None:
    """Cancelled right after a token is handed over, the stream still ends with Cancelled.

    The worker used to stop quietly when it saw the context ended between handing over a
    token and asking for the next: about 1 stream in 60 ended as if it had finished.
    """

    async def run(model: FakeModel, ctx: Context) -> None:
        n = 0
        async for _tok in model.agenerate(PROMPT, max_tokens=100_000, ctx=ctx):
            n += 1
            if n == 2:
                ctx.cancel()

    quiet_ends = 0
    for _ in range(200):
        with FakeModel(delay=0.0005) as model:
            try:
                asyncio.run(run(model, Context.background().with_cancel()))
                quiet_ends += 1
            except Cancelled:
                pass
    assert quiet_ends == 0


def test_aclassify_and_abatch_generate(model: FakeModel) -> None:
    prompts = [PROMPT, "Hello"]

    async def run() -> tuple[Any, Any]:
        return (
            await model.aclassify(prompts, return_logits=True),
            await model.abatch_generate(prompts, max_tokens=3),
        )

    classified, batched = asyncio.run(run())
    assert classified == model.classify(prompts, return_logits=True)
    assert batched == model.batch_generate(prompts, max_tokens=3)


def test_an_unclosed_model_is_freed_at_exit_before_its_engine_goes_down(tmp_path: Path) -> None:
    """The exit hook frees models nobody closed before the hooks their engines registered
    while loading (vLLM's and MLX's finalizers failed when left to the interpreter's teardown)."""
    import subprocess
    import sys

    code = (
        "import atexit, warnings\n"
        "from core_inference.testing import FakeBackend, FakeModel\n"
        "engine_up = True\n"
        "class Model(FakeModel):\n"
        "    def _close_engine(self):\n"
        "        print('freed with the engine', 'up' if engine_up else 'down', flush=True)\n"
        "class Backend(FakeBackend):\n"
        "    def _load(self, path, cfg):\n"
        "        def down():\n"
        "            global engine_up\n"
        "            engine_up = False\n"
        "        atexit.register(down)  # as an engine does while it loads\n"
        "        return Model()\n"
        f"model = Backend().load_model({str(tmp_path)!r})\n"
        "print(''.join(t.text for t in model.generate('a b', max_tokens=2)), flush=True)\n"
        "warnings.simplefilter('always')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "freed with the engine up", result.stdout
    assert "Model was not closed" in result.stderr
    assert "Exception ignored" not in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_a_deadline_ends_the_wait_on_an_async_engine_when_it_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Waiting on an async engine looks at the context every ``POLL`` seconds, or at its
    deadline where that comes sooner: with a poll of 60 s, a 0.05 s deadline ends the call
    while the engine still waits to give its first token (for up to 10 s), sync and async."""
    from collections.abc import AsyncIterator

    from core_inference import aio
    from core_inference.testing import AsyncFakeModel

    class Stalled(AsyncFakeModel):
        def __init__(self) -> None:
            super().__init__()
            self.release = threading.Event()
            self.gave = 0

        async def _aengine_generate(
            self, prompt: str, cfg: GenerateConfig, ctx: Context, rec: MetricsRecorder
        ) -> AsyncIterator[Piece]:
            await asyncio.get_running_loop().run_in_executor(None, self.release.wait, 10.0)
            async for piece in super()._aengine_generate(prompt, cfg, ctx, rec):
                self.gave += 1
                yield piece

    monkeypatch.setattr(aio, "POLL", 60.0)
    with Stalled() as model:
        with pytest.raises(DeadlineExceeded):
            list(model.generate(PROMPT, max_tokens=3, ctx=Context.background().with_timeout(0.05)))
        assert model.gave == 0

        async def run() -> None:
            ctx = Context.background().with_timeout(0.05)
            async for _ in model.agenerate(PROMPT, max_tokens=3, ctx=ctx):
                pass

        with pytest.raises(DeadlineExceeded):
            asyncio.run(run())
        assert model.gave == 0
        model.release.set()
