"""Thin wrapper over llama-cpp-python's low-level bindings: model, contexts, batches, samplers.

Imported only when the ``llama_cpp`` backend loads a model. Everything here runs under
the caller's engine lock; it knows nothing of the contract's streams or options.
"""

from __future__ import annotations

import atexit
import ctypes
import logging
import os
import queue
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

from llama_cpp import llama_cpp as L

from ...errors import BackendUnavailable, EngineError, InferenceError, ModelLoadError
from ...streaming import engine_seed
from ...types import GenerateConfig

log = logging.getLogger("core_inference.llama_cpp")

_LEVELS = {4: logging.WARNING}  # ggml: 1 debug, 2 info, 3 warn, 4 error, 5 continued
_backend_ready = threading.Lock()
_initialised = False


_decoding = threading.local()  # .abort_flag: the flag of the decode running on this thread
_loading = threading.local()  # .interrupted: Ctrl-C arrived while this thread loads a model

MIN_VERSION = "0.3.15"  # the first llama-cpp-python with llama_get_memory and kv_unified


def check_engine() -> None:
    """``BackendUnavailable`` naming the version needed when llama-cpp-python is too old."""
    fields = {name for name, *_ in L.llama_context_params._fields_}
    if not hasattr(L, "llama_get_memory") or "kv_unified" not in fields:
        import llama_cpp

        have = getattr(llama_cpp, "__version__", "unknown")
        raise BackendUnavailable(
            "llama_cpp",
            f"llama-cpp-python {have} is too old: the llama_cpp backend needs {MIN_VERSION} or newer "
            f"(pip install -U 'llama-cpp-python>={MIN_VERSION}')",
            "llama-cpp",
        )


def _interrupted() -> None:
    """Ctrl-C inside a C callback: Python would print it and carry on, so remember it instead."""
    _loading.interrupted = True


