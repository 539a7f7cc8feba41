"""The ``llama_cpp`` backend: GGUF models through llama-cpp-python's low-level bindings.

Sampling runs in llama.cpp's C sampler chain (no Python pass over the vocabulary),
prompts are prefilled in chunks with the context checked between them, ``classify``
packs prompts as separate sequences of one batch, and ``batch_generate`` decodes every
prompt together, one batch per step.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

from ...context import Context
from ...errors import ContextLengthExceeded, EngineError, InferenceError, ModelClosed
from ...formats.gguf import GGML_TYPES, GGUFHeader
from ...memory import cpu_count, process_memory
from ...model import BaseModel
from ...streaming import BatchBook, MetricsRecorder, Piece, classify_results
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
from .steps import FairLock, Job, Steps

DEFAULT_CONTEXT = 8192  # used when the model's own is larger and none is asked for
PREFILL_CHUNK = 512  # prompt tokens per prefill decode (one n_batch), cut at the same positions always
# batch_invariant: a prompt's rows are never decoded one alone. With flash attention off, one row
# took another attention kernel; on the one-row flash kernel it no longer matters (a token
# decoded alone equals its prefill), but the packing measured bit for bit was built on it
MIN_PIECE = 2
ROW_GROUP = 4  # a resumed prefill starts on a multiple of this many rows ...
SAME_KERNEL_ROWS = 64  # ... and decodes at least this many (see _reuse_start)
MIN_SHARED_PREFIX = 32  # shorter shared prefixes are prefilled again rather than copied between sequences
WATCH_PREFILL_OVER = 128  # longer prompts are watched: cancel or close stops a decode inside llama.cpp
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
        self._engine_lock = FairLock()  # one llama.cpp call at a time on this model, in turn
        self._batch_lock = threading.Lock()  # one classify/batch_generate at a time on _batch_ctx
        self._abort_lock = threading.Lock()  # guards _armed: which call may abort the running decode
        self._armed: frozenset[object] = frozenset()  # the calls whose watchers may abort the running decode
        self._armed_ctx: Any = None  # the context whose decode the armed call runs
        self._model: Any = None
        self._ctx: Any = None
        self._batch_ctx: Any = None
        self._free_seqs = list(range(slots))  # least recently used first
        self._seq_lock = threading.Lock()  # guards _free_seqs, _kept and _live
        self._kept: dict[int, list[int]] = {}  # per free sequence: the tokens its cache holds
        # per sequence a running stream holds, once its prompt is prefilled: that prompt. Its
        # cells never change while the stream decodes on (it only appends), so a call that
        # starts meanwhile with the same system prompt copies them instead of prefilling
        self._live: dict[int, list[int]] = {}
        self._prefix_cache = _flag(cfg.engine_options.get("prefix_cache", True), "prefix_cache")
        # False: each stream's token gets a decode of its own, and classify/batch_generate run
        # each prompt as generate would alone (answers independent of the neighbours, at the
        # cost of the throughput that sharing a decode brings)
        self._shared_decode = _flag(cfg.engine_options.get("shared_decode", True), "shared_decode")
        # True: kernels whose result for a row does not depend on the rows beside it, so every
        # answer is the prompt's alone with all the sharing above on (docs/reliability.md)
        self._invariant = _flag(cfg.engine_options.get("batch_invariant", False), "batch_invariant")
        self._steps = Steps(self._engine_lock, self._run_step, chunk)
        try:
            if self._invariant:
                if cfg.gpu_layers != 0 and engine.gpu_offload():
                    raise ValueError(
                        "engine_options: batch_invariant holds on llama.cpp's CPU kernels, and this "
                        "llama.cpp offloads layers to a GPU, whose kernels are picked by batch size too: "
                        "load with gpu_layers=0 for it, or without batch_invariant"
                    )
                engine.batch_invariant_kernels()
            self._model = engine.Model(path, cfg.gpu_layers, repack=not self._invariant)
            train = self._model.n_ctx_train or DEFAULT_CONTEXT
            self.context_len = cfg.context_len or min(train, DEFAULT_CONTEXT)
            # a step's decode carries the streams' tokens beside up to 512 rows of prefill chunks
            self._ctx = self._model.new_context(self.context_len * slots, slots, 512, self.threads,
                                                self._invariant, extra_rows=slots)
            # tokens per prefill decode; batch-invariant pieces are never one row (see _piece_end)
            self._prefill_step = max(MIN_PIECE + 2 if self._invariant else 1, min(chunk, self._ctx.n_batch))
            self._template = self._find_template()
            bos = self._model.bos
            self._bos_text = self._model.special_text(bos) if bos >= 0 and self._model.adds_bos else ""
        except BaseException:
            # A model that never was: free what was made now (not when the garbage
            # collector finds it), and no "was not closed" warning for it.
            self._closed.set()
            self._free()
            raise

    def _new_context(self, n_ctx: int, n_seq: int, n_batch: int) -> Any:
        return self._model.new_context(n_ctx, n_seq, n_batch, self.threads, self._invariant)

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
        return self._stream(self._prompt_tokens(text), stop, cfg, ctx, rec)

    def _stream(
        self, tokens: list[int], stop: frozenset[int], cfg: GenerateConfig, ctx: Context, rec: MetricsRecorder
    ) -> Generator[Piece, None, None]:
        """A prompt's tokens streamed through the step loop in one of the slots' sequences."""
        llama, model, steps = self._ctx, self._model, self._steps
        took = [-1, 0, 0]  # the sequence taken, how many prompt tokens it holds, whether to empty it
        fed: list[int] = []  # what the sequence's cache holds, kept for the next call if all goes well
        sampler = None
        clean = False  # the cache holds exactly ``fed``: the call ended between steps
        # the stream leaves the step loop only once its sequence is free again, so that the
        # next step, no longer waiting for it, may fill its gap (_fillers)
        member = ExitStack()
        try:
            self._take_seq(tokens, took)
            seq, start, reset = took
            fed = tokens[:start]
            sampler = self._engine.Sampler(cfg, self._model.n_vocab)
            sampler.accept_all(tokens)
            member.enter_context(steps.member(seq))
            tid = self._prefill(tokens, start, seq, ctx, sampler, rec, bool(reset))
            fed = list(tokens)
            if self._prefix_cache:
                with self._seq_lock:
                    self._live[seq] = tokens  # the prompt: not ``fed``, which grows as it decodes
            rec.prefill_done(len(tokens))
            rec.cached_prompt_tokens = start
            pos = len(tokens)
            room = min(llama.per_seq, self.context_len) - pos
            limit = min(cfg.max_tokens, room)
            decode = 0.0  # this call's own steps: the decodes that carried its tokens
            rec.decode_duration = 0.0
            for n in range(1, limit + 1):
                if model.is_eog(tid) or tid in stop:
                    break
                try:
                    yield tid, model.piece(tid)
                except GeneratorExit:  # the consumer stopped between tokens: the cache is whole
                    clean = True
                    raise
                if n == limit:
                    if limit == room:
                        rec.finish_reason = "context_full"
                    break
                self._raise_if_ended(ctx, "during generation")
                job = steps.run(Job(seq, [tid], pos, True, sampler, ctx))
                if job.error is not None:
                    raise job.error
                fed.append(tid)
                tid = job.token
                decode += job.seconds
                rec.decode_duration = decode
                pos += 1
            clean = True
        finally:
            try:
                if sampler is not None:
                    sampler.free()
                # A stream that ended in an error or a cancel inside a decode may have left cells
                # the bookkeeping does not know of: such a sequence is not kept.
                if took[0] >= 0:
                    # the answer's cells too: with batch-invariant kernels a row decoded alone
                    # gets what a prefill of it gets, so the next turn's answer is unchanged
                    self._give_seq(took[0], fed, clean)
            finally:  # a Ctrl-C landing above must not leave the stream a member for good
                member.close()
            rec.active_memory_bytes, rec.peak_memory_bytes = process_memory()

    # -- slots and the prefix cache ----------------------------------------------------

    def _take_seq(self, tokens: list[int], took: list[int]) -> None:
        """A free sequence for ``tokens`` and how many of its first tokens are already cached,
        written into ``took`` (the sequence the moment it leaves the free list: a Ctrl-C
        landing after that must not lose it).

        With the prefix cache on, the sequence whose cache shares the longest prefix with
        the prompt is found: among the free ones (what they kept) and the ones running
        streams hold (their prompts, once prefilled). If it is free and all it keeps is a
        prefix of the prompt, it is taken; otherwise (a shared system prompt, an earlier
        turn of another chat, a stream still running) its cache is copied into an empty
        sequence, else the least recently used one, so the other conversation stays kept.
        Only the rest of the prompt is prefilled, from where ``_reuse_start`` says.

        With nothing to reuse, the engine is not waited for here: the step that decodes the
        first chunk empties the sequence (``took[2]``). A call waiting here for a running
        step, then posting its prompt for the step after, spread 16 streams' prefills over
        as many steps, each with every started stream's decode in it.
        """
        with self._seq_lock:  # no other call takes a sequence (the source of a copy) meanwhile
            free, kept = self._free_seqs, self._kept
            best, common = -1, 0
            if self._prefix_cache:
                for seq in free:  # free is ordered least recently used first
                    n = _common_prefix(kept.get(seq, ()), tokens)
                    if n > common:
                        best, common = seq, n
                for seq, held in self._live.items():  # a prefix that only a running stream holds
                    n = _common_prefix(held, tokens)
                    if n > common and seq not in free:
                        best, common = seq, n
            start = self._reuse_start(common, len(tokens)) if best >= 0 else 0
            if best in kept and common == len(kept[best]):
                target = best  # extending it loses nothing
            else:
                empty = [s for s in free if s not in kept]
                target = empty[0] if empty else free[0]
            took[0] = target
            free.remove(target)
            kept.pop(target, None)
            self._live.pop(target, None)
            if start == 0:
                took[2] = 1
                return
            with self._engine_lock:
                llama = self._ctx
                if not llama.can_keep(best, start):
                    start = 0  # the sliding-window layers no longer hold what the prefix needs
                if start and target != best:
                    if start >= MIN_SHARED_PREFIX:
                        llama.copy_seq(best, target)  # applied at the next decode, before it writes
                    else:
                        start = 0  # too short to be worth a copy
                took[1] = start
                llama.truncate_seq(target, start)

    def _reuse_start(self, common: int, n: int) -> int:
        """Where to resume prefill of an ``n``-token prompt whose first ``common`` tokens are
        cached: anywhere that leaves two rows or more to decode, with batch-invariant kernels."""
        if self._invariant:
            return max(0, min(common, n - MIN_PIECE))
        return _reuse_start(common, n, self._prefill_step)

    def _give_seq(self, seq: int, kept: list[int], clean: bool) -> None:
        """Return ``seq`` to the free list, keeping its cache for the next call when ``clean``.

        A sequence not kept is not emptied here (that would wait for a running step): the
        next call that takes it empties it, or copies a prefix over it (``_take_seq``), so
        what a cancelled or failed call left in it is never read.
        """
        keep = clean and self._prefix_cache and bool(kept)
        with self._seq_lock:
            self._live.pop(seq, None)
            if keep:
                self._kept[seq] = kept
                self._free_seqs.append(seq)  # the most recently used goes last
            else:
                self._kept.pop(seq, None)
                self._free_seqs.insert(0, seq)  # nothing kept: the first to be reused

    def _prefill(
        self, tokens: list[int], start: int, seq: int, ctx: Context, sampler: Any, rec: MetricsRecorder,
        reset: bool = False, logits: list[Any] | None = None,
    ) -> int:
        """Prefill ``tokens[start:]`` as step jobs, one chunk each; return the first new token
        (and append its logits row to ``logits``, when given).

        Chunks are cut at multiples of ``prefill_chunk`` from the prompt's first position,
        whatever else runs, so a prompt's logits do not depend on the load. A long prompt
        is watched meanwhile: its context ending, or ``close()``, stops llama.cpp inside the
        running decode, not after it.
        """
        rec.prefill_duration = 0.0  # this call's own decodes, not the waits for its turn
        with self._watch(ctx, len(tokens) - start > WATCH_PREFILL_OVER) as me:
            pos = start
            while pos < len(tokens):
                self._raise_if_ended(ctx, "during prefill")
                end = self._piece_end(pos, len(tokens))
                last = end == len(tokens)
                job = self._steps.run(Job(seq, tokens[pos:end], pos, last, sampler, ctx, me, reset=reset,
                                          want_logits=last and logits is not None))
                reset = False
                rec.prefill_duration += job.seconds
                if job.error is not None:
                    raise job.error
                pos = end
                rec.prompt_tokens = pos  # how far prefill got, if it is cut short
                if last:
                    if logits is not None:
                        logits.append(job.logits)
                    return job.token
        raise ValueError("prompt: no tokens to decode")

    def _piece_end(self, pos: int, n: int) -> int:
        """Where the prefill decode that starts at ``pos`` of an ``n``-token prompt ends.

        By default at the next multiple of the prefill step from the prompt's start, whatever
        the load, so that a prompt is cut the same way alone and beside others. With
        batch-invariant kernels any cut gives the same logits, as long as no decode holds a
        single row of the prompt: the step is taken from ``pos``, less one where that would
        leave one row for the last decode.
        """
        step: int = self._prefill_step
        if not self._invariant:
            return min(n, (pos // step + 1) * step)
        return _piece_end(pos, n, step)

    def _run_step(self, decodes: list[Job], chunks: list[Job]) -> None:
        """One step (under the engine lock): one ``llama_decode`` carrying every stream's next
        token and the starting streams' prefill chunks; chunks that cannot ride in it get
        decodes of their own after it. (The step's work jobs, ``classify`` and
        ``batch_generate`` decodes of the batch context, run after this: ``Steps._turns``.)

        With ``batch_invariant`` a chunk rides only where llama.cpp's micro-batches give each
        of its pieces two rows or more (``_packable``), so its logits are its prompt's alone.
        With ``shared_decode=False`` nothing is shared: each stream's token and each chunk
        get a decode of their own.

        A job's own failure (its call ended during its chunk, a decode error) is its
        alone; the other jobs of the step go on. So is a Ctrl-C in the leader's thread:
        a decode of the leader's own streams stops at once, one that carries other
        threads' streams runs to its end, and the interrupt is raised after the step.
        """
        llama = self._ctx
        if self._closed.is_set() or llama is None:
            raise ModelClosed("model closed during generation")
        me = threading.get_ident()
        interrupts: list[BaseException] = []
        # in sequence order: llama.cpp splits a batch whose sequences come out of order into
        # more micro-batches (measured: 4 streams' step took 56 ms shuffled, 31 ms in order)
        decodes = sorted(decodes, key=lambda j: j.seq)
        if self._shared_decode:
            ready = [j for j in chunks if self._start_chunk(llama, j)]
            fillers = self._fillers(llama, decodes, ready)
            packed = self._packable(llama, decodes, fillers, ready)
            try:
                done = bool(decodes or packed) and self._decode_step(llama, decodes, fillers, packed, me,
                                                                     interrupts)
            finally:
                for seq, pos in fillers:  # the filler rows' cells go again
                    llama.truncate_seq(seq, pos)
            if done:
                decodes = []
                chunks = [j for j in ready if j not in packed]
            else:  # the shared decode failed: every job is decoded again on its own below
                chunks = ready
        for group in [decodes] if decodes and self._shared_decode else [[j] for j in decodes]:
            self._decode_rows(llama, group, [], me, interrupts)
        for j in chunks:
            if j.error is None and self._start_chunk(llama, j):
                self._decode_rows(llama, [], [j], me, interrupts)
        if interrupts:
            raise interrupts[0]

    def _start_chunk(self, llama: Any, job: Job) -> bool:
        """Ready ``job``'s chunk for a decode: False (and its error set) if its call ended; the
        sequence's first chunk empties whatever the sequence held before."""
        try:
            self._raise_if_ended(job.ctx, "during prefill")
        except Exception as exc:
            job.error = exc
            return False
        if job.reset:
            llama.truncate_seq(job.seq, job.pos)
            job.reset = False
        return True

    def _fillers(self, llama: Any, decodes: list[Job], chunks: list[Job]) -> list[tuple[int, int]]:
        """(sequence, position) of a filler row for each free sequence between the streams'.

        llama.cpp's cache per sequence cuts a decode wherever sequence ids skip one (a stream
        that ended, or waits): 15 streams around a gap took two micro-batches and 100 ms where
        16 took one and 50 ms, as the halves fall below the 8 rows of the faster kernel. A row
        for the free sequence in the gap (no output; its cell is dropped after the decode)
        keeps them one micro-batch. Only free sequences get one (a taken one may have a copy
        pending, which llama.cpp applies after it places the batch's rows), and only where
        its cache is no longer than the longest stream's, so attention spans no more cells,
        nor than a sliding window, whose cells a new row may take.
        """
        if len(decodes) < 2:
            return []
        free = set(self._free_seqs)  # a snapshot (the list is changed under _seq_lock, not taken here:
        # _take_seq waits for the engine lock, held now, before it touches a sequence's cache)
        busy = {j.seq for j in decodes} | {j.seq for j in chunks}
        longest = max(j.pos for j in decodes) + 1
        out = []
        for seq in range(decodes[0].seq + 1, decodes[-1].seq):
            if seq in busy or seq not in free:
                continue
            pos = llama.seq_length(seq)
            if pos > longest or pos >= llama.per_seq:
                continue
            if llama.n_swa and not self._invariant and pos >= llama.n_swa:
                continue  # its row could take a sliding-window cell its kept cache still needs
            out.append((seq, pos))
        return out

    def _packable(
        self, llama: Any, decodes: list[Job], fillers: list[tuple[int, int]], chunks: list[Job]
    ) -> list[Job]:
        """The chunks that ride in the step's decode beside ``decodes`` (FIFO, as the batch holds).

        With ``batch_invariant``, llama.cpp's cut of the decode into micro-batches is worked
        out first (``_micro_batches``): a chunk whose sequence would get a piece of one row
        (beside the streams' single rows, or one row longer than a neighbour's chunk) is
        left out, to be decoded alone.
        """
        single = [(j.seq, 1) for j in decodes] + [(seq, 1) for seq, _ in fillers]
        rows, packed = len(single), list[Job]()
        for j in chunks:
            if rows + len(j.tokens) > llama.batch.capacity:
                continue
            trial = [*packed, j]
            if self._invariant and not _whole_pieces(
                single + [(c.seq, len(c.tokens)) for c in trial], {c.seq for c in trial}, llama.n_batch
            ):
                continue
            packed, rows = trial, rows + len(j.tokens)
        return packed

    def _decode_step(
        self, llama: Any, decodes: list[Job], fillers: list[tuple[int, int]], packed: list[Job], me: int,
        interrupts: list[BaseException],
    ) -> bool:
        """The step's one decode; False if it failed as a whole (a watched call ended inside
        it, or llama.cpp refused it): then nothing of it is kept, and the caller decodes each
        job again on its own, so that a failure lands on the job it belongs to."""
        try:
            self._decode_rows(llama, decodes, packed, me, interrupts, whole=True, fillers=fillers)
        except Exception:
            for j in decodes + packed:
                j.error = None
                llama.truncate_seq(j.seq, j.pos)  # cells of the micro-batches that did run
            self._steps.stats.redone += 1
            return False
        if len(decodes) + len(packed) > 1:
            self._steps.stats.packed += len(packed)
        self._steps.stats.filled += len(fillers)
        return True

    def _decode_rows(
        self, llama: Any, decodes: list[Job], chunks: list[Job], me: int, interrupts: list[BaseException],
        whole: bool = False, fillers: Sequence[tuple[int, int]] = (),
    ) -> None:
        """One ``llama_decode`` of ``decodes`` (a token each), ``chunks`` and ``fillers`` (a row
        each, no output), in sequence order, and each job's token (and logits) from its last
        row. A failure is every job's, or raised when ``whole`` (for ``_decode_step`` to decode
        them apart)."""
        clock, batch = time.perf_counter, llama.batch
        began = clock()
        jobs = sorted(decodes + chunks, key=lambda j: j.seq)
        rows = sorted([(j.seq, j) for j in jobs] + [(seq, pos) for seq, pos in fillers], key=lambda r: r[0])
        batch.clear()
        last = {}
        filler = max(self._model.bos, 0)
        for seq, j in rows:
            if isinstance(j, int):
                batch.add(filler, j, seq, False)
                continue
            for i, t in enumerate(j.tokens):
                last[id(j)] = batch.add(t, j.pos + i, j.seq, j.sample and i == len(j.tokens) - 1)
        held = interrupts if any(j.thread != me for j in jobs) else None
        watched = [j.watched for j in chunks if j.watched is not None]
        try:
            self._decode_watched(llama, watched, held)
        except Exception as exc:
            if whole:
                raise
            for j in jobs:  # a watched call ended: its own error; the others', llama.cpp's
                try:
                    self._raise_if_ended(j.ctx, "during prefill")
                    j.error = exc
                except Exception as ended:
                    j.error = ended
        except BaseException as exc:
            _interrupted(jobs, exc, me, interrupts)
        else:
            for j in jobs:
                try:
                    if j.sample:
                        j.token = j.sampler.sample(llama, last[id(j)])
                    if j.want_logits:
                        j.logits = llama.logits(last[id(j)], self._model.n_vocab)
                except Exception as exc:
                    j.error = exc
                except BaseException as exc:
                    _interrupted([j], exc, me, interrupts)
        took, n_rows = clock() - began, batch.n
        for j in decodes:  # a stream's decode time is its steps' (as with one alone)
            j.seconds = took
        for j in chunks:  # a prefill is charged its share of the rows, not its neighbours' prompts
            j.seconds = took * len(j.tokens) / n_rows

    def _raise_if_ended(self, ctx: Context, when: str) -> None:
        """``Cancelled``/``DeadlineExceeded`` if ``ctx`` ended, ``ModelClosed`` ("model closed <when>")."""
        ctx.raise_if_done()
        if self._closed.is_set():
            raise ModelClosed(f"model closed {when}")

    def _decode_armed(self, llama: Any, me: object | None, ctx: Context) -> None:
        """``llama.decode()`` that the watcher of call ``me`` may abort (under the engine lock)."""
        try:
            self._decode_watched(llama, [] if me is None else [me], None)
        except self._engine.Aborted:
            self._raise_if_ended(ctx, "during prefill")
            raise  # not reached: only the watcher aborts, and only once the call has ended

    def _decode_watched(self, llama: Any, watched: list[object], held: list[BaseException] | None) -> None:
        """``llama.decode()`` that the watcher of any call in ``watched`` may abort."""
        if not watched:
            llama.decode(held)
            return
        with self._abort_lock:
            self._armed, self._armed_ctx = frozenset(watched), llama
        try:
            llama.decode(held)
        finally:
            with self._abort_lock:
                self._armed, self._armed_ctx = frozenset(), None
                llama.clear_abort()

    @contextmanager
    def _watch(self, ctx: Context, wanted: bool) -> Iterator[object | None]:
        """A thread that aborts this call's running decode once ``ctx`` ends or the model closes.

        Yields the call's token for ``_decode_armed`` (None when not watched: short prompts,
        or an engine without an abort callback). The abort flag belongs to the context, which
        all slots share, so the watcher sets it only while this call's decode is the armed one.
        """
        if not (wanted and self._ctx is not None and self._ctx.abortable):
            yield None
            return
        me, done = object(), threading.Event()

        def watch() -> None:
            while not done.wait(WATCH_INTERVAL):
                if ctx.done() or self._closed.is_set():
                    with self._abort_lock:
                        if me in self._armed and self._armed_ctx is not None:
                            self._armed_ctx.abort()

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

    def _batch_context(self, n_seq: int, per_seq: int, used: int) -> Any:
        """A context for packed batches, grown (recreated) when a call needs more room, with
        its first ``used`` sequences empty.

        A call empties its sequences when it ends, but a Ctrl-C landing in that cleanup
        (while it waits for the engine lock) skips it: found when the next classify's decode
        failed on a sequence still holding the interrupted call's cells. So they are
        emptied here too, before use.
        """
        have = self._batch_ctx
        if have is not None and have.n_seq >= n_seq and have.per_seq >= per_seq:
            for seq in range(used):
                have.clear_seq(seq)
            return have
        if have is not None:
            have.free()
        per_seq = max(per_seq, have.per_seq if have else 0)
        n_seq = max(n_seq, have.n_seq if have else 0)
        n_batch = min(max(512, n_seq), 4096)
        self._batch_ctx = self._new_context(n_seq * per_seq, n_seq, n_batch)
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
        keys = self._pack_order(encoded)
        rec.prefill_duration = 0.0
        if not self._shared_decode:  # each prompt through the streams' steps: no batch context
            for k in keys:
                done[k] = self._classify_alone(encoded[k], cfg, ctx, rec)
                rec.first_token = rec.first_token or time.perf_counter()
        else:
            with self._batch_turn(ctx), self._watch(ctx, _total(encoded) > WATCH_PREFILL_OVER) as me:
                for start in range(0, len(keys), CLASSIFY_SEQS):
                    group = keys[start : start + CLASSIFY_SEQS]
                    began = time.perf_counter()
                    out = self._classify_group([encoded[k] for k in group], cfg, ctx, me, rec)
                    rec.prefill_duration += time.perf_counter() - began
                    done.update(zip(group, out, strict=True))
                    rec.first_token = rec.first_token or time.perf_counter()
        rec.prefill_end = time.perf_counter()
        rec.active_memory_bytes, rec.peak_memory_bytes = process_memory()
        return classify_results(len(prompts), encoded, errors, done, rec)

    def _pack_order(self, encoded: dict[int, list[int]]) -> list[int]:
        """The prompts' keys in the order they become sequences: by length with batch-invariant
        kernels, so prompts of one length are neighbours (``_pack_invariant``)."""
        keys = list(encoded)
        return sorted(keys, key=lambda k: len(encoded[k])) if self._invariant else keys

    def _classify_alone(
        self, tokens: list[int], cfg: GenerateConfig, ctx: Context, rec: MetricsRecorder
    ) -> tuple[Token, Any]:
        """One prompt's classify as ``generate`` prefills it (``shared_decode=False``): the
        same sequence, chunks and sampler, so its token is ``generate``'s first, whatever
        else the call or the model carries."""
        took = [-1, 0, 0]
        sampler = None
        clean = False
        logits: list[Any] = []
        mine = MetricsRecorder()
        try:
            self._take_seq(tokens, took)
            seq, start, reset = took
            sampler = self._engine.Sampler(cfg, self._model.n_vocab)
            sampler.accept_all(tokens)
            with self._steps.member(seq):
                want = logits if cfg.return_logits else None
                tid = self._prefill(tokens, start, seq, ctx, sampler, mine, bool(reset), want)
            rec.cached_prompt_tokens += start
            clean = True
        finally:
            if sampler is not None:
                sampler.free()
            if took[0] >= 0:
                self._give_seq(took[0], tokens, clean)
            rec.prefill_duration = (rec.prefill_duration or 0.0) + (mine.prefill_duration or 0.0)
        text = self._model.piece(tid).decode("utf-8", "replace")
        return Token(tid, text), (logits[0] if logits else None)

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
        self,
        group: list[list[int]],
        cfg: GenerateConfig,
        ctx: Context,
        me: object | None,
        rec: MetricsRecorder,
    ) -> list[tuple[Token, Any]]:
        ctx.raise_if_done()
        per_seq = _round_up(max(map(len, group)) + 1, 64)
        with self._engine_lock:
            llama = self._batch_context(CLASSIFY_SEQS, per_seq, len(group))
        out: dict[int, tuple[Token, Any]] = {}

        def take(seq: int, index: int) -> None:  # under the engine lock, right after the decode
            sampler = self._engine.Sampler(cfg, self._model.n_vocab)
            try:
                sampler.accept_all(group[seq])  # as generate's: penalties see the prompt
                tid = sampler.sample(llama, index)
            finally:
                sampler.free()
            logits = llama.logits(index, self._model.n_vocab) if cfg.return_logits else None
            out[seq] = (Token(tid, self._model.piece(tid).decode("utf-8", "replace")), logits)

        try:
            self._pack_prefill(llama, group, ctx, me, rec, take)
            return [out[seq] for seq in range(len(group))]
        finally:
            # also when a deadline or cancel ended it part-way: the next call's sequences
            # start empty (found: a cut-short classify left sequence 0 holding 30 positions,
            # and the next call's decode failed)
            with self._engine_lock:
                if self._batch_ctx is llama:
                    for seq in range(len(group)):
                        llama.clear_seq(seq)

    def _pack_prefill(
        self,
        llama: Any,
        prompts: list[list[int]],
        ctx: Context,
        me: object | None,
        rec: MetricsRecorder,
        take: Callable[[int, int], None],
    ) -> None:
        """Prefill prompts as sequences 0..n-1, packed into as few batches as fit.

        ``take(seq, index)`` is called, under the engine lock and right after the decode
        that holds a prompt's last position, with that position's batch index (only the
        last decode's outputs are readable). A prefix that every prompt shares (an
        instruction, few-shot examples) is decoded once, in sequence 0, and copied to the
        others with llama.cpp's own sequence copy. Each decode is a work job of the streams'
        step loop (``Steps.work``), so streams get their tokens in between, and each is armed:
        the call's deadline or cancel stops it inside llama.cpp.
        """
        shared = self._shared_prefix(prompts)
        if shared:
            head = prompts[0][:shared]
            if self._invariant:
                self._decode_pieces(llama, 0, head, 0, ctx, me)
            else:
                self._decode_bodies(llama, [(0, pos, t) for pos, t in enumerate(head)], ctx, me)
            with self._engine_lock:  # copied at the start of the next decode, before it writes
                for seq in range(1, len(prompts)):
                    llama.copy_seq(0, seq)
            rec.cached_prompt_tokens += shared * (len(prompts) - 1)
        if self._invariant:
            self._pack_invariant(llama, prompts, shared, ctx, me, take)
            return
        bodies = [
            (seq, pos, t) for seq, p in enumerate(prompts) for pos, t in enumerate(p[:-1]) if pos >= shared
        ]
        self._decode_bodies(llama, bodies, ctx, me)
        self._raise_if_ended(ctx, "during prefill")
        batch = llama.batch

        def last() -> None:
            batch.clear()
            outputs = [batch.add(p[-1], len(p) - 1, seq, True) for seq, p in enumerate(prompts)]
            self._decode_armed(llama, me, ctx)
            for seq, index in enumerate(outputs):
                take(seq, index)

        self._steps.work(len(prompts), ctx, last)

    def _pack_invariant(
        self,
        llama: Any,
        prompts: list[list[int]],
        start: int,
        ctx: Context,
        me: object | None,
        take: Callable[[int, int], None],
    ) -> None:
        """Prefill ``prompts[seq][start:]`` so that each prompt's rows meet only kernels
        that give them what a prefill alone gives (batch-invariant kernels).

        llama.cpp cuts a decode of several sequences into micro-batches holding as many
        rows of each; prompts of unequal lengths would leave some of them a single row,
        whose attention takes another kernel. So a decode packs whole prompts of one
        length, in consecutive sequences (the callers sort prompts by length: sequences
        out of order are cut apart too), and a prompt longer than a decode holds gets
        pieces of its own.
        """
        batch, n_batch = llama.batch, llama.n_batch
        seq = 0
        while seq < len(prompts):
            size = len(prompts[seq]) - start
            if size > n_batch // 2:
                self._decode_pieces(llama, seq, prompts[seq], start, ctx, me, take)
                seq += 1
                continue
            group = [seq]
            while (
                group[-1] + 1 < len(prompts)
                and len(prompts[group[-1] + 1]) - start == size
                and (len(group) + 1) * size <= n_batch
            ):
                group.append(group[-1] + 1)
            self._raise_if_ended(ctx, "during prefill")

            def decode(group: list[int] = group) -> None:
                batch.clear()
                ends = {}
                for s in group:
                    for pos in range(start, len(prompts[s])):
                        index = batch.add(prompts[s][pos], pos, s, pos == len(prompts[s]) - 1)
                    ends[s] = index
                self._decode_armed(llama, me, ctx)
                for s, index in ends.items():
                    take(s, index)

            self._steps.work(len(group) * size, ctx, decode)
            seq = group[-1] + 1

    def _decode_pieces(
        self,
        llama: Any,
        seq: int,
        tokens: list[int],
        start: int,
        ctx: Context,
        me: object | None,
        take: Callable[[int, int], None] | None = None,
    ) -> None:
        """Decode ``tokens[start:]`` into ``seq`` alone, in pieces of two rows or more (one
        decode at a time, under the engine lock); ``take`` gets the last position's index."""
        batch, pos, n = llama.batch, start, len(tokens)
        while pos < n:
            end = _piece_end(pos, n, llama.n_batch)
            self._raise_if_ended(ctx, "during prefill")

            def decode(pos: int = pos, end: int = end) -> None:
                batch.clear()
                for p in range(pos, end):
                    index = batch.add(tokens[p], p, seq, take is not None and p == n - 1)
                self._decode_armed(llama, me, ctx)
                if take is not None and end == n:
                    take(seq, index)

            self._steps.work(end - pos, ctx, decode)
            pos = end

    def _shared_prefix(self, prompts: list[list[int]]) -> int:
        """How many first tokens all ``prompts`` share, when worth decoding once (else 0)."""
        if not self._prefix_cache or len(prompts) < 2:
            return 0
        first = prompts[0]
        # every prompt's last token is decoded for its logits, with batch-invariant kernels
        # in a decode of two rows or more
        n = min(len(p) for p in prompts) - (MIN_PIECE if self._invariant else 1)
        for p in prompts[1:]:
            n = _common_prefix(first[:n], p)
        return n if n >= MIN_SHARED_PREFIX else 0

    def _decode_bodies(
        self, llama: Any, bodies: list[tuple[int, int, int]], ctx: Context, me: object | None
    ) -> None:
        """Decode (seq, pos, token) triples without outputs, ``n_batch`` at a time."""
        batch = llama.batch
        for start in range(0, len(bodies), llama.n_batch):
            self._raise_if_ended(ctx, "during prefill")
            rows = bodies[start : start + llama.n_batch]

            def decode(rows: list[tuple[int, int, int]] = rows) -> None:
                batch.clear()
                for seq, pos, t in rows:
                    batch.add(t, pos, seq, False)
                self._decode_armed(llama, me, ctx)

            self._steps.work(len(rows), ctx, decode)

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
        if encoded and cfg.max_tokens and not self._shared_decode:
            for k in encoded:
                self._generate_alone(k, encoded[k], book, cfg, ctx)
        elif encoded and cfg.max_tokens:
            keys = self._pack_order(encoded)
            with self._batch_turn(ctx), self._watch(ctx, _total(encoded) > WATCH_PREFILL_OVER) as me:
                for start in range(0, len(keys), BATCH_SEQS):
                    group = keys[start : start + BATCH_SEQS]
                    self._decode_together(group, encoded, book, cfg, ctx, rec, me)
        rec.active_memory_bytes, rec.peak_memory_bytes = process_memory()
        return book.results(len(prompts))

    def _generate_alone(
        self, key: int, tokens: list[int], book: BatchBook, cfg: GenerateConfig, ctx: Context
    ) -> None:
        """One prompt of a ``batch_generate`` streamed as ``generate`` would stream it
        (``shared_decode=False``), through its finisher: the same tokens as a call alone."""
        fin, mine = book.finishers[key], MetricsRecorder()
        pieces = self._stream(tokens, frozenset(), cfg, ctx, mine)
        try:
            for tid, piece in pieces:
                book.tokens[key] += fin.push(tid, piece)
                if fin.finish_reason is not None:
                    break
            else:
                book.tokens[key] += fin.end(mine.finish_reason or "end_of_text")
        finally:
            pieces.close()
            rec = book.rec
            rec.prefill_duration = (rec.prefill_duration or 0.0) + (mine.prefill_duration or 0.0)
            rec.decode_duration = (rec.decode_duration or 0.0) + (mine.decode_duration or 0.0)
            rec.cached_prompt_tokens += mine.cached_prompt_tokens

    def _decode_together(
        self,
        keys: list[int],
        encoded: dict[int, list[int]],
        book: BatchBook,
        cfg: GenerateConfig,
        ctx: Context,
        rec: MetricsRecorder,
        me: object | None,
    ) -> None:
        """Decode up to ``BATCH_SEQS`` prompts together, one batch per step.

        Each prompt's tokens go through its own ``TokenFinisher`` as they are sampled, so
        a prompt stops at its stop string (matched on whole UTF-8 text, across tokens)
        or stop id the step it appears, exactly as ``generate`` would stop.
        """
        prompts = [encoded[k] for k in keys]
        finishers, tokens = book.finishers, book.tokens
        clock = time.perf_counter
        # room for the longest prompt and max_tokens, but never more than the context
        per_seq = _round_up(min(max(map(len, prompts)) + cfg.max_tokens + 1, self.context_len), 64)
        samplers = [self._engine.Sampler(cfg, self._model.n_vocab) for _ in keys]
        try:
            for s, p in zip(samplers, prompts, strict=True):
                s.accept_all(p)
            began = clock()
            with self._engine_lock:
                llama = self._batch_context(len(keys), per_seq, len(keys))
            picks: dict[int, int] = {}  # per sequence: the token just sampled

            def first(seq: int, index: int) -> None:
                picks[seq] = samplers[seq].sample(llama, index)

            self._pack_prefill(llama, prompts, ctx, me, rec, first)
            rec.prefill_duration = (rec.prefill_duration or 0.0) + clock() - began
            rec.prefill_done(rec.prompt_tokens + sum(map(len, prompts)))
            live = {seq: len(prompts[seq]) for seq in range(len(keys))}  # per sequence: its next position
            seq_end = min(llama.per_seq, self.context_len)  # as generate: no position past the context

            def step() -> None:
                """One decode of every live prompt's next token (in a step's turn)."""
                nonlocal picks, live
                began = clock()
                llama.batch.clear()
                nxt, rows = {}, {}
                for seq, tid in picks.items():
                    key, pos = keys[seq], live[seq]
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
                    rows[seq], nxt[seq] = llama.batch.add(tid, pos, seq, True), pos + 1
                if nxt:
                    self._decode_armed(llama, me, ctx)
                picks = {seq: samplers[seq].sample(llama, row) for seq, row in rows.items()}
                for seq in set(live) - set(nxt):
                    llama.clear_seq(seq)
                live = nxt
                rec.decode_duration = (rec.decode_duration or 0.0) + clock() - began

            while live:
                self._raise_if_ended(ctx, "during batch_generate")
                self._steps.work(len(live), ctx, step)
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
        with self._seq_lock:
            self._kept.clear()  # what they described is freed with the context below
            self._live.clear()
        with self._engine_lock:
            if self._batch_ctx is not None:
                self._batch_ctx.free()
                self._batch_ctx = None
            if self._ctx is not None:
                self._ctx.free()
                self._ctx = None
            if self._model is not None:
                self._model.free()


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many first items ``a`` and ``b`` share."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _reuse_start(common: int, n: int, chunk: int) -> int:
    """Where to resume prefill of an ``n``-token prompt whose first ``common`` tokens are cached.

    The rest is decoded in the rows that prefilling the whole prompt alone would use, so
    the prompt's logits stay what they are alone, as measured on llama.cpp's CPU code:
    the resumed chunk starts on a multiple of 4 rows (the matrix code's row groups) and
    holds at least 64 rows (shorter batches take other kernels), else it starts earlier.
    At least the last prompt token is decoded again: its logits give the first new token.
    """
    start = min(common, n - 1) // ROW_GROUP * ROW_GROUP
    if start <= 0:
        return 0
    chunk_start = start // chunk * chunk
    chunk_end = min(n, chunk_start + chunk)
    if chunk_end - start < SAME_KERNEL_ROWS:
        start = max(chunk_start, (chunk_end - SAME_KERNEL_ROWS) // ROW_GROUP * ROW_GROUP)
    return start


def _piece_end(pos: int, n: int, step: int) -> int:
    """The end of a batch-invariant prefill piece from ``pos`` of ``n`` tokens: ``step`` rows,
    less one where that would leave a single row for the last piece."""
    end = min(n, pos + step)
    return end - 1 if n - end == 1 else end


def _micro_batches(rows: list[tuple[int, int]], n_ubatch: int) -> list[dict[int, int]]:
    """How llama.cpp cuts one decode into micro-batches with a cache per sequence: ``rows``
    is (sequence, rows) per job in batch order; each micro-batch maps sequence -> rows.

    The same steps as ``llama_batch_allocr::split_equal(n_ubatch, sequential=true)``: a
    micro-batch takes, from the first job with rows left, the run of sequences that follow
    it with consecutive ids (in batch order), and as many rows from each as the shortest
    has left, within ``n_ubatch`` rows in all.
    """
    left = [n for _, n in rows]
    out: list[dict[int, int]] = []
    while any(left):
        run: list[int] = []  # job indices
        for i, (seq, _) in enumerate(rows):
            if left[i] and (not run or seq == rows[run[-1]][0] + 1):
                run.append(i)
        k = max(1, min(min(left[i] for i in run), n_ubatch // len(run)))
        for i in run:
            left[i] -= k
        out.append({rows[i][0]: k for i in run})
    return out


def _whole_pieces(rows: list[tuple[int, int]], chunk_seqs: set[int], n_ubatch: int) -> bool:
    """Whether no sequence in ``chunk_seqs`` gets a micro-batch piece of fewer than two rows
    when (sequence, rows) ``rows`` share one decode, laid out in sequence order as
    ``_decode_rows`` lays them out."""
    pieces = (k for mb in _micro_batches(sorted(rows), n_ubatch) for s, k in mb.items() if s in chunk_seqs)
    return all(k >= MIN_PIECE for k in pieces)


def _flag(value: object, name: str) -> bool:
    """An engine option that must be a bool."""
    if not isinstance(value, bool):
        raise ValueError(f"engine_options: {name} must be true or false, got {value!r}")
    return value


def _total(encoded: dict[int, list[int]]) -> int:
    """The prompt tokens of a classify/batch_generate call (longer calls are watched, as prompts are)."""
    return sum(map(len, encoded.values()))


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


def _interrupted(jobs: list[Job], exc: BaseException, me: int, interrupts: list[BaseException]) -> None:
    """A Ctrl-C (``exc``) in the leader's thread ``me`` during ``jobs``' part of a step.

    The leader's own jobs end with it; another thread's job whose token was not sampled
    ends with an ``EngineError`` saying why (never with a ``KeyboardInterrupt`` of its own).
    """
    interrupts.append(exc)
    for j in jobs:
        if j.token < 0 and j.error is None:
            j.error = exc if j.thread == me else EngineError("llama.cpp step interrupted in another thread")
