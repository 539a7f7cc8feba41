"""The ``metal`` backend's model: mlx-lm's model and tokenizer behind the contract.

Generation runs mlx-lm's own ``generate_step`` (prefill in ``prefill_step_size`` chunks,
the next token computed while the current one is handed over) on a stream of the chosen
device; each token's text comes from a table of the tokenizer's bytes, so nothing
re-decodes the text so far. ``classify`` is one left-padded forward pass per batch
(a ``BatchKVCache``/``BatchRotatingKVCache`` per layer carries the padding into the
attention mask and the positions), and ``batch_generate`` runs mlx-lm's
``BatchGenerator``, dropping a prompt from the batch the step it stops.
"""

from __future__ import annotations

import gc
import importlib
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import nullcontext
from functools import partial
from typing import Any, TypeVar

from ...context import Context
from ...errors import ContextLengthExceeded, EngineError, InferenceError, ModelClosed, ModelLoadError
from ...formats.hf import HFFolder
from ...model import BaseModel
from ...streaming import BatchBook, MetricsRecorder, Piece, TokenFinisher, classify_results, engine_seed
from ...templates import BUILTIN_TEMPLATES, builtin_template, no_template_error, render_jinja
from ...types import (
    BatchResult,
    Capabilities,
    ClassifyResult,
    GenerateConfig,
    LoadConfig,
    Message,
    ModelInfo,
    Token,
)
from .config import mlx_config_overrides
from .pieces import token_pieces

DEFAULT_CONTEXT = 8192  # when the model's config names no context length
PREFILL_STEP = 512  # prompt tokens per forward pass; the context is checked between them
CLASSIFY_SEQS = 32  # prompts in one left-padded classify forward pass
BATCH_SEQS = 64  # prompts decoded together by batch_generate
PREFILL_SEQS = 16  # prompts BatchGenerator prefills together
PENALTY_WINDOW = 64  # tokens the repeat penalty looks back over (llama.cpp's default too)

_T = TypeVar("_T")


