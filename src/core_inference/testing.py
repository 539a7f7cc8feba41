"""A public fake backend and the contract test suite every backend's tests reuse.

``FakeBackend`` / ``FakeModel`` stream scripted tokens with optional delays and
failures, for testing code written against the contract without an engine.
``BackendContract`` is a pytest test class: subclass it, implement ``load_model``,
and every contract rule runs against your backend.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any, ClassVar

from .backend import BaseBackend
from .context import Context
from .errors import Cancelled, DeadlineExceeded, InferenceError, ModelClosed
from .model import BaseModel
from .protocols import TextModel
from .streaming import MetricsRecorder, Piece
from .types import ClassifyResult, GenerateConfig, GenerateMetrics, LoadConfig, Message, ModelInfo, Token

FAKE_VOCAB = (
    "The", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog", ".",
    "Hello", "world", "!", "你好", "🙂",
)


class FakeModel(BaseModel):
    """A model that streams scripted tokens: deterministic, instant, and easy to break."""

    model_type = "fake"

    def __init__(
        self,
        tokens: Sequence[str] = FAKE_VOCAB,
        *,
        delay: float = 0.0,
        fail_after: int | None = None,
        error: BaseException | None = None,
        parallel_slots: int = 1,
        eos_after: int | None = None,
    ) -> None:
        super().__init__(parallel_slots)
        self.vocab = list(tokens)
        self.delay = delay
        self.fail_after = fail_after
        self.error = error
        self.eos_after = eos_after
        self.engine_closed = False
        self.context_len = 4096
        self._words: list[str] = []  # the tokenizer's words beyond the vocabulary

    def _ids(self, prompt: str) -> list[int]:
        return [sum(map(ord, word)) % len(self.vocab) for word in prompt.split()] or [0]

    def _engine_generate(
        self, prompt: str, cfg: GenerateConfig, ctx: Context, rec: MetricsRecorder
    ) -> Iterator[Piece]:
        ids = self._ids(prompt)
        rec.prefill_done(len(ids))
        start = ids[-1]
        n = 0
        while True:
            if self.eos_after is not None and n >= self.eos_after:
                return
            if self.fail_after is not None and n >= self.fail_after:
                raise self.error or InferenceError("fake engine failure")
            if self.delay:
                time.sleep(self.delay)
            tid = (start + n) % len(self.vocab)
            text = self.vocab[tid]
            yield tid, (text if n == 0 else " " + text).encode()
            n += 1

    def _render_chat(self, messages: list[Message]) -> str:
        return "".join(f"<{m.role}>{m.content}</{m.role}>" for m in messages) + "<assistant>"

    def _tokenize(self, text: str) -> list[int]:
        """One id per word (as generation counts them): the vocabulary's, else a new one."""
        ids = []
        for word in text.split() or [""]:
            if word not in self._words:
                self._words.append(word)
            ids.append(len(self.vocab) + self._words.index(word))
        return ids

    def _detokenize(self, ids: Sequence[int]) -> str:
        n = len(self.vocab)
        words = self._words
        return " ".join(self.vocab[i] if i < n else words[i - n] if i - n < len(words) else "?" for i in ids)

    def _classify(
        self, prompts: list[str], cfg: GenerateConfig, ctx: Context, rec: MetricsRecorder
    ) -> list[ClassifyResult]:
        out = []
        for prompt in prompts:
            ctx.raise_if_done()
            ids = self._ids(prompt)
            tid = ids[-1]
            logits = [1.0 if i == tid else 0.0 for i in range(len(self.vocab))]
            rec.prompt_tokens += len(ids)
            rec.generated_tokens += 1
            out.append(ClassifyResult(Token(tid, self.vocab[tid]), logits if cfg.return_logits else None,
                                      len(ids), GenerateMetrics(prompt_tokens=len(ids), generated_tokens=1)))
        return out

    def _describe(self) -> ModelInfo:
        # the tokenizer's words beyond the scripted vocabulary are ids too
        vocab = len(self.vocab) + len(self._words)
        return ModelInfo(architecture="fake", vocab_size=vocab, context_length=4096)

    def _close_engine(self) -> None:
        self.engine_closed = True


