"""The ``llama_cpp`` backend: GGUF models through llama-cpp-python's low-level bindings.

Sampling runs in llama.cpp's C sampler chain (no Python pass over the vocabulary),
prompts are prefilled in chunks with the context checked between them, ``classify``
packs prompts as separate sequences of one batch, and ``batch_generate`` decodes every
prompt together, one batch per step.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from ...context import Context
from ...errors import ContextLengthExceeded, EngineError, InferenceError, ModelClosed
from ...formats.gguf import GGML_TYPES, GGUFHeader
from ...memory import cpu_count, process_memory
from ...model import BaseModel
from ...streaming import BatchBook, MetricsRecorder, Piece, TokenFinisher, classify_results
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
PREFILL_CHUNK = 512  # prompt tokens per decode while a stream has the model to itself (one n_batch)
SHARED_PREFILL_CHUNK = 128  # ... and while other streams wait for their next token
WATCH_PREFILL_OVER = SHARED_PREFILL_CHUNK  # longer prompts are watched: cancel or close stops a decode
WATCH_INTERVAL = 0.01  # seconds between the watcher's looks at the call's context
CLASSIFY_SEQS = 32  # prompts packed into one classify batch
BATCH_SEQS = 64  # prompts decoded together by one batch_generate step (llama.cpp allows 256)
MAX_CONTEXT_TOKENS = 0xFFFFFFFF  # llama.cpp's n_ctx is a uint32


class LlamaCppModel(BaseModel):
    """A GGUF model loaded in llama.cpp, serving ``parallel_slots`` sequences at once."""

    def __init__(self, path: str, header: GGUFHeader, cfg: LoadConfig) -> None:
        from . import engine

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
        self._engine_lock = threading.Lock()  # one llama.cpp call at a time on this model
        self._batch_lock = threading.Lock()  # one classify/batch_generate at a time on _batch_ctx
        self._abort_lock = threading.Lock()  # guards _armed: which call may abort the running decode
        self._armed: object | None = None
        self._model: Any = None
        self._ctx: Any = None
        self._batch_ctx: Any = None
        self._free_seqs = list(range(slots))
        try:
            self._model = engine.Model(path, cfg.gpu_layers)
            train = self._model.n_ctx_train or DEFAULT_CONTEXT
            self.context_len = cfg.context_len or min(train, DEFAULT_CONTEXT)
            self._ctx = self._model.new_context(self.context_len * slots, slots, 512, self.threads)
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
        tokens = self._prompt_tokens(text)
        llama, model = self._ctx, self._model
        clock = time.perf_counter
        seq = self._free_seqs.pop()
        sampler = None
        try:
            sampler = self._engine.Sampler(cfg, self._model.n_vocab)
            sampler.accept_all(tokens)
            with self._engine_lock:
                llama.clear_seq(seq)
            tid = self._prefill(tokens, seq, ctx, sampler, rec)
            rec.prefill_done(len(tokens))
            pos = len(tokens)
            room = min(llama.per_seq, self.context_len) - pos
            limit = min(cfg.max_tokens, room)
            batch = llama.batch
            decode = 0.0  # this call's own decode time: its decodes only, never a neighbour's
            rec.decode_duration = 0.0
            for n in range(1, limit + 1):
                if model.is_eog(tid) or tid in stop:
                    break
                yield tid, model.piece(tid)
                if n == limit:
                    if limit == room:
                        rec.finish_reason = "context_full"
                    break
                with self._engine_lock:  # decode and sample together: logits belong to the last decode
                    t = clock()
                    batch.clear()
                    batch.add(tid, pos, seq, True)
                    llama.decode()
                    tid = sampler.sample(llama, 0)
                    decode += clock() - t
                rec.decode_duration = decode
                pos += 1
        finally:
            if sampler is not None:
                sampler.free()
            with self._engine_lock:
                if self._ctx is not None:
                    llama.clear_seq(seq)
            self._free_seqs.append(seq)
            rec.active_memory_bytes, rec.peak_memory_bytes = process_memory()

    def _prefill(
        self, tokens: list[int], seq: int, ctx: Context, sampler: Any, rec: MetricsRecorder
    ) -> int:
        """Decode the prompt in chunks, checking the context between them; sample the first token.

        A stream alone on the model prefills ``prefill_chunk`` tokens a decode; while other
        streams wait for their next token, chunks shrink to ``SHARED_PREFILL_CHUNK`` so that
        they get turns. A long prompt is watched meanwhile: its context ending, or
        ``close()``, stops llama.cpp inside the running decode, not after it.
        """
        llama = self._ctx
        clock = time.perf_counter
        rec.prefill_duration = 0.0  # this call's own decodes, not the waits for its turn
        with self._watch(llama, ctx, len(tokens) > WATCH_PREFILL_OVER) as me:
            start = 0
            while start < len(tokens):
                self._raise_if_ended(ctx, "during prefill")
                alone = len(self._free_seqs) >= self._slots.size - 1
                step = self.prefill_chunk if alone else min(self.prefill_chunk, SHARED_PREFILL_CHUNK)
                chunk = tokens[start : start + max(1, min(step, llama.n_batch))]
                with self._engine_lock:
                    began = clock()
                    batch = llama.batch
                    batch.clear()
                    for i, t in enumerate(chunk):
                        batch.add(t, start + i, seq, start + i == len(tokens) - 1)
                    try:
                        self._decode_armed(llama, me, ctx)
                        start += len(chunk)
                        rec.prompt_tokens = start  # how far prefill got, if it is cut short
                        if start >= len(tokens):
                            return int(sampler.sample(llama, batch.n - 1))
                    finally:
                        rec.prefill_duration += clock() - began
        raise ValueError("prompt: no tokens to decode")

    def _raise_if_ended(self, ctx: Context, when: str) -> None:
        """``Cancelled``/``DeadlineExceeded`` if ``ctx`` ended, ``ModelClosed`` ("model closed <when>")."""
        ctx.raise_if_done()
        if self._closed.is_set():
            raise ModelClosed(f"model closed {when}")

    def _decode_armed(self, llama: Any, me: object | None, ctx: Context) -> None:
        """``llama.decode()`` that the watcher of call ``me`` may abort (under the engine lock)."""
        if me is None:
            llama.decode()
            return
        with self._abort_lock:
            self._armed = me
        try:
            llama.decode()
        except self._engine.Aborted:
            self._raise_if_ended(ctx, "during prefill")
            raise  # not reached: only the watcher aborts, and only once the call has ended
        finally:
            with self._abort_lock:
                self._armed = None
                llama.clear_abort()

    @contextmanager
    def _watch(self, llama: Any, ctx: Context, wanted: bool) -> Iterator[object | None]:
        """A thread that aborts this call's running decode once ``ctx`` ends or the model closes.

        Yields the call's token for ``_decode_armed`` (None when not watched: short prompts,
        or an engine without an abort callback). The abort flag belongs to the context, which
        all slots share, so the watcher sets it only while this call's decode is the armed one.
        """
        if not (wanted and llama.abortable):
            yield None
            return
        me, done = object(), threading.Event()

        def watch() -> None:
            while not done.wait(WATCH_INTERVAL):
                if ctx.done() or self._closed.is_set():
                    with self._abort_lock:
                        if self._armed is me:
                            llama.abort()

        watcher = threading.Thread(target=watch, name="core-inference prefill watch", daemon=True)
        watcher.start()
        try:
            yield me
        finally:
            done.set()
            watcher.join()

    # -- classify and batch generation -------------------------------------------------

    @property
    def decode_calls(self) -> int:
        """Batches run through llama.cpp so far (each ``llama_decode`` call counts once)."""
        return sum(c.decode_calls for c in (self._ctx, self._batch_ctx) if c is not None)

    def _batch_context(self, n_seq: int, per_seq: int) -> Any:
        """A context for packed batches, grown (recreated) when a call needs more room."""
        have = self._batch_ctx
        if have is not None and have.n_seq >= n_seq and have.per_seq >= per_seq:
            return have
        if have is not None:
            have.free()
        per_seq = max(per_seq, have.per_seq if have else 0)
        n_seq = max(n_seq, have.n_seq if have else 0)
        n_batch = min(max(512, n_seq), 4096)
        self._batch_ctx = self._model.new_context(n_seq * per_seq, n_seq, n_batch, self.threads)
        return self._batch_ctx

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
        keys = list(encoded)
        rec.prefill_duration = 0.0
        with self._batch_turn(ctx):
            for start in range(0, len(keys), CLASSIFY_SEQS):
                group = keys[start : start + CLASSIFY_SEQS]
                began = time.perf_counter()
                out = self._classify_group([encoded[k] for k in group], cfg, ctx)
                rec.prefill_duration += time.perf_counter() - began
                done.update(zip(group, out, strict=True))
                rec.first_token = rec.first_token or time.perf_counter()
        rec.prefill_end = time.perf_counter()
        rec.active_memory_bytes, rec.peak_memory_bytes = process_memory()
        return classify_results(len(prompts), encoded, errors, done, rec)

    @contextmanager
    def _batch_turn(self, ctx: Context) -> Iterator[None]:
        """Hold the batch context: classify and batch_generate calls take turns on it.

        They pack their prompts as sequences 0..n-1 of one shared context (which a
        call may also grow, freeing the old one), so two at once would mix their
        sequences. The wait ends early if the call's context ends or the model closes.
        """
        while not self._batch_lock.acquire(timeout=0.02):
            self._raise_if_ended(ctx, "while waiting for the batch context")
        try:
            yield
        finally:
            self._batch_lock.release()

    def _classify_group(
        self, group: list[list[int]], cfg: GenerateConfig, ctx: Context
    ) -> list[tuple[Token, Any]]:
        ctx.raise_if_done()
        per_seq = _round_up(max(map(len, group)) + 1, 64)
        with self._engine_lock:
            llama = self._batch_context(CLASSIFY_SEQS, per_seq)
            outputs = self._pack_prefill(llama, group, ctx)
            out = []
            for index in outputs:
                sampler = self._engine.Sampler(cfg, self._model.n_vocab)
                try:
                    tid = sampler.sample(llama, index)
                finally:
                    sampler.free()
                logits = llama.logits(index, self._model.n_vocab) if cfg.return_logits else None
                text = self._model.piece(tid).decode("utf-8", "replace")
                out.append((Token(tid, text), logits))
            for seq in range(len(group)):
                llama.clear_seq(seq)
        return out

    def _pack_prefill(self, llama: Any, prompts: list[list[int]], ctx: Context) -> list[int]:
        """Prefill prompts as sequences 0..n-1, packed into as few batches as fit.

        Returns, per prompt, the batch index of its last position's logits. Only the
        last batch's outputs are readable, so every prompt's last token goes there.
        """
        batch = llama.batch
        lasts = [(seq, len(p) - 1, p[-1]) for seq, p in enumerate(prompts)]
        bodies = [(seq, pos, t) for seq, p in enumerate(prompts) for pos, t in enumerate(p[:-1])]
        for start in range(0, len(bodies), llama.n_batch):
            ctx.raise_if_done()
            batch.clear()
            for seq, pos, t in bodies[start : start + llama.n_batch]:
                batch.add(t, pos, seq, False)
            llama.decode()
        batch.clear()
        outputs = [batch.add(t, pos, seq, True) for seq, pos, t in lasts]
        llama.decode()
        return outputs

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
            with self._batch_turn(ctx):
                for start in range(0, len(keys), BATCH_SEQS):
                    group = keys[start : start + BATCH_SEQS]
                    self._decode_together(group, encoded, book.finishers, book.tokens, cfg, ctx, rec)
        rec.active_memory_bytes, rec.peak_memory_bytes = process_memory()
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
        """Decode up to ``BATCH_SEQS`` prompts together, one batch per step.

        Each prompt's tokens go through its own ``TokenFinisher`` as they are sampled, so
        a prompt stops at its stop string (matched on whole UTF-8 text, across tokens)
        or stop id the step it appears, exactly as ``generate`` would stop.
        """
        prompts = [encoded[k] for k in keys]
        clock = time.perf_counter
        # room for the longest prompt and max_tokens, but never more than the context
        per_seq = _round_up(min(max(map(len, prompts)) + cfg.max_tokens + 1, self.context_len), 64)
        samplers = [self._engine.Sampler(cfg, self._model.n_vocab) for _ in keys]
        try:
            for s, p in zip(samplers, prompts, strict=True):
                s.accept_all(p)
            with self._engine_lock:
                began = clock()
                llama = self._batch_context(len(keys), per_seq)
                outputs = self._pack_prefill(llama, prompts, ctx)
                rec.prefill_duration = (rec.prefill_duration or 0.0) + clock() - began
            rec.prefill_done(rec.prompt_tokens + sum(map(len, prompts)))
            live = {seq: (outputs[seq], len(prompts[seq])) for seq in range(len(keys))}
            seq_end = min(llama.per_seq, self.context_len)  # as generate: no position past the context
            while live:
                self._raise_if_ended(ctx, "during batch_generate")
                with self._engine_lock:
                    began = clock()
                    picks = {seq: samplers[seq].sample(llama, idx) for seq, (idx, _) in live.items()}
                    llama.batch.clear()
                    nxt = {}
                    for seq, tid in picks.items():
                        key, pos = keys[seq], live[seq][1]
                        fin = finishers[key]
                        if self._model.is_eog(tid):
                            tokens[key] += fin.end()
                            continue
                        tokens[key] += fin.push(tid, self._model.piece(tid))
                        if fin.finish_reason is not None:
                            continue
                        if pos + 1 >= seq_end:
                            tokens[key] += fin.end("context_full")
                            continue
                        nxt[seq] = (llama.batch.add(tid, pos, seq, True), pos + 1)
                    if nxt:
                        llama.decode()
                    for seq in set(live) - set(nxt):
                        llama.clear_seq(seq)
                    live = nxt
                    rec.decode_duration = (rec.decode_duration or 0.0) + clock() - began
        finally:
            for s in samplers:
                s.free()
            with self._engine_lock:
                if self._batch_ctx is not None:
                    for seq in range(len(keys)):
                        self._batch_ctx.clear_seq(seq)

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