class MlxModel(BaseModel):
    """A Hugging Face folder loaded by mlx-lm on the GPU or MLX's CPU device."""

    def __init__(self, folder: HFFolder, cfg: LoadConfig, device: str) -> None:
        import mlx.core as mx

        try:
            step = int(cfg.engine_options.get("prefill_step_size", PREFILL_STEP))
        except (TypeError, ValueError):
            got = cfg.engine_options.get("prefill_step_size")
            raise ValueError(f"engine_options: prefill_step_size must be an integer, got {got!r}") from None
        if step < 1:
            raise ValueError(f"engine_options: prefill_step_size must be at least 1, got {step}")
        super().__init__(cfg.parallel_slots or 1)
        self.folder = folder
        self.path = folder.path
        self.model_type = folder.model_type
        self.device_name = device
        self.prefill_step_size = step
        self._mx = mx
        self._gen: Any = None  # mlx-lm's modules, imported on the engine thread (_load)
        self._samples: Any = None
        self._caches: Any = None
        self._device = mx.cpu if device == "cpu" else mx.gpu
        # MLX streams belong to the thread that made them ("There is no Stream(cpu, 0) in
        # current thread" elsewhere); each thread that touches MLX gets a stream and a worker
        # thread of its own that outlive it (one more for every agenerate(), which runs a
        # sync engine on a thread per stream); and a process where such a thread has ended
        # often aborts at exit ("terminate called without an active exception"). So all MLX
        # work of every model runs on one engine thread that lives as long as the process.
        self._engine = engine_thread()
        self._stream: Any = None
        self._model: Any = None
        self._tokenizer: Any = None
        try:
            self._model, self._tokenizer = self._on_engine(self._load)
        except BaseException:
            self._closed.set()
            self._free()
            raise
        tokenizer: Any = self._tokenizer
        n = len(tokenizer)
        self.context_len = cfg.context_len or folder.context_length or DEFAULT_CONTEXT
        self._pieces: Callable[[int], bytes] = token_pieces(tokenizer)
        self._eos = frozenset(int(i) for i in tokenizer.eos_token_ids) | frozenset(folder.eos_token_ids)
        self._pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._bos_text = folder.bos_token or tokenizer.bos_token or ""
        self._vocab_size = int(getattr(getattr(self._model, "args", None), "vocab_size", 0) or n)
        vocab: dict[str, int] = tokenizer.get_vocab()
        self._template = (
            None if folder.chat_template else builtin_template(self.model_type, vocab.__contains__)
        )
        self._chat_stops = self._end_of_turn_ids(vocab)

    def _load(self) -> tuple[Any, Any]:
        """mlx-lm's model and tokenizer for the folder (``ModelLoadError`` where it cannot)."""
        # mlx_lm.generate makes its generation stream when first imported: here, not on a
        # caller's thread
        self._gen = importlib.import_module("mlx_lm.generate")
        self._samples = importlib.import_module("mlx_lm.sample_utils")
        self._caches = importlib.import_module("mlx_lm.models.cache")
        utils: Any = importlib.import_module("mlx_lm.utils")
        self._stream = self._engine.stream(self._device)
        try:
            overrides = mlx_config_overrides(self.folder)
            with self._mx.stream(self._stream):
                # a local folder: mlx-lm never asks a hub for it
                model, tokenizer = utils.load(self.path, model_config=overrides or None)
                return model, tokenizer
        except (ModelLoadError, InferenceError):
            raise
        except (ValueError, KeyError, FileNotFoundError, OSError) as exc:
            raise ModelLoadError(f"{self.path}: mlx-lm cannot load it: {type(exc).__name__}: {exc}",
                                 path=self.path) from exc

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(
            chat_template=bool(self.folder.chat_template) or self._template is not None,
            parallel_slots=self._slots.size,
        )

    # -- prompts and templates -----------------------------------------------------------

    def _render_chat(self, messages: list[Message]) -> str:
        source = self.folder.chat_template
        if source:
            return render_jinja(source, messages, self.folder.bos_token or "", self.folder.eos_token or "")
        if self._template is None:
            raise no_template_error(self.path, self.model_type)
        return str(self._template.render(messages))

    def _end_of_turn_ids(self, vocab: dict[str, int]) -> frozenset[int]:
        """Tokens that end the assistant's turn in a chat, besides the model's EOS ids.

        A built-in template names them. A folder's own template usually ends turns with a
        token its generation config lists as EOS; where it does not, the end-of-turn tokens
        of the known formats that the template writes (``<end_of_turn>``, ``<|im_end|>``,
        ``<|eot_id|>``) stop the reply too.
        """
        if self._template is not None:
            names: set[str] = set(self._template.end_of_turn)
        else:
            source = self.folder.chat_template or ""
            names = {t for tpl in BUILTIN_TEMPLATES.values() for t in tpl.end_of_turn if t in source}
        return frozenset(vocab[t] for t in names if t in vocab)

    def _tokenize(self, text: str) -> list[int]:
        """The prompt's tokens; the tokenizer's BOS is added unless the text begins with it."""
        add = not (self._bos_text and text.startswith(self._bos_text))
        return list(self._tokenizer.encode(text, add_special_tokens=add))

    def _detokenize(self, ids: Sequence[int]) -> str:
        return str(self._tokenizer.decode(list(ids), skip_special_tokens=True))

    def _prompt_tokens(self, text: str) -> list[int]:
        tokens = self._tokenize(text)
        if not tokens:
            raise ValueError("prompt: it has no tokens (an empty prompt on a model that adds no BOS)")
        if len(tokens) + 1 > self.context_len:
            raise ContextLengthExceeded(len(tokens), self.context_len)
        return tokens

    # -- sampling --------------------------------------------------------------------------

    def _sampler(self, cfg: GenerateConfig) -> Any:
        """mlx-lm's sampler for ``cfg``; with a seed, its own key chain (no global state)."""
        mx, su = self._mx, self._samples
        top_k = cfg.top_k if 0 < cfg.top_k < self._vocab_size else 0
        if cfg.temperature == 0.0 or cfg.seed is None:
            return su.make_sampler(temp=cfg.temperature, top_p=cfg.top_p, top_k=top_k)
        # make_sampler draws from MLX's global random state, which concurrent calls share;
        # a seeded call draws from a key of its own, so it repeats whatever runs beside it.
        key = mx.random.key(engine_seed(cfg.seed, 64))
        temp, top_p = cfg.temperature, cfg.top_p

        def sample(logprobs: Any) -> Any:
            nonlocal key
            if 0 < top_p < 1.0:
                logprobs = su.apply_top_p(logprobs, top_p)
            if top_k:
                logprobs = su.apply_top_k(logprobs, top_k)
            key, sub = mx.random.split(key)
            return mx.random.categorical(logprobs * (1.0 / temp), key=sub)

        return sample

    def _processors(self, cfg: GenerateConfig) -> list[Any]:
        penalty = cfg.repeat_penalty
        if not penalty or penalty == 1.0:
            return []
        return list(self._samples.make_logits_processors(
            repetition_penalty=penalty, repetition_context_size=PENALTY_WINDOW))

    # -- streaming generation --------------------------------------------------------------

    def _engine_generate(
        self, prompt: str, cfg: GenerateConfig, ctx: Context, rec: MetricsRecorder
    ) -> Iterator[Piece]:
        return self._decode_stream(prompt, frozenset(), cfg, ctx, rec)

    def _engine_chat(
        self, prepared: str, cfg: GenerateConfig, ctx: Context, rec: MetricsRecorder
    ) -> Iterator[Piece]:
        return self._decode_stream(prepared, self._chat_stops, cfg, ctx, rec)

    def _decode_stream(
        self, text: str, stop: frozenset[int], cfg: GenerateConfig, ctx: Context, rec: MetricsRecorder
    ) -> Iterator[Piece]:
        mx = self._mx
        tokens = self._prompt_tokens(text)
        room = self.context_len - len(tokens)
        limit = min(cfg.max_tokens, room)
        stop = stop | self._eos
        pieces, on_engine = self._pieces, self._on_engine

        def progress(done: int, total: int) -> None:
            # raising here aborts mlx-lm's prefill between two chunks
            self._raise_if_ended(ctx, "during prefill")
            rec.prompt_tokens = done

        steps = self._on_engine(lambda: self._gen.generate_step(
            mx.array(tokens), self._model, self._stream, max_tokens=limit,
            sampler=self._sampler(cfg), logits_processors=self._processors(cfg),
            prefill_step_size=self.prefill_step_size, prompt_progress_callback=progress,
        ))

        def pull() -> int | None:
            # only the id leaves the engine thread: an MLX array freed on another thread
            # ties that thread to MLX (and a process where it ended may abort at exit)
            item = next(steps, None)
            return None if item is None else int(item[0])

        n = 0
        try:
            while True:
                tid = on_engine(pull)
                if tid is None:
                    return
                if n == 0:
                    rec.prefill_done(len(tokens))
                if tid in stop:
                    return
                n += 1
                yield tid, pieces(tid)
                if n >= limit:
                    if limit == room:
                        rec.finish_reason = "context_full"
                    return
        finally:
            on_engine(steps.close)
            self._read_memory(rec)

    def _on_engine(self, work: Callable[[], _T]) -> _T:
        """Run ``work`` on the engine thread, on this model's stream, and wait for its result."""

        def run() -> _T:
            with self._mx.stream(self._stream) if self._stream is not None else nullcontext():
                return work()

        return self._engine.call(run)

    def _raise_if_ended(self, ctx: Context, when: str) -> None:
        ctx.raise_if_done()
        if self._closed.is_set():
            raise ModelClosed(f"model closed {when}")

    def _read_memory(self, rec: MetricsRecorder) -> None:
        rec.active_memory_bytes = int(self._mx.get_active_memory())
        rec.peak_memory_bytes = int(self._mx.get_peak_memory())

    # -- classify --------------------------------------------------------------------------

    def _batch_cache(self, padding: list[int]) -> list[Any]:
        """The model's own cache kinds merged into batch caches that know each row's left padding."""
        make = self._caches.make_prompt_cache
        rows = [make(self._model) for _ in padding]
        layers = [type(layer).merge([row[i] for row in rows]) for i, layer in enumerate(rows[0])]
        for layer in layers:
            layer.prepare(left_padding=padding)
        return layers

    def _classify(
        self, prompts: list[str], cfg: GenerateConfig, ctx: Context, rec: MetricsRecorder
    ) -> list[ClassifyResult]:
        encoded: dict[int, list[int]] = {}
        errors: dict[int, BaseException] = {}
        for i, p in enumerate(prompts):
            try:
                encoded[i] = self._prompt_tokens(p)
            except (ContextLengthExceeded, ValueError) as exc:  # one bad prompt does not sink the batch
                errors[i] = exc
        done: dict[int, tuple[Token, list[float] | None]] = {}
        keys = list(encoded)
        rec.prefill_duration = 0.0
        for start in range(0, len(keys), CLASSIFY_SEQS):
            self._raise_if_ended(ctx, "during classify")
            group = keys[start : start + CLASSIFY_SEQS]
            began = time.perf_counter()
            out = self._on_engine(partial(self._classify_group, [encoded[k] for k in group], cfg))
            rec.prefill_duration += time.perf_counter() - began
            done.update(zip(group, out, strict=True))
            rec.first_token = rec.first_token or time.perf_counter()
        rec.prefill_end = time.perf_counter()
        self._read_memory(rec)
        return classify_results(len(prompts), encoded, errors, done, rec)

    def _classify_group(
        self, group: list[list[int]], cfg: GenerateConfig
    ) -> list[tuple[Token, list[float] | None]]:
        """One forward pass over the group, left-padded; the token at each row's last position.

        Runs on the engine thread (``_on_engine``).
        """
        mx = self._mx
        width = max(map(len, group))
        padding = [width - len(p) for p in group]
        cache = self._batch_cache(padding)
        inputs = mx.array([[self._pad] * pad + p for pad, p in zip(padding, group, strict=True)])
        logits = self._model(inputs, cache=cache)[:, -1, :]
        processors = self._processors(cfg)
        rows = []
        for r, prompt in enumerate(group):
            row = logits[r : r + 1]
            if processors:
                context = mx.array(prompt)
                for proc in processors:
                    row = proc(context, row)
            logprobs = row - mx.logsumexp(row, axis=-1, keepdims=True)
            rows.append(self._sampler(cfg)(logprobs))
        picks = mx.concatenate(rows)
        mx.eval(picks, logits)
        ids = picks.tolist()
        raw = logits.astype(mx.float32).tolist() if cfg.return_logits else None
        out: list[tuple[Token, list[float] | None]] = []
        for r, tid in enumerate(ids):
            text = self._pieces(tid).decode("utf-8", "replace")
            out.append((Token(tid, text), raw[r] if raw is not None else None))
        return out

    # -- batch generation --------------------------------------------------------------------

    def _batch_generate(
        self, prompts: list[str], cfg: GenerateConfig, ctx: Context, rec: MetricsRecorder
    ) -> list[BatchResult]:
        errors: dict[int, BaseException] = {}
        encoded: dict[int, list[int]] = {}
        for i, p in enumerate(prompts):
            try:
                encoded[i] = self._prompt_tokens(p)
            except Exception as exc:  # one bad prompt does not sink the batch
                errors[i] = exc
        book = BatchBook(encoded, errors, cfg, rec)
        if encoded and cfg.max_tokens:
            keys = list(encoded)
            for start in range(0, len(keys), BATCH_SEQS):
                group = keys[start : start + BATCH_SEQS]
                self._decode_together(group, encoded, book.finishers, book.tokens, cfg, ctx, rec)
        self._read_memory(rec)
        return book.results(len(prompts))

    def _decode_together(
        self,
        keys: list[int],
        encoded: dict[int, list[int]],
        finishers: dict[int, TokenFinisher],
        tokens: dict[int, list[Token]],
        cfg: GenerateConfig,
        ctx: Context,
        rec: MetricsRecorder,
    ) -> None:
        """Decode up to ``BATCH_SEQS`` prompts on one ``BatchGenerator``, one step at a time.

        Each prompt's tokens go through its own ``TokenFinisher`` as they come, so a prompt
        stops at its stop string or id the step it appears (as ``generate`` would) and is
        removed from the batch then; the call's context is checked between steps.
        """
        limits = {k: min(cfg.max_tokens, self.context_len - len(encoded[k])) for k in keys}
        processors = self._processors(cfg)
        clock = time.perf_counter
        # The generator (and every MLX array in its responses) stays on the engine thread:
        # only ids and finish reasons come back here (see _decode_stream's pull).
        held: list[Any] = [self._on_engine(lambda: self._gen.BatchGenerator(
            self._model, max_tokens=cfg.max_tokens, stream=self._stream,
            completion_batch_size=BATCH_SEQS, prefill_batch_size=min(PREFILL_SEQS, len(keys)),
            prefill_step_size=self.prefill_step_size,
        ))]

        def step() -> list[tuple[int, int, str | None]]:
            return [(r.uid, int(r.token), r.finish_reason) for r in held[0].next_generated()]

        def finish() -> None:
            held[0].close()
            held.clear()

        try:
            uids = self._on_engine(lambda: held[0].insert(
                [encoded[k] for k in keys], max_tokens=[limits[k] for k in keys],
                samplers=[self._sampler(cfg) for _ in keys],
                logits_processors=[list(processors) for _ in keys],
            ))
            owner = dict(zip(uids, keys, strict=True))
            live = set(uids)
            pieces, eos = self._pieces, self._eos
            first = True
            while live:
                self._raise_if_ended(ctx, "during batch_generate")
                began = clock()
                responses = self._on_engine(step)
                spent = clock() - began
                if first:
                    rec.prefill_duration = (rec.prefill_duration or 0.0) + spent
                    rec.prefill_done(rec.prompt_tokens + sum(len(encoded[k]) for k in keys))
                    first = False
                else:
                    rec.decode_duration = (rec.decode_duration or 0.0) + spent
                drop = []
                for uid, tid, engine_finish in responses:
                    if uid not in live:
                        continue
                    key = owner[uid]
                    fin = finishers[key]
                    if tid in eos:
                        tokens[key] += fin.end()
                    else:
                        tokens[key] += fin.push(tid, pieces(tid))
                        if fin.finish_reason is None and engine_finish is not None:
                            # the engine stopped it: at our limit, which is the context's room
                            tokens[key] += fin.end("context_full")
                    if fin.finish_reason is not None:
                        live.discard(uid)
                        if engine_finish is None:
                            drop.append(uid)
                if drop:
                    self._on_engine(partial(lambda ids: held[0].remove(ids), drop))
                if not responses and live:
                    raise EngineError("mlx-lm's BatchGenerator stopped with prompts still running")
        finally:
            self._on_engine(finish)

    # -- errors --------------------------------------------------------------------------------

    def _map_engine_error(self, exc: Exception) -> InferenceError:
        """MLX's and mlx-lm's failures as contract errors: the one place they are mapped.

        MLX reports what goes wrong in its C++ core as ``RuntimeError`` (an allocation
        that failed, a Metal command buffer error) and shape or dtype faults as
        ``ValueError``, which the base class passes through as a caller's mistake.
        """
        text = str(exc)
        lower = text.lower()
        if isinstance(exc, MemoryError) or any(w in lower for w in ("out of memory", "unable to allocate",
                                                                       "malloc")):
            return EngineError(f"mlx: out of memory ({text})" if text else "mlx: out of memory")
        if isinstance(exc, RuntimeError):
            return EngineError(f"mlx: {text}")
        return EngineError(f"mlx: {type(exc).__name__}: {text}")

    # -- description and teardown --------------------------------------------------------------

    def _describe(self) -> ModelInfo:
        f = self.folder
        params = 0
        if not f.quant_bits and self._model is not None:
            flatten: Any = importlib.import_module("mlx.utils").tree_flatten
            params = sum(int(v.size) for _, v in flatten(self._model.parameters()))
        return ModelInfo(
            architecture=f.model_type,
            vocab_size=f.vocab_size or self._vocab_size,
            num_layers=f.num_layers,
            hidden_size=f.hidden_size,
            context_length=f.context_length,
            quant_bits=f.quant_bits,
            quant_group=f.quant_group,
            quant_type=f.quantisation,
            parameters=params,
        )

    @property
    def active_memory(self) -> int:
        """Bytes MLX holds in arrays now (all models of this process together)."""
        return int(self._mx.get_active_memory())

    def _close_engine(self) -> None:
        if getattr(self, "_engine", None) is None:  # __init__ failed before there was one
            return

        def free() -> None:
            self._model = self._tokenizer = None
            gc.collect()  # the weights go when the last array referring to them does
            if self._stream is not None:
                self._mx.synchronize(self._stream)
            self._mx.clear_cache()

        self._on_engine(free)