class AsyncFakeModel(FakeModel):
    """``FakeModel`` with an async engine: its raw stream is an async generator, as an
    HTTP client's or vLLM's is; the sync API comes from the base class."""

    model_type = "fake"

    async def _aengine_generate(
        self, prompt: str, cfg: GenerateConfig, ctx: Context, rec: MetricsRecorder
    ) -> AsyncIterator[Piece]:
        import asyncio

        for piece in FakeModel._engine_generate(self, prompt, cfg, ctx, rec):
            if self.delay:
                await asyncio.sleep(0)  # the sync generator slept already; let others run
            yield piece


class FakeBackend(BaseBackend):
    """A backend that loads ``FakeModel``s from any existing path; settings pass through."""

    name = "fake"
    extra = ""
    formats = ("gguf", "safetensors", "url")

    def __init__(
        self, name: str = "fake", available: bool = True, async_engine: bool = False, **model_kw: Any
    ) -> None:
        self.name = name  # type: ignore[misc]
        self._available = available
        self.async_engine = async_engine
        self.model_kw = model_kw
        self.loaded: list[str] = []

    def why_unavailable(self) -> str | None:
        return None if self._available else "the fake backend was made unavailable"

    def can_load(self, path: str | os.PathLike[str]) -> bool:
        return True

    def _load(self, path: str, cfg: LoadConfig) -> TextModel:
        self.loaded.append(path)
        kw = {"parallel_slots": cfg.parallel_slots or 1, **self.model_kw}
        return AsyncFakeModel(**kw) if self.async_engine else FakeModel(**kw)


def _collect(model: TextModel, prompt: str, **kw: Any) -> list[Token]:
    return list(model.generate(prompt, **kw))


def _require(model: TextModel, capability: str) -> None:
    """Skip the running rule, saying why, when the model lacks ``capability``."""
    have = getattr(model.capabilities, capability)
    if not have:
        import pytest

        pytest.skip(f"{type(model).__name__}: capabilities.{capability} is {have!r}")


