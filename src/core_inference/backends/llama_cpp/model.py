"""The ``llama_cpp`` backend: GGUF models through llama-cpp-python's low-level bindings.

Sampling runs in llama.cpp's C sampler chain (no Python pass over the vocabulary; a
greedy pick is an argmax over the logits in place). Every stream, ``classify`` and
``batch_generate`` of a model is a job of its scheduler (``scheduler.py``), which decodes
them together: continuous batching with chunked prefill at fixed chunk boundaries.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

from ...context import Context
from ...errors import ContextLengthExceeded, EngineError, InferenceError, ModelClosed
from ...formats.gguf import GGML_TYPES, GGUFHeader
from ...memory import cpu_count, process_memory
from ...model import BaseModel
from ...streaming import MetricsRecorder, Piece, TokenFinisher
from ...templates import builtin_template, no_template_error, render_jinja
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

DEFAULT_CONTEXT = 8192  # used when the model's own is larger and none is asked for
PREFILL_CHUNK = 512  # prompt tokens per chunk, cut at multiples of it whatever else runs
CLASSIFY_SEQS = 32  # prompts of one classify in flight at once
BATCH_SEQS = 64  # prompts of one batch_generate decoded together (llama.cpp allows 256)
MAX_CONTEXT_TOKENS = 0xFFFFFFFF  # llama.cpp's n_ctx is a uint32


class LlamaCppModel(BaseModel):
    """A GGUF model loaded in llama.cpp, serving ``parallel_slots`` sequences at once."""

    def __init__(self, path: str, header: GGUFHeader, cfg: LoadConfig) -> None:
        from . import engine, scheduler

        slots = cfg.parallel_slots or 1
        try:
            chunk = int(cfg.engine_options.get("prefill_chunk", PREFILL_CHUNK))
        except (TypeError, ValueError):
            got = cfg.engine_options.get("prefill_chunk")
            raise ValueError(f"engine_options: prefill_chunk must be an integer, got {got!r}") from None
        if cfg.context_len * slots > MAX_CONTEXT_TOKENS:
            raise ValueError(
                f"context_len: {cfg.context_len} tokens x {slots} parallel slots is more than "
                f"llama.cpp's limit of {MAX_CONTEXT_TOKENS} tokens"
            )
        super().__init__(slots)
        self.path = path
        self.header = header
        self.model_type = header.architecture
        self.threads = cfg.threads or cpu_count()
        self.prefill_chunk = chunk
        self._engine = engine
        self._scheduler = scheduler
        self._engine_lock = threading.Lock()  # one llama.cpp call at a time on this model
        self._batch_lock = threading.Lock()  # one classify/batch_generate at a time on _batch_ctx
        self._model: Any = None
        self._ctx: Any = None
        self._batch_ctx: Any = None
        self._sched: Any = None
        self._free_seqs = list(range(slots))
        try:
            self._model = engine.Model(path, cfg.gpu_layers)
            train = self._model.n_ctx_train or DEFAULT_CONTEXT
            self.context_len = cfg.context_len or min(train, DEFAULT_CONTEXT)
            n_batch = min(max(512, chunk, slots), 4096)
            self._ctx = self._model.new_context(self.context_len * slots, slots, n_batch, self.threads)
            # every stream, classify and batch_generate of this model decodes in its steps
            self._sched = scheduler.Scheduler(self._model, min(max(1, chunk), n_batch),
                                              self._engine_lock, self._closed)
            self._template = self._find_template()
            bos = self._model.bos
            self._bos_text = self._model.special_text(bos) if bos >= 0 and self._model.adds_bos else ""
        except BaseException:
            # A model that never was: free what was made now (not when the garbage
            # collector finds it), and no "was not closed" warning for it.
            self._closed.set()
            self._free()
            raise

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(
            chat_template=bool(self.header.chat_template) or self._template is not None,
            parallel_slots=self._slots.size,
        )

    # -- prompts and templates ---------------------------------------------------------

    def _find_template(self) -> Any:
        if self.header.chat_template:
            return None
        return builtin_template(self.model_type, lambda t: self._model.single_token(t) is not None)

    def _render_chat(self, messages: list[Message]) -> str:
        source = self.header.chat_template
        if source:
            bos, eos = self._model.special_text(self._model.bos), self._model.special_text(self._model.eos)
            return render_jinja(source, messages, bos, eos)
        if self._template is None:
            raise no_template_error(self.path, self.model_type)
        return str(self._template.render(messages))

    def _end_of_turn_ids(self) -> frozenset[int]:
        if self._template is None:
            return frozenset()
        ids = (self._model.single_token(t) for t in self._template.end_of_turn)
        return frozenset(i for i in ids if i is not None)

    def _tokenize(self, text: str) -> list[int]:
        """The prompt's tokens, with the model's BOS first unless the text begins with it.

        The add-BOS rule: llama.cpp adds BOS (where the model asks for one) to any text,
        so a chat prompt, whose template already wrote ``<bos>``, would get two. A prompt
        that begins with the BOS token's own text gets none added.
        """
        bos = self._bos_text
        add = not (bos and text.startswith(bos))
        tokens: list[int] = self._model.tokenize(text, add_special=add)
        return tokens

    def _detokenize(self, ids: Sequence[int]) -> str:
        return b"".join(self._model.piece(i) for i in ids).decode("utf-8", "replace")

    def _prompt_tokens(self, text: str) -> list[int]:
        tokens = self._tokenize(text)
        if len(tokens) + 1 > self.context_len:
            raise ContextLengthExceeded(len(tokens), self.context_len)
        return tokens

    # -- streaming generation ----------------------------------------------------------

    def _engine_generate(
        self, prompt: str, cfg: GenerateConfig, ctx: Context, rec: MetricsRecorder
    ) -> Iterator[Piece]:
        return self._decode_stream(prompt, frozenset(), cfg, ctx, rec)

    def _engine_chat(
        self, prepared: str, cfg: GenerateConfig, ctx: Context, rec: MetricsRecorder
    ) -> Iterator[Piece]:
        return self._decode_stream(prepared, self._end_of_turn_ids(), cfg, ctx, rec)

    def _decode_stream(
        self, text: str, stop: frozenset[int], cfg: GenerateConfig, ctx: Context, rec: MetricsRecorder
    ) -> Iterator[Piece]:
        """One stream as a job of the model's scheduler: its tokens come as the steps go."""
        tokens = self._prompt_tokens(text)
        llama, model, sched = self._ctx, self._model, self._sched
        seq = self._free_seqs.pop()
        sampler = job = None
        usage = self._scheduler.Usage()
        rec.prefill_duration = 0.0  # this call's own decodes, not the waits for its turn
        try:
            sampler = self._engine.Sampler(cfg, model.n_vocab)
            sampler.accept_all(tokens)
            room = min(llama.per_seq, self.context_len) - len(tokens)
            limit = min(cfg.max_tokens, room)
            job = self._scheduler.Job(llama, seq, tokens, sampler, limit, stop, usage, ctx)
            sched.submit(job)
            n = 0
            while True:
                tid = sched.next_token(job)
                if n == 0:
                    rec.prefill_done(len(tokens))
                    rec.prefill_duration = usage.prefill
                rec.decode_duration = usage.decode
                if tid is None or model.is_eog(tid) or tid in stop:
                    break
                n += 1
                yield tid, model.piece(tid)
                if n == limit:
                    if limit == room:
                        rec.finish_reason = "context_full"
                    break
        finally:
            if job is None:
                if sampler is not None:
                    sampler.free()
            else:
                if job.done < len(tokens):
                    rec.prompt_tokens = job.done  # how far prefill got, if it was cut short
                    rec.prefill_duration = usage.prefill
                sched.release(job)
            self._free_seqs.append(seq)
            rec.active_memory_bytes, rec.peak_memory_bytes = process_memory()

    # -- classify and batch generation -------------------------------------------------

    @property
    def decode_calls(self) -> int:
        """Batches run through llama.cpp so far (each ``llama_decode`` call counts once)."""
        return sum(c.decode_calls for c in (self._ctx, self._batch_ctx) if c is not None)

    def _batch_context(self, n_seq: int, per_seq: int) -> Any:
        """A context for packed batches, grown (recreated) when a call needs more room.

        Only the call holding ``_batch_turn`` has sequences on it, and it grows it before
        submitting any, so the scheduler never runs on a context being replaced.
        """
        have = self._batch_ctx
        if have is not None and have.n_seq >= n_seq and have.per_seq >= per_seq:
            return have
        with self._engine_lock:
            if have is not None:
                have.free()
                self._batch_ctx = None
            per_seq = max(per_seq, have.per_seq if have else 0)
            n_seq = max(n_seq, have.n_seq if have else 0)
            n_batch = min(max(self.prefill_chunk, n_seq, 512), 4096)
            # llama.cpp lowers n_batch to a smaller n_ctx: no prompt is cut differently for it,
            # as every prompt is shorter than its sequence (and so than n_ctx)
            self._batch_ctx = self._model.new_context(n_seq * per_seq, n_seq, n_batch, self.threads)
        return self._batch_ctx

    def _seq_cells(self, need: int) -> int:
        """Cells per sequence of the batch context for ``need`` tokens: a multiple of 256.

        llama.cpp attends over the cells in use rounded up to 256, or all of a sequence's
        cells if it has fewer, and where that count differs logits differ in the last
        bits; so batch sequences get what the streams' (larger) sequences would attend
        over, never more room than the context.
        """
        return min(_round_up(need, 256), max(self.context_len, 1))

    @contextmanager
    def _batch_turn(self, ctx: Context) -> Iterator[None]:
        """Hold the batch context: classify and batch_generate calls take turns on it.

        They use its sequences 0..n-1 (and may grow it, freeing the old one), so two at
        once would mix their sequences. Their steps are shared with the streams all the
        same. The wait ends early if the call's context ends or the model closes.
        """
        while not self._batch_lock.acquire(timeout=0.02):
            self._raise_if_ended(ctx, "while waiting for the batch context")
        try:
            yield
        finally:
            self._batch_lock.release()

    def _raise_if_ended(self, ctx: Context, when: str) -> None:
        """``Cancelled``/``DeadlineExceeded`` if ``ctx`` ended, ``ModelClosed`` ("model closed <when>")."""
        ctx.raise_if_done()
        if self._closed.is_set():
            raise ModelClosed(f"model closed {when}")

    def _run_jobs(
        self,
        encoded: dict[int, list[int]],
        llama: Any,
        cfg: GenerateConfig,
        limit: Callable[[int], int],
        on_tokens: Callable[[int, Any, list[int], bool], bool],
        ctx: Context,
        usage: Any,
    ) -> None:
        """Run one job per prompt on ``llama``'s sequences, as many at once as it has.

        ``on_tokens(key, job, new, final)`` gets each prompt's tokens as they come (``final``:
        they are its last) and returns True once that prompt wants no more (a stop string);
        a finished prompt's sequence goes to the next one waiting.
        """
        sched = self._sched
        waiting = deque(encoded)
        free = list(range(llama.n_seq))[::-1]
        live: dict[int, Any] = {}
        try:
            while waiting or live:
                while waiting and free:
                    key = waiting.popleft()
                    sampler = self._engine.Sampler(cfg, self._model.n_vocab)
                    try:
                        sampler.accept_all(encoded[key])
                        job = self._scheduler.Job(llama, free.pop(), encoded[key], sampler, limit(key),
                                                  frozenset(), usage, ctx, cfg.return_logits)
                    except BaseException:
                        sampler.free()
                        raise
                    live[key] = job
                    sched.submit(job)
                sched.wait_any(list(live.values()), ctx)
                for key, job in list(live.items()):
                    if job.error is not None:  # the call's own end first, else the engine's error
                        self._raise_if_ended(ctx, "during the call")
                        raise job.error
                    final = job.finished  # read first: once set, every token is in job.out
                    new = sched.take(job)
                    wants_no_more = on_tokens(key, job, new, final) if new or final else False
                    if wants_no_more or final:
                        del live[key]
                        sched.release(job)
                        free.append(job.seq)
        finally:
            for job in live.values():
                sched.release(job)

    def _classify(
        self, prompts: list[str], cfg: GenerateConfig, ctx: Context, rec: MetricsRecorder
    ) -> list[ClassifyResult]:
        encoded: dict[int, list[int]] = {}
        errors: dict[int, BaseException] = {}
        for i, p in enumerate(prompts):
            try:
                encoded[i] = self._prompt_tokens(p)
            except ContextLengthExceeded as exc:  # one prompt too long does not sink the batch
                errors[i] = exc
        done: dict[int, tuple[Token, Any]] = {}
        usage = self._scheduler.Usage()

        def got(key: int, job: Any, new: list[int], final: bool) -> bool:
            if not new:
                return True
            tid = new[0]
            done[key] = (Token(tid, self._model.piece(tid).decode("utf-8", "replace")), job.logits)
            rec.first_token = rec.first_token or time.perf_counter()
            return True

        if encoded:
            per_seq = self._seq_cells(max(map(len, encoded.values())) + 1)
            with self._batch_turn(ctx):
                llama = self._batch_context(min(len(encoded), CLASSIFY_SEQS), per_seq)
                self._run_jobs(encoded, llama, cfg, lambda _: 1, got, ctx, usage)
        rec.prefill_duration = usage.prefill
        rec.prompt_tokens = sum(map(len, encoded.values()))
        rec.generated_tokens = len(done)
        rec.prefill_end = time.perf_counter()
        rec.decode_duration, rec.decoded_tokens = 0.0, 0
        rec.active_memory_bytes, rec.peak_memory_bytes = process_memory()
        batch = rec.finish()
        results = []
        for i in range(len(prompts)):
            if i in errors:
                results.append(ClassifyResult(Token(-1, ""), None, 0, batch, errors[i]))
                continue
            token, logits = done[i]
            mine = replace(batch, prompt_tokens=len(encoded[i]), generated_tokens=1)
            results.append(ClassifyResult(token, logits, len(encoded[i]), mine))
        return results

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
        recs = {k: MetricsRecorder(start=rec.start) for k in encoded}
        finishers = {k: TokenFinisher(cfg, recs[k]) for k in encoded}
        tokens: dict[int, list[Token]] = {k: [] for k in encoded}
        usage = self._scheduler.Usage()
        if encoded and cfg.max_tokens:
            # room for the longest prompt and max_tokens, but never more than the context
            longest = max(map(len, encoded.values()))
            per_seq = self._seq_cells(longest + cfg.max_tokens + 1)
            with self._batch_turn(ctx):
                llama = self._batch_context(min(len(encoded), BATCH_SEQS), per_seq)
                # as generate: no position past the context
                room = {k: min(llama.per_seq, self.context_len) - len(p) for k, p in encoded.items()}

                def got(key: int, job: Any, new: list[int], final: bool) -> bool:
                    fin = finishers[key]
                    for tid in new:
                        if self._model.is_eog(tid):
                            tokens[key] += fin.end()
                            return True
                        tokens[key] += fin.push(tid, self._model.piece(tid))
                        if fin.finish_reason is not None:
                            return True
                    if final and job.produced >= room[key]:
                        tokens[key] += fin.end("context_full")
                    return False

                self._run_jobs(encoded, llama, cfg, lambda k: min(cfg.max_tokens, room[k]), got, ctx, usage)
        rec.prefill_duration, rec.decode_duration = usage.prefill, usage.decode
        rec.prompt_tokens = sum(map(len, encoded.values()))
        rec.prefill_end = time.perf_counter()
        rec.generated_tokens = sum(f.count for f in finishers.values())
        rec.decoded_tokens = rec.generated_tokens - sum(1 for f in finishers.values() if f.count)
        rec.first_token = min((r.first_token for r in recs.values() if r.first_token), default=0.0)
        rec.active_memory_bytes, rec.peak_memory_bytes = process_memory()
        batch = rec.finish()
        results = []
        for i in range(len(prompts)):
            if i in errors:
                results.append(BatchResult(err=errors[i], finish_reason="error", metrics=batch))
                continue
            fin, first = finishers[i], recs[i].first_token
            mine = replace(batch, prompt_tokens=len(encoded[i]), generated_tokens=fin.count,
                           time_to_first_token=first - rec.start if first else 0.0)
            results.append(BatchResult(tuple(tokens[i]), None, fin.finish_reason or "length", fin.stop,
                                       len(encoded[i]), mine))
        return results

    # -- errors --------------------------------------------------------------------------

    def _map_engine_error(self, exc: Exception) -> InferenceError:
        """llama-cpp-python's failures as contract errors: the one place they are mapped.

        ``engine.py`` already raises ``EngineError`` for what llama.cpp reports (a failed
        decode, a context it could not make, a tokenizer error); what remains are ctypes'
        own errors and the process running out of memory.
        """
        if isinstance(exc, MemoryError):
            return EngineError("llama.cpp: out of memory")
        return EngineError(f"llama.cpp: {type(exc).__name__}: {exc}")

    # -- description and teardown ------------------------------------------------------

    def _describe(self) -> ModelInfo:
        h = self.header
        quant, bits = h.file_type
        return ModelInfo(
            architecture=h.architecture,
            vocab_size=self._model.n_vocab if self._model.ptr else h.vocab_size,
            num_layers=int(h.arch_value("block_count", 0)),
            hidden_size=int(h.arch_value("embedding_length", 0)),
            context_length=int(h.arch_value("context_length", 0)),
            quant_bits=bits,
            quant_group=_quant_group(quant),
            quant_type=quant,
        )

    def _close_engine(self) -> None:
        if self._sched is not None and not self._sched.shutdown():
            return  # interpreter exit: its thread may be frozen mid-step; the process frees it all
        with self._engine_lock:
            if self._batch_ctx is not None:
                self._batch_ctx.free()
                self._batch_ctx = None
            if self._ctx is not None:
                self._ctx.free()
                self._ctx = None
            if self._model is not None:
                self._model.free()


def _round_up(n: int, k: int) -> int:
    return (n + k - 1) // k * k


def _quant_group(quant: str) -> int:
    """Weights per quantisation block for a GGUF file type name (0 for float types)."""
    base = quant.split("_")[0] + ("_K" if "_K" in quant else "")
    for name, block, _ in GGML_TYPES.values():
        if name in (base, quant):
            return block if block > 1 else 0
    return 0


__all__ = ["LlamaCppModel"]