class EngineThread:
    """The one thread that runs MLX for every model of the process; it never ends (see MlxModel)."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[tuple[Future[Any], Callable[[], Any]]] = queue.SimpleQueue()
        self._streams: dict[str, Any] = {}
        self._thread = threading.Thread(target=self._loop, name="core-inference mlx", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            done, work = self._jobs.get()
            if not done.set_running_or_notify_cancel():
                continue
            try:
                done.set_result(work())
            except BaseException as exc:  # handed to the caller waiting for it
                done.set_exception(exc)
            del done, work  # nothing of a finished job stays referenced while the thread waits

    def call(self, work: Callable[[], _T]) -> _T:
        """Run ``work`` on the engine thread and return its result (raise its exception)."""
        if threading.current_thread() is self._thread:  # from the engine thread itself (a finaliser)
            return work()
        done: Future[_T] = Future()
        self._jobs.put((done, work))
        return done.result()

    def stream(self, device: Any) -> Any:
        """The engine thread's stream on ``device`` (call it on the engine thread)."""
        import mlx.core as mx

        key = str(device)
        if key not in self._streams:
            self._streams[key] = mx.new_stream(device)
        return self._streams[key]


_engine_lock = threading.Lock()
_engine: EngineThread | None = None


def engine_thread() -> EngineThread:
    """The process's MLX engine thread, started on first use."""
    global _engine
    with _engine_lock:
        if _engine is None:
            _engine = EngineThread()
        return _engine


__all__ = ["EngineThread", "MlxModel", "engine_thread"]
