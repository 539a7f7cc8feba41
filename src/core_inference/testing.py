"""A public fake backend and the contract test suite every backend's tests reuse.

``FakeBackend`` / ``FakeModel`` stream scripted tokens with optional delays and
failures, for testing code written against the contract without an engine.
``BackendContract`` is a pytest test class: subclass it, implement ``load_model``,
and every contract rule runs against your backend.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

from .backend import BaseBackend
from .context import Context
from .errors import Cancelled, DeadlineExceeded, InferenceError, ModelClosed
from .model import BaseModel
from .protocols import TextModel
from .streaming import MetricsRecorder, Piece
from .types import ClassifyResult, GenerateConfig, LoadConfig, Message, ModelInfo, Token

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

    def chat_prompt(self, messages: list[Message]) -> str:
        return "".join(f"<{m.role}>{m.content}</{m.role}>" for m in messages) + "<assistant>"

    def _classify(
        self, prompts: list[str], cfg: GenerateConfig, ctx: Context, rec: MetricsRecorder
    ) -> list[ClassifyResult]:
        out = []
        for prompt in prompts:
            ctx.raise_if_done()
            tid = self._ids(prompt)[-1]
            logits = [1.0 if i == tid else 0.0 for i in range(len(self.vocab))]
            out.append(ClassifyResult(Token(tid, self.vocab[tid]), logits if cfg.return_logits else None))
        return out

    def info(self) -> ModelInfo:
        return ModelInfo(architecture="fake", vocab_size=len(self.vocab), context_length=4096)

    def _close_engine(self) -> None:
        self.engine_closed = True


class FakeBackend(BaseBackend):
    """A backend that loads ``FakeModel``s from any existing path; settings pass through."""

    name = "fake"
    extra = ""
    formats = ("gguf", "safetensors", "url")

    def __init__(self, name: str = "fake", available: bool = True, **model_kw: Any) -> None:
        self.name = name  # type: ignore[misc]
        self._available = available
        self.model_kw = model_kw
        self.loaded: list[str] = []

    def why_unavailable(self) -> str | None:
        return None if self._available else "the fake backend was made unavailable"

    def can_load(self, path: str | os.PathLike[str]) -> bool:
        return True

    def _load(self, path: str, cfg: LoadConfig) -> TextModel:
        self.loaded.append(path)
        kw = {"parallel_slots": cfg.parallel_slots or 1, **self.model_kw}
        return FakeModel(**kw)


def _collect(model: TextModel, prompt: str, **kw: Any) -> list[Token]:
    return list(model.generate(prompt, **kw))


class BackendContract:
    """The contract suite: subclass, implement ``load_model``, and pytest runs every rule.

    Each rule uses greedy decoding, so outputs are deterministic on any engine.
    """

    prompt: ClassVar[str] = "The capital of France is"
    chat_messages: ClassVar[list[Message]] = [Message("user", "Say hello.")]
    max_tokens: ClassVar[int] = 12
    threads: ClassVar[int] = 8

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
        results = model.classify([self.prompt, "Hello"])
        assert len(results) == 2 and all(r.logits is None for r in results)
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
            assert [t.id for t in res.tokens] == [t.id for t in _collect(model, prompt, max_tokens=6)]

    def test_info_and_model_type(self) -> None:
        model = self._shared()
        assert isinstance(model.model_type, str) and model.model_type
        assert model.info().architecture

    def test_threads_never_mix(self) -> None:
        model = self._shared()
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