class BackendContract:
    """The contract suite: subclass, implement ``load_model``, and pytest runs every rule.

    Each rule uses greedy decoding, so outputs are deterministic on any engine. The
    model's ``capabilities`` decide which rules apply: a rule a capability does not
    allow is skipped with the reason (an HTTP backend without logits passes honestly).
    """

    prompt: ClassVar[str] = "The capital of France is"
    chat_messages: ClassVar[list[Message]] = [Message("user", "Say hello.")]
    max_tokens: ClassVar[int] = 12
    threads: ClassVar[int] = 8
    # Load options under which the engine promises each greedy answer is the prompt's alone,
    # whatever runs beside it. ``test_threads_never_mix`` checks its threads against the
    # prompts alone on a model loaded with them: an engine whose defaults share a decode
    # between streams may pick its kernels by the rows in it, and change a greedy answer
    # without mixing anything (llama.cpp: docs/reliability.md). Empty: the shared model.
    alone_kw: ClassVar[dict[str, Any]] = {}

    def load_model(self, **kw: Any) -> TextModel:
        """Load a fresh model of the backend under test with these load options."""
        raise NotImplementedError

    # pytest discovers these; the class-scoped model is made once per subclass.
    @classmethod
    def _shared(cls) -> TextModel:
        model = cls.__dict__.get("_shared_model")
        if model is None or getattr(model, "closed", False):
            model = cls().load_model(parallel_slots=2)
            cls._shared_model = model  # type: ignore[attr-defined]
        return model

    @classmethod
    def teardown_class(cls) -> None:
        model = cls.__dict__.get("_shared_model")
        if model is not None:
            model.close()

    def test_streams_tokens_with_ids_and_text(self) -> None:
        model = self._shared()
        tokens = _collect(model, self.prompt, max_tokens=self.max_tokens)
        assert tokens, "generate yielded nothing"
        assert all(isinstance(t, Token) and isinstance(t.id, int) and isinstance(t.text, str) for t in tokens)
        assert "".join(t.text for t in tokens).strip(), "generated text is empty"
        assert model.err() is None

    def test_greedy_is_deterministic(self) -> None:
        model = self._shared()
        first = _collect(model, self.prompt, max_tokens=self.max_tokens)
        assert _collect(model, self.prompt, max_tokens=self.max_tokens) == first

    def test_max_tokens(self) -> None:
        model = self._shared()
        assert len(_collect(model, self.prompt, max_tokens=3)) <= 3
        assert len(_collect(model, self.prompt, max_tokens=3)) >= 1
        assert _collect(model, self.prompt, max_tokens=0) == []

    def test_stop_token_is_not_yielded(self) -> None:
        model = self._shared()
        _require(model, "token_ids")
        full = _collect(model, self.prompt, max_tokens=self.max_tokens)
        assert len(full) >= 4
        stop_id = full[3].id
        cut = _collect(model, self.prompt, max_tokens=self.max_tokens, stop_tokens=[stop_id])
        assert stop_id not in [t.id for t in cut]
        assert [t.id for t in cut] == [t.id for t in full[: len(cut)]]

    def test_stop_string_cuts_text(self) -> None:
        model = self._shared()
        full = "".join(t.text for t in _collect(model, self.prompt, max_tokens=self.max_tokens))
        words = full.split()
        assert len(words) >= 3, f"need a few words of output, got {full!r}"
        stop = words[2]
        text = "".join(t.text for t in _collect(model, self.prompt, max_tokens=self.max_tokens, stop=[stop]))
        assert stop not in text
        assert text == full[: full.index(stop)]

    def test_chat_streams(self) -> None:
        model = self._shared()
        tokens = list(model.chat(self.chat_messages, max_tokens=self.max_tokens))
        assert tokens and model.err() is None

    def test_cancel_mid_stream(self) -> None:
        model = self._shared()
        ctx = Context.background().with_cancel()
        got = []
        try:
            for tok in model.generate(self.prompt, max_tokens=10_000, ctx=ctx):
                got.append(tok)
                if len(got) == 2:
                    ctx.cancel()
        except Cancelled as exc:
            assert model.err() is exc
        else:
            raise AssertionError("stream was not cancelled")
        assert len(got) == 2

    def test_deadline_mid_stream(self) -> None:
        model = self._shared()
        began = time.monotonic()
        _collect(model, self.prompt, max_tokens=3)
        span = time.monotonic() - began
        ctx = Context.background().with_timeout(2 * span + 0.5)
        assert ctx.deadline is not None
        got = []
        try:
            for tok in model.generate(self.prompt, max_tokens=10_000, ctx=ctx):
                got.append(tok)
                if len(got) == 2:  # wait out the deadline: the next boundary must end the stream
                    time.sleep(max(0.0, ctx.deadline - time.monotonic()) + 0.01)
        except DeadlineExceeded as exc:
            assert model.err() is exc
        else:
            raise AssertionError("deadline did not end the stream")
        assert len(got) == 2

    def test_break_frees_the_slot(self) -> None:
        model = self.load_model(parallel_slots=1)
        try:
            for _ in range(3):
                for _tok in model.generate(self.prompt, max_tokens=10_000):
                    break
            # with a leaked slot this would wait forever; the deadline turns that into an error
            ctx = Context.background().with_timeout(120)
            assert _collect(model, self.prompt, max_tokens=2, ctx=ctx)
        finally:
            model.close()

    def test_err_parity_after_failure_and_success(self) -> None:
        model = self._shared()
        ctx = Context.background().with_cancel()
        ctx.cancel()
        try:
            list(model.generate(self.prompt, ctx=ctx))
        except Cancelled as exc:
            assert model.err() is exc
        else:
            raise AssertionError("a cancelled context did not raise")
        _collect(model, self.prompt, max_tokens=2)
        assert model.err() is None

    def test_close_is_idempotent_and_final(self) -> None:
        model = self.load_model()
        _collect(model, self.prompt, max_tokens=2)
        model.close()
        model.close()
        for call in (
            lambda: list(model.generate(self.prompt)),
            lambda: list(model.chat(self.chat_messages)),
            lambda: model.classify([self.prompt]),
            lambda: model.batch_generate([self.prompt]),
        ):
            try:
                call()
            except ModelClosed:
                pass
            else:
                raise AssertionError("a call after close() did not raise ModelClosed")

    def test_context_manager_closes(self) -> None:
        with self.load_model() as model:
            _collect(model, self.prompt, max_tokens=1)
        try:
            _collect(model, self.prompt, max_tokens=1)
        except ModelClosed:
            return
        raise AssertionError("model still usable after its with-block")

    def test_metrics_filled(self) -> None:
        model = self._shared()
        tokens = _collect(model, self.prompt, max_tokens=5)
        m = model.metrics()
        assert m.generated_tokens == len(tokens)
        assert m.prompt_tokens > 0
        assert m.total_duration > 0 and m.prefill_duration >= 0 and m.decode_duration >= 0

    def test_classify(self) -> None:
        model = self._shared()
        _require(model, "classify")
        results = model.classify([self.prompt, "Hello"])
        assert len(results) == 2 and all(r.logits is None for r in results)
        assert all(r.err is None and r.finish_reason == "length" and r.prompt_tokens > 0 for r in results)
        _require(model, "logits")
        with_logits = model.classify([self.prompt], return_logits=True)
        assert with_logits[0].logits is not None and len(with_logits[0].logits) > 0
        assert with_logits[0].token.id == results[0].token.id

    def test_batch_generate_matches_generate(self) -> None:
        model = self._shared()
        prompts = [self.prompt, "Hello", "One two three"]
        results = model.batch_generate(prompts, max_tokens=6)
        assert len(results) == len(prompts)
        for prompt, res in zip(prompts, results, strict=True):
            assert res.err is None
            alone = model.generate(prompt, max_tokens=6)
            tokens = list(alone)
            if model.capabilities.token_ids:
                assert [t.id for t in res.tokens] == [t.id for t in tokens]
            assert res.text == "".join(t.text for t in tokens)
            assert res.finish_reason == alone.finish_reason and res.prompt_tokens == alone.prompt_tokens
            assert res.metrics.generated_tokens == len(res.tokens)

    def test_info_and_model_type(self) -> None:
        model = self._shared()
        assert isinstance(model.model_type, str) and model.model_type
        assert model.info().architecture

    def test_threads_never_mix(self) -> None:
        if self.alone_kw:
            with self.load_model(parallel_slots=2, **self.alone_kw) as model:
                self._threads_never_mix(model)
        else:
            self._threads_never_mix(self._shared())

    def _threads_never_mix(self, model: TextModel) -> None:
        prompts = [self.prompt, "Hello", "One two three", "Once upon a time"]
        alone = {p: _collect(model, p, max_tokens=self.max_tokens) for p in prompts}
        results: dict[int, list[Token]] = {}
        errors: list[BaseException] = []

        def work(i: int) -> None:
            try:
                results[i] = _collect(model, prompts[i % len(prompts)], max_tokens=self.max_tokens)
            except BaseException as exc:  # surfaced below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(self.threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        for i in range(self.threads):
            assert results[i] == alone[prompts[i % len(prompts)]]

    def test_agenerate_matches_generate(self) -> None:
        import asyncio

        model = self._shared()

        async def collect() -> list[Token]:
            return [t async for t in model.agenerate(self.prompt, max_tokens=self.max_tokens)]

        assert asyncio.run(collect()) == _collect(model, self.prompt, max_tokens=self.max_tokens)

    def test_agenerate_break_frees_the_engine(self) -> None:
        import asyncio

        model = self._shared()

        async def first() -> Token:
            async for tok in model.agenerate(self.prompt, max_tokens=10_000):
                return tok
            raise AssertionError("no token")

        asyncio.run(first())
        ctx = Context.background().with_timeout(120)
        assert _collect(model, self.prompt, max_tokens=2, ctx=ctx)

    # -- the result per call ---------------------------------------------------------

    def test_result_at_max_tokens(self) -> None:
        model = self._shared()
        stream = model.generate(self.prompt, max_tokens=3)
        assert stream.finish_reason is None and not stream.done
        tokens = list(stream)
        assert stream.done and stream.err is None
        assert stream.finish_reason in ("length", "end_of_text")
        if stream.finish_reason == "length":
            assert len(tokens) == 3
        assert stream.metrics.generated_tokens == len(tokens)
        assert stream.prompt_tokens > 0 and stream.metrics.prompt_tokens == stream.prompt_tokens
        assert model.metrics() == stream.metrics

    def test_result_names_the_stop_string(self) -> None:
        model = self._shared()
        full = "".join(t.text for t in _collect(model, self.prompt, max_tokens=self.max_tokens))
        stop = full.split()[2]
        stream = model.generate(self.prompt, max_tokens=self.max_tokens, stop=[stop, "never-seen-stop"])
        list(stream)
        assert stream.finish_reason == "stop" and stream.stop == stop

    def test_result_names_the_stop_id(self) -> None:
        model = self._shared()
        _require(model, "token_ids")
        full = _collect(model, self.prompt, max_tokens=self.max_tokens)
        stream = model.generate(self.prompt, max_tokens=self.max_tokens, stop_tokens=[full[2].id])
        assert [t.id for t in stream] == [t.id for t in full[:2]]
        assert stream.finish_reason == "stop" and stream.stop == full[2].id

    def test_stop_string_run_is_a_prefix_of_the_full_run(self) -> None:
        model = self._shared()
        full = _collect(model, self.prompt, max_tokens=self.max_tokens)
        text = "".join(t.text for t in full)
        for stop in {text[len(text) // 3 : len(text) // 3 + 3], text[-2:]} - {""}:
            cut = _collect(model, self.prompt, max_tokens=self.max_tokens, stop=[stop])
            n = len(cut)
            if model.capabilities.token_ids:  # one engine token each, in order, none twice
                assert [t.id for t in cut] == [t.id for t in full[:n]], stop
            k = max(n - 1, 0)  # all but the last (which the stop may have cut) are whole
            assert [t.text for t in cut[:k]] == [t.text for t in full[:k]], stop
            assert "".join(t.text for t in cut) == text[: text.index(stop)], stop

    def test_result_when_the_consumer_breaks(self) -> None:
        model = self._shared()
        stream = model.generate(self.prompt, max_tokens=10_000)
        for _tok in stream:
            break
        stream.close()
        assert stream.finish_reason == "cancelled" and stream.err is None

    def test_result_when_cancelled(self) -> None:
        model = self._shared()
        ctx = Context.background().with_cancel()
        ctx.cancel()
        stream = model.generate(self.prompt, ctx=ctx)
        with contextlib.suppress(Cancelled):
            list(stream)
        assert stream.finish_reason == "cancelled" and isinstance(stream.err, Cancelled)

    def test_metrics_and_err_are_per_thread(self) -> None:
        model = self._shared()
        if model.capabilities.parallel_slots < 2:
            import pytest

            pytest.skip("needs parallel_slots >= 2")
        seen: dict[int, tuple[int, BaseException | None]] = {}
        gate = threading.Barrier(2, timeout=60)

        def work(n: int) -> None:
            ctx = Context.background().with_cancel()
            if n == 1:
                ctx.cancel()
            stream = model.generate(self.prompt, max_tokens=n + 2, ctx=ctx)
            gate.wait()
            with contextlib.suppress(Cancelled):
                list(stream)
            gate.wait()  # both calls have ended before either thread reads its own
            seen[n] = (model.metrics().generated_tokens, model.err())

        threads = [threading.Thread(target=work, args=(n,)) for n in (1, 2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert seen[1][0] == 0 and isinstance(seen[1][1], Cancelled)
        assert seen[2][1] is None and seen[2][0] in (1, 2, 3, 4)

    def test_tokenize_matches_what_generate_prefills(self) -> None:
        model = self._shared()
        _require(model, "tokenize")
        ids = model.tokenize(self.prompt)
        assert ids and all(isinstance(i, int) for i in ids)
        stream = model.generate(self.prompt, max_tokens=1)
        list(stream)
        assert stream.prompt_tokens == len(ids)
        assert self.prompt in model.detokenize(ids)
        assert model.context_len > len(ids)

    def test_detokenize_refuses_ids_outside_the_vocabulary(self) -> None:
        model = self._shared()
        _require(model, "tokenize")
        ids = model.tokenize(self.prompt)
        vocab = model.info().vocab_size
        assert model.detokenize(ids).strip()
        past = [[vocab], [ids[0], 2**40]] if vocab > 0 else []  # unknown (a server's): negatives only
        for bad in ([-1], [ids[0], -5], *past):
            try:
                model.detokenize(bad)
            except ValueError as exc:
                assert "is not a token id of this model" in str(exc), exc
            else:
                raise AssertionError(f"detokenize({bad}) did not raise ValueError")

    def test_chat_prompt_through_generate_is_chat(self) -> None:
        model = self._shared()
        _require(model, "chat_template")
        try:
            prompt = model.chat_prompt(self.chat_messages)
        except NotImplementedError:  # the engine renders chats itself (a remote chat endpoint)
            import pytest

            pytest.skip("the chat template is applied by the engine, not here")
        via_chat = model.chat(self.chat_messages, max_tokens=self.max_tokens)
        chat_ids = [t.id for t in via_chat]
        via_generate = model.generate(prompt, max_tokens=self.max_tokens)
        generate_ids = [t.id for t in via_generate]
        assert via_chat.prompt_tokens == via_generate.prompt_tokens  # no second BOS
        assert generate_ids[: len(chat_ids)] == chat_ids

    def test_every_call_after_close_raises_model_closed(self) -> None:
        import asyncio

        model = self.load_model()
        model.close()

        async def first(stream: Any) -> None:
            async for _ in stream:
                break

        for call in (
            lambda: model.chat_prompt(self.chat_messages),
            lambda: model.tokenize(self.prompt),
            lambda: model.detokenize([1, 2]),
            lambda: model.info(),
            lambda: model.generate(self.prompt),
            lambda: asyncio.run(first(model.agenerate(self.prompt))),
            lambda: asyncio.run(first(model.achat(self.chat_messages))),
        ):
            try:
                call()
            except ModelClosed:
                continue
            raise AssertionError("a call after close() did not raise ModelClosed")

    def test_async_result(self) -> None:
        import asyncio

        model = self._shared()

        async def run() -> tuple[list[Token], Any]:
            stream = model.agenerate(self.prompt, max_tokens=3)
            return [t async for t in stream], stream

        tokens, stream = asyncio.run(run())
        assert stream.finish_reason in ("length", "end_of_text") and stream.err is None
        assert stream.metrics.generated_tokens == len(tokens) and stream.prompt_tokens > 0

    def test_agenerate_validates_at_the_call(self) -> None:
        model = self._shared()
        bad: Callable[[], object]
        for bad in (
            lambda: model.agenerate(self.prompt, max_tokens=-1),
            lambda: model.agenerate(self.prompt, no_such_option=1),
            lambda: model.achat([{"role": "robot", "content": "hi"}]),
            lambda: model.achat(["not a message"]),
        ):
            try:
                bad()
            except (ValueError, TypeError):
                continue
            raise AssertionError("a bad async call did not fail at the call")