@L.llama_log_callback  # type: ignore[untyped-decorator]
def _log_callback(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
    try:
        flag = getattr(_decoding, "abort_flag", None)
        if flag is not None and flag[0] != b"\x00":
            level = 1  # llama.cpp reports an abort we asked for as a failure: not the user's concern
        log.log(_LEVELS.get(level, logging.DEBUG), "%s", text.decode("utf-8", "replace").rstrip())
    except KeyboardInterrupt:
        _interrupted()


@L.llama_progress_callback  # type: ignore[untyped-decorator]
def _load_progress(_progress: float, _user: ctypes.c_void_p) -> bool:
    """Returning False stops llama.cpp's load: done once Ctrl-C has arrived during it."""
    try:
        return not getattr(_loading, "interrupted", False)
    except KeyboardInterrupt:
        _interrupted()
        return False


def init_backend() -> None:
    """Initialise llama.cpp once per process and route its log into ``logging``."""
    global _initialised
    with _backend_ready:
        if not _initialised:
            L.llama_log_set(_log_callback, ctypes.c_void_p(0))
            L.llama_backend_init()
            _initialised = True


def gpu_offload() -> bool:
    """Whether this llama.cpp build can put layers on a GPU."""
    return bool(L.llama_supports_gpu_offload())


GGML_TYPE_BF16 = 30  # ggml.h's enum ggml_type
TILED_SWITCH = "GGML_CPU_TILED_MM"  # ggml reads it once, at the process's first matrix product


def batch_invariant_kernels() -> None:
    """Make llama.cpp's CPU kernels give a row the same result whatever rows share its decode.

    Three of ggml's kernel choices depend on how many rows a matrix product has, and the
    results they give differ in the last bits, enough to flip a close greedy pick:

    - repacked weights (``use_extra_bufts``) are multiplied four rows at a time, and the
      rows left over one at a time, in another order of sums;
    - the tiled K-quant kernel takes products of 8 rows or more, the plain one fewer;
    - flash attention splits a lone query row's keys in chunks from 512 cached tokens on,
      and tiles a sequence's rows from 64 in a micro-batch on. ggml takes both only where
      keys and values are of one type, so ``Context(invariant=True)`` keeps values in
      bfloat16 (keys stay float16): every row then takes the one-row kernel, whose result
      for a row is the same whatever the other rows. Turning flash attention off instead
      costs 13% of the decode rate at 16 streams; bfloat16 values cost a little precision
      (8 bits of mantissa against 11), and prompts of many hundred tokens prefill slower.

    And one choice of the cache: sliding-window layers that keep only their window reuse
    cells in an order set by how the prompt was cut into decodes, and attention sums over
    cells in cell order. ``Context(invariant=True)`` keeps the whole context in them
    (``swa_full``: more memory); ``Model(repack=False)``;
    the tiled kernel can only be switched off for the whole process, through an environment
    variable ggml reads once, when it first multiplies. So this sets it before the
    process's first decode, and refuses once a decode has run with the kernel on.
    """
    have = {name for name, *_ in L.llama_model_params._fields_} | {
        name for name, *_ in L.llama_context_params._fields_
    }
    if not {"use_extra_bufts", "flash_attn_type"} <= have:
        import llama_cpp

        raise ValueError(
            f"engine_options: batch_invariant needs a llama-cpp-python newer than "
            f"{getattr(llama_cpp, '__version__', 'this one')} (its llama.cpp lacks the "
            "use_extra_bufts and flash_attn_type settings)"
        )
    if _DECODER.started:
        if _DECODER.tiled_switch == "0":
            return  # off since before the first decode
        raise ValueError(
            "engine_options: batch_invariant needs llama.cpp's tiled matrix kernel off, which ggml "
            "decides once per process, and a decode has already run with it on: set "
            f"{TILED_SWITCH}=0 in the environment, or load this model before any other decodes"
        )
    os.environ[TILED_SWITCH] = "0"


class Aborted(InferenceError):
    """``llama_decode`` stopped part-way because the context's abort flag was set."""


def _flag_reader() -> Any:
    """llama.cpp's abort callback as a C function that reads a flag, or None where none is found.

    ggml calls the callback from its own worker thread after every node of the graph.
    A Python callback would take the GIL each time (and wait for it while other Python
    threads run), so a C function is given instead: libc's ``strlen`` over a two-byte
    buffer returns 0 while the buffer is ``b"\\0\\0"`` and 1 once its first byte is set,
    which is what a ``bool (*)(void *)`` returns on every ABI llama.cpp supports
    (the result comes back in the return register, and the caller reads its low byte).
    """
    try:
        libc = ctypes.CDLL(None) if sys.platform != "win32" else ctypes.cdll.msvcrt
        address = ctypes.cast(libc.strlen, ctypes.c_void_p).value
    except (OSError, AttributeError):  # no C library to be found: decodes run to the end
        return None
    return L.ggml_abort_callback(address) if address else None


_FLAG_READER = _flag_reader()


class _Call:
    """One ``llama_decode`` handed to the decode thread, and how it ended."""

    __slots__ = ("batch", "ctx", "done", "finished", "flag", "rc")

    def __init__(self, ctx: Any, batch: Any, flag: Any) -> None:
        self.ctx, self.batch, self.flag = ctx, batch, flag
        self.rc = -1
        self.finished = False  # set before ``done`` is released: the caller may already hold it
        self.done = threading.Lock()
        self.done.acquire()


class _DecodeThread:
    """The one thread that runs ``llama_decode`` in this process, whoever asks for it.

    llama.cpp's CPU threads are an OpenMP team belonging to the thread that calls
    ``llama_decode``; each calling thread gets a team of its own, and teams outlive their
    decodes. Once libgomp manages more threads than there are cores, it stops spinning at
    barriers and sleeps in the kernel instead, and ggml passes a barrier after every node
    of the graph: measured on two cores, a 4-stream decode took 31 ms from one thread and
    up to 83 ms once another thread had decoded too (streams led by different threads,
    a server's worker threads, a main thread that ran ``batch_generate``). Handing every
    decode to this thread keeps one team; the hand-off costs tens of microseconds against
    milliseconds for a decode.
    """

    def __init__(self) -> None:
        self._start_lock = threading.Lock()
        self._jobs: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._idle = threading.Condition(threading.Lock())
        self._running: _Call | None = None
        self._stopped = False
        self.tiled_switch: str | None = None  # GGML_CPU_TILED_MM when the first decode was asked for

    def decode(self, ctx: Any, batch: Any, flag: Any, held: list[BaseException] | None = None) -> int:
        """Run ``llama_decode(ctx, batch)`` on the decode thread; its return code.

        A Ctrl-C during it stops the decode and is raised; with ``held`` (a decode that
        carries other threads' streams too) the decode runs to its end instead, and the
        interrupt is put in ``held`` for the caller to raise once the others are served.

        The caller never leaves while its decode runs, even on Ctrl-C: the batch and the
        context must outlive it. Python raises ``KeyboardInterrupt`` in the main thread at
        the first check after a C call returns, so it can arrive after ``done`` was
        acquired as well as during the wait: ``finished`` tells the two apart (waiting for
        ``done`` again after it was acquired hung a Ctrl-C'd command line for good).
        """
        if self._thread is None:
            self._start()
        if self._stopped:
            return -1  # the process is exiting
        call = _Call(ctx, batch, flag)
        posted = False
        try:
            posted = True  # no interrupt can land between this and the put (a C call)
            self._jobs.put(call)
            call.done.acquire()
        except BaseException as exc:  # Ctrl-C: stop the decode at its next graph node, wait, then raise
            if posted:
                if held is None:
                    flag[0] = b"\x01"
                while not call.finished:
                    try:
                        call.done.acquire(timeout=0.05)
                    except BaseException:  # a second Ctrl-C: the first one is raised
                        continue
                if held is None:
                    flag[0] = b"\x00"  # the context's next decode is not this one's to stop
            if held is None or not posted:
                raise
            held.append(exc)
        return call.rc

    @property
    def stopped(self) -> bool:
        """Whether the process is exiting and decodes are no longer run."""
        return self._stopped

    @property
    def started(self) -> bool:
        """Whether any decode was asked for in this process."""
        return self._thread is not None

    def wait_idle(self, ctx: Any) -> None:
        """Return once no decode of ``ctx`` runs (before the context is freed)."""
        with self._idle:
            while self._running is not None and self._running.ctx is ctx:
                self._idle.wait(0.1)

    def _start(self) -> None:
        with self._start_lock:
            if self._thread is None:
                self.tiled_switch = os.environ.get(TILED_SWITCH)
                self._thread = threading.Thread(
                    target=self._serve, name="core-inference llama.cpp decode", daemon=True
                )
                self._thread.start()
                atexit.register(self._stop)

    def _stop(self) -> None:
        """At exit: end a running decode and the thread, before ggml's own teardown runs.

        The thread is a daemon (a stream left running must not keep the process alive);
        left inside ``llama_decode`` while the process exits, it would run on in memory
        that is being freed.
        """
        with self._idle:
            self._stopped = True
            if self._running is not None:
                self._running.flag[0] = b"\x01"
        self._jobs.put(None)
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _serve(self) -> None:
        while True:
            call = self._jobs.get()
            if call is None:
                return
            with self._idle:
                self._running = call
            _decoding.abort_flag = call.flag  # for the log callback, which llama.cpp calls on this thread
            try:
                call.rc = int(L.llama_decode(call.ctx, call.batch))
            except BaseException:  # nothing is raised here but a stray KeyboardInterrupt
                call.rc = -1
            finally:
                _decoding.abort_flag = None
                with self._idle:
                    self._running = None
                    self._idle.notify_all()
                call.finished = True
                call.done.release()


_DECODER = _DecodeThread()


class Batch:
    """A reusable ``llama_batch`` for up to ``capacity`` tokens, one sequence id each."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.raw = L.llama_batch_init(capacity, 0, 1)
        self.n = 0

    def clear(self) -> None:
        self.n = 0

    def add(self, token: int, pos: int, seq: int, logits: bool) -> int:
        """Append one token; returns its index in the batch (for reading logits)."""
        i = self.n
        raw = self.raw
        raw.token[i] = token
        raw.pos[i] = pos
        raw.n_seq_id[i] = 1
        raw.seq_id[i][0] = seq
        raw.logits[i] = logits
        self.n = i + 1
        return i

    def free(self) -> None:
        if self.raw is not None:
            L.llama_batch_free(self.raw)
            self.raw = None


class Context:
    """A llama.cpp context (KV cache for ``n_seq`` sequences) with its batch."""

    def __init__(
        self, model: Any, n_ctx: int, n_seq: int, n_batch: int, threads: int, invariant: bool = False,
        extra_rows: int = 0,
    ) -> None:
        params = L.llama_context_default_params()
        params.n_ctx = n_ctx
        # ``n_batch`` rows a micro-batch; a decode may carry ``extra_rows`` more (the streams'
        # tokens beside a step's prefill chunks), which llama.cpp cuts into micro-batches
        params.n_batch = n_batch + extra_rows
        params.n_ubatch = n_batch
        params.n_seq_max = n_seq
        params.n_threads = threads
        params.n_threads_batch = threads
        params.no_perf = False
        params.kv_unified = False
        params.swa_full = invariant
        if invariant:  # see batch_invariant_kernels: values in bfloat16 pin the one-row kernel
            params.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_ENABLED
            params.type_v = GGML_TYPE_BF16
        self.ptr = L.llama_init_from_model(model, params)
        if not self.ptr:
            raise EngineError(
                f"llama.cpp could not create a context of {n_ctx} tokens x {n_seq} sequences "
                "(out of memory?)"
            )
        self.n_ctx = int(L.llama_n_ctx(self.ptr))
        self.n_seq = n_seq
        self.per_seq = self.n_ctx // n_seq
        self.n_batch = n_batch
        self.memory = L.llama_get_memory(self.ptr)
        # sliding-window layers keep only the last n_swa positions (swa_full is off)
        self.n_swa = int(L.llama_model_n_swa(model))
        self.batch = Batch(n_batch + extra_rows)
        self.decode_calls = 0  # how many batches went through the model (for tests and stats)
        # b"\x01" in the first byte stops a running llama_decode at the next graph node
        self._abort_flag = ctypes.create_string_buffer(2)
        self.abortable = _FLAG_READER is not None
        if self.abortable:
            L.llama_set_abort_callback(self.ptr, _FLAG_READER, ctypes.cast(self._abort_flag, ctypes.c_void_p))

    def abort(self) -> None:
        """Stop the running (or next) ``decode`` part-way; safe from any thread."""
        self._abort_flag[0] = b"\x01"

    def clear_abort(self) -> None:
        self._abort_flag[0] = b"\x00"

    def clear_seq(self, seq: int) -> None:
        L.llama_memory_seq_rm(self.memory, seq, -1, -1)

    def copy_seq(self, src: int, dst: int) -> None:
        """Make ``dst`` hold what ``src`` holds (with a cache per sequence: a whole-buffer copy,
        done by llama.cpp at the start of the next decode)."""
        L.llama_memory_seq_cp(self.memory, src, dst, -1, -1)

    def truncate_seq(self, seq: int, keep: int) -> None:
        """Drop the cache of ``seq`` from position ``keep`` on (everything when ``keep`` is 0)."""
        L.llama_memory_seq_rm(self.memory, seq, keep if keep > 0 else -1, -1)

    def seq_length(self, seq: int) -> int:
        """How many positions the cache of ``seq`` holds (its last position + 1; 0 when empty)."""
        return int(L.llama_memory_seq_pos_max(self.memory, seq)) + 1

    def can_keep(self, seq: int, keep: int) -> bool:
        """Whether the cache of ``seq`` still holds what decoding on from position ``keep`` reads.

        Sliding-window layers drop positions that fell out of their window: a prefix is
        usable only if the window before ``keep`` is still there (as llama-server checks).
        """
        low = int(L.llama_memory_seq_pos_min(self.memory, seq))
        high = int(L.llama_memory_seq_pos_max(self.memory, seq))
        if low < 0 or high < keep - 1:
            return False
        return low == 0 or (self.n_swa > 0 and low <= keep - self.n_swa)

    def decode(self, held: list[BaseException] | None = None) -> None:
        """Run the filled batch through the model (on the process's decode thread).

        ``held``: see ``_DecodeThread.decode`` (a Ctrl-C lets this decode finish, and is kept).
        """
        self.batch.raw.n_tokens = self.batch.n
        self.decode_calls += 1
        rc = _DECODER.decode(self.ptr, self.batch.raw, self._abort_flag, held)
        if rc == 2 and self._abort_flag[0] != b"\x00":
            raise Aborted("llama_decode aborted")
        if rc != 0 and _DECODER.stopped:
            raise EngineError("llama_decode not run: the process is exiting (its decode thread has stopped)")
        if rc != 0:
            raise EngineError(f"llama_decode failed with code {rc} (KV cache full or bad batch)")

    def _logits_view(self, index: int, n_vocab: int) -> Any:
        """The logits of output ``index`` of the last batch, as a numpy view (valid until the next decode)."""
        import numpy as np

        ptr = L.llama_get_logits_ith(self.ptr, index)
        if not ptr:
            raise EngineError(f"llama.cpp has no logits for batch index {index}")
        return np.ctypeslib.as_array(ptr, shape=(n_vocab,))

    def logits(self, index: int, n_vocab: int) -> Any:
        """A copy of the logits of output ``index`` of the last batch, as a numpy array."""
        return self._logits_view(index, n_vocab).copy()

    def argmax(self, index: int, n_vocab: int) -> int:
        """The id with the highest logit at output ``index`` (the first one on a tie)."""
        return int(self._logits_view(index, n_vocab).argmax())

    def perf(self) -> tuple[float, float, int, int]:
        """(prefill seconds, decode seconds, prefill tokens, decoded tokens) since the last reset."""
        data = L.llama_perf_context(self.ptr)
        return data.t_p_eval_ms / 1e3, data.t_eval_ms / 1e3, data.n_p_eval, data.n_eval

    def perf_reset(self) -> None:
        L.llama_perf_context_reset(self.ptr)

    def free(self) -> None:
        if self.ptr:
            self.abort()
            _DECODER.wait_idle(self.ptr)  # a decode left running by an interrupted caller
        self.batch.free()
        if self.ptr:
            L.llama_free(self.ptr)
            self.ptr = None


class Model:
    """A loaded GGUF model: vocabulary, tokenizer, detokenizer and sampler factory."""

    def __init__(self, path: str, gpu_layers: int, repack: bool = True) -> None:
        check_engine()
        init_backend()
        params = L.llama_model_default_params()
        if not repack:  # llama.cpp's default rearranges the weights for the CPU's matrix kernels
            params.use_extra_bufts = False
        params.n_gpu_layers = 0x7FFFFFFF if gpu_layers < 0 else gpu_layers
        params.progress_callback = _load_progress
        _loading.interrupted = False
        try:
            self.ptr = L.llama_model_load_from_file(path.encode(), params)
        except KeyboardInterrupt:  # arrived between two callbacks
            _interrupted()
            self.ptr = None
        if getattr(_loading, "interrupted", False):
            _loading.interrupted = False
            if self.ptr:
                L.llama_model_free(self.ptr)
                self.ptr = None
            raise KeyboardInterrupt
        if not self.ptr:
            raise ModelLoadError(
                f"{path}: llama.cpp could not load the model (unsupported architecture, "
                "tensor types or corrupt data; run with logging at DEBUG for its reasons)",
                path,
            )
        self.vocab = L.llama_model_get_vocab(self.ptr)
        self.n_vocab = int(L.llama_vocab_n_tokens(self.vocab))
        self.n_ctx_train = int(L.llama_model_n_ctx_train(self.ptr))
        self._pieces: dict[int, bytes] = {}

    def tokenize(self, text: str, add_special: bool, parse_special: bool = True) -> list[int]:
        data = text.encode("utf-8")
        cap = len(data) + 16
        buf = (L.llama_token * cap)()
        n = L.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
        if n < 0:
            cap = -n
            buf = (L.llama_token * cap)()
            n = L.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
        if n < 0:
            raise EngineError(f"tokenization failed ({n})")
        return list(buf[:n])

    def piece(self, token: int) -> bytes:
        """The bytes a token stands for (control tokens render as nothing)."""
        cached = self._pieces.get(token)
        if cached is None:
            buf = ctypes.create_string_buffer(64)
            n = L.llama_token_to_piece(self.vocab, token, buf, 64, 0, False)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = L.llama_token_to_piece(self.vocab, token, buf, -n, 0, False)
            cached = buf.raw[: max(n, 0)]
            self._pieces[token] = cached
        return cached

    def special_text(self, token: int) -> str:
        """The text of a token with control tokens rendered (e.g. "<bos>")."""
        buf = ctypes.create_string_buffer(256)
        n = L.llama_token_to_piece(self.vocab, token, buf, 256, 0, True)
        return buf.raw[: max(n, 0)].decode("utf-8", "replace")

    def is_eog(self, token: int) -> bool:
        return bool(L.llama_vocab_is_eog(self.vocab, token))

    def single_token(self, text: str) -> int | None:
        """The id of a special token written as ``text``, or None if the vocabulary lacks it."""
        ids = self.tokenize(text, add_special=False, parse_special=True)
        if len(ids) == 1 and self.special_text(ids[0]) == text:
            return ids[0]
        return None

    @property
    def adds_bos(self) -> bool:
        """True when the model asks for a BOS token at the start of every prompt."""
        return bool(L.llama_vocab_get_add_bos(self.vocab))

    @property
    def bos(self) -> int:
        return int(L.llama_vocab_bos(self.vocab))

    @property
    def eos(self) -> int:
        return int(L.llama_vocab_eos(self.vocab))

    def new_context(
        self, n_ctx: int, n_seq: int, n_batch: int, threads: int, invariant: bool = False, extra_rows: int = 0
    ) -> Context:
        return Context(self.ptr, n_ctx, n_seq, n_batch, threads, invariant, extra_rows)

    def free(self) -> None:
        if self.ptr:
            L.llama_model_free(self.ptr)
            self.ptr = None


class Sampler:
    """A llama.cpp sampler chain built from a ``GenerateConfig``: sampling runs in C."""

    def __init__(self, cfg: GenerateConfig, n_vocab: int) -> None:
        params = L.llama_sampler_chain_default_params()
        params.no_perf = True
        self.ptr = L.llama_sampler_chain_init(params)
        self.n_vocab = n_vocab
        penalty = bool(cfg.repeat_penalty and cfg.repeat_penalty != 1.0)
        # Only the penalty sampler keeps a history; the others ignore accepted tokens.
        self.stateful = penalty
        # Greedy without a penalty is an argmax over the logits. Read them in place: the
        # chain would first copy all n_vocab of them into a candidate array, which costs
        # ~10x more (0.3-0.5 ms a token for a 262k vocabulary, 2-3% of a decode step).
        self.argmax = cfg.temperature == 0.0 and not penalty
        add: Callable[[Any], None] = lambda s: L.llama_sampler_chain_add(self.ptr, s)  # noqa: E731
        if penalty:
            add(L.llama_sampler_init_penalties(n_vocab, 64, cfg.repeat_penalty, 0.0, 0.0))
        if cfg.temperature == 0.0:
            add(L.llama_sampler_init_greedy())
        else:
            if cfg.top_k:
                add(L.llama_sampler_init_top_k(cfg.top_k))
            if cfg.top_p:
                add(L.llama_sampler_init_top_p(cfg.top_p, 1))
            add(L.llama_sampler_init_temp(cfg.temperature))
            # only seed=None is random; every other seed is hashed to 32 bits, never 0xFFFFFFFF
            seed = L.LLAMA_DEFAULT_SEED if cfg.seed is None else engine_seed(cfg.seed, 32)
            add(L.llama_sampler_init_dist(seed))

    def accept_all(self, tokens: Sequence[int]) -> None:
        """Feed prompt tokens to stateful samplers (the repeat penalty's history)."""
        if not self.stateful:
            return
        for t in tokens:
            L.llama_sampler_accept(self.ptr, t)

    def sample(self, ctx: Context, index: int) -> int:
        if self.argmax:
            return ctx.argmax(index, self.n_vocab)
        return int(L.llama_sampler_sample(self.ptr, ctx.ptr, index))

    def free(self) -> None:
        if self.ptr:
            L.llama_sampler_free(self.ptr)
            self.ptr = None
