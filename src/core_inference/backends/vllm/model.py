"""``VllmModel``: a Hugging Face folder on vLLM's V1 ``AsyncLLM``, as a contract model.

The raw stream is async (``_aengine_generate``): one vLLM request per call, on the model's
engine loop, with ``RequestOutputKind.DELTA`` so that each ``RequestOutput`` carries only
the new token ids, passed on the moment vLLM produces them. Prompts are tokenized here and
sent as token ids, so ``tokenize`` is what is prefilled and a chat prompt that begins
with BOS gets no second one. Leaving a stream (break, cancel, deadline, close) closes
vLLM's ``generate`` generator, which aborts the request inside the engine; ``classify``
and ``batch_generate`` add every prompt's request at once, so vLLM schedules them in the
same steps. ``classify(return_logits=True)`` asks vLLM for the whole vocabulary's raw
logits of the sampled position (the engine runs with ``logprobs_mode="raw_logits"`` and
``max_logprobs=-1``, which change nothing for a request that asks for no logprobs).
Imported only when a model loads.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import vllm
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.sampling_params import RequestOutputKind, SamplingParams
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.metrics.loggers import StatLoggerBase

from ...context import Context
from ...errors import ContextLengthExceeded, EngineError, InferenceError, ModelLoadError
from ...formats.hf import HFFolder, read_hf_folder
from ...model import BaseModel
from ...streaming import MetricsRecorder, Piece, TokenFinisher, afinish_tokens, engine_seed
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

DEFAULT_CONTEXT = 8192  # max_model_len when none is asked for and the model's own is larger
DEFAULT_SLOTS = 8  # max_num_seqs when parallel_slots is not given: vLLM batches them
CPU_KV_CACHE = 1 << 30  # the KV cache on the CPU build when no memory option is given
SHUTDOWN_TIMEOUT = 30.0  # seconds close() waits for the engine process to stop
_ENV_LOCK = threading.Lock()  # environment variables read by the processes a load spawns
_SPAWN_ENV = ("VLLM_CPU_OMP_THREADS_BIND", "VLLM_RPC_BASE_PATH")  # the ones a load may set
_SEQ = itertools.count()
LOGITS_MODE = "raw_logits"  # vLLM's logprobs_mode that makes a request's logprobs its raw logits
_TAIL = 8  # ids of context for splitting a merged delta's text (SentencePiece spaces need some)


_WRAPPERS = ("Engine core initialization failed", "WorkerProc initialization failed", "See root cause")
_ERROR_LINE = re.compile(r"\b([A-Za-z_][\w.]*(?:Error|Exception)): (.+)$")


class StderrTee:
    """While a load runs, file descriptor 2 is a pipe whose reader copies everything to the
    real stderr and keeps the last lines, so that the reason an engine or worker process
    failed to start (which vLLM writes there, raising only "see root cause above") can be
    told. The processes started meanwhile keep the pipe; the reader thread goes on copying
    until they have all exited."""

    KEEP = 400

    def __init__(self) -> None:
        self._lines: list[str] = []
        self._saved = -1
        self._thread: threading.Thread | None = None

    def __enter__(self) -> StderrTee:
        try:
            read, write = os.pipe()
            self._saved = os.dup(2)
        except OSError:
            return self
        out = self._saved
        self._thread = threading.Thread(target=self._copy, args=(read, os.dup(out)),
                                        name="core-inference vllm stderr", daemon=True)
        self._thread.start()
        import sys

        sys.stderr.flush()
        os.dup2(write, 2)
        os.close(write)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._saved < 0:
            return
        import sys

        with contextlib.suppress(Exception):
            sys.stderr.flush()
        os.dup2(self._saved, 2)
        os.close(self._saved)
        self._saved = -1

    def _copy(self, read: int, out: int) -> None:
        pending = b""
        with contextlib.suppress(OSError):
            while True:
                chunk = os.read(read, 65536)
                if not chunk:
                    break
                with contextlib.suppress(OSError):
                    os.write(out, chunk)
                pending += chunk
                *whole, pending = pending.split(b"\n")
                self._lines.extend(w.decode("utf-8", "replace") for w in whole)
                del self._lines[: -self.KEEP]
        os.close(read)
        os.close(out)

    def reason(self, wait: float = 2.0) -> str:
        """The first error a child process reported (``AssertionError: ...``), or ""."""
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:  # the failing process may still be writing
            if self._first_error():
                break
            time.sleep(0.1)
        return self._first_error()

    def _first_error(self) -> str:
        for line in list(self._lines):
            m = _ERROR_LINE.search(line)
            if m and not any(w in line for w in _WRAPPERS):
                return f"{m.group(1)}: {m.group(2).strip()}"
        return ""


class _SchedulerTap(StatLoggerBase):  # type: ignore[misc]
    """A stat logger that keeps the engine's latest scheduler counts (vLLM calls ``record``)."""

    def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
        self.running = 0
        self.waiting = 0
        self.history: list[int] = []  # num_running_reqs per engine step reported, for tests and bench

    def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None,
               engine_idx: int = 0) -> None:
        if scheduler_stats is None:
            return
        self.running = int(scheduler_stats.num_running_reqs)
        self.waiting = int(scheduler_stats.num_waiting_reqs)
        self.history.append(self.running)
        del self.history[:-1000]

    def log_engine_initialized(self) -> None:
        pass


def _positive(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"engine_options: {name} must be a positive integer, got {value!r}")
    return value


def engine_args(path: str, cfg: LoadConfig, context_len: int, platform_is_cpu: bool) -> dict[str, Any]:
    """vLLM's ``AsyncEngineArgs`` for a load: our options mapped, engine options passed on."""
    opts = dict(cfg.engine_options)
    extra = opts.pop("engine_args", None) or {}
    if not isinstance(extra, Mapping):
        raise TypeError(f"engine_options: engine_args must be a mapping, got {type(extra).__name__}")
    opts.pop("cpu_threads_bind", None)
    for name in ("tensor_parallel_size", "pipeline_parallel_size"):
        if name in opts:
            _positive(opts[name], name)
    args: dict[str, Any] = {
        "model": path,
        "tokenizer": path,
        "max_model_len": context_len,
        "max_num_seqs": cfg.parallel_slots or DEFAULT_SLOTS,
        "disable_log_stats": True,  # our stat logger is enough; vLLM's own would print every few seconds
        "enable_log_requests": False,
    }
    if not extra.get("enable_batch_sharded_sampling"):  # which vLLM refuses with max_logprobs=-1
        # classify's logits: a request's logprobs are the raw logits, the whole vocabulary
        # allowed. Both are read only for a request that asks for logprobs (vLLM's Sampler
        # computes none otherwise), so plain generation is unchanged; see docs/vllm.md.
        args["logprobs_mode"] = LOGITS_MODE
        args["max_logprobs"] = -1
    if platform_is_cpu:
        # eager mode: torch.compile on CPU takes minutes at every load
        args["enforce_eager"] = True
        if "gpu_memory_utilization" not in opts and "kv_cache_memory_bytes" not in opts:
            # On the CPU build gpu_memory_utilization is the share of all RAM reserved (0.92 by
            # default), which a busy machine refuses: a fixed KV cache instead.
            args["kv_cache_memory_bytes"] = CPU_KV_CACHE
    args.update(opts)
    args.update(extra)
    return args


def _check_bind(bind: str, path: str) -> None:
    """A CPU that ``cpu_threads_bind`` names but this process may not run on is refused here:
    vLLM binds nothing then and starts every rank anyway, all on the same cores."""
    if bind.strip() in ("auto", "nobind", "all"):
        return
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    named: set[int] = set()
    try:
        for rank in bind.split("|"):
            for part in rank.split(","):
                low, _, high = part.strip().partition("-")
                named.update(range(int(low), int(high or low) + 1))
    except ValueError:
        raise ModelLoadError(
            f"{path}: cpu_threads_bind {bind!r}: expected CPU numbers and ranges per rank, such as '0-3|4-7'",
            path,
        ) from None
    missing = sorted(named - allowed)
    if missing:
        raise ModelLoadError(
            f"{path}: cpu_threads_bind {bind!r} names CPUs {', '.join(map(str, missing))} that this process "
            f"cannot run on (it may use {', '.join(map(str, sorted(allowed)))}): fewer ranks, or other CPUs",
            path,
        )


class VllmModel(BaseModel):
    """A Hugging Face causal LM served by vLLM's async engine in this process's children."""

    def __init__(self, path: str, cfg: LoadConfig) -> None:
        self.folder: HFFolder = read_hf_folder(path)
        self.path = self.folder.path
        self.model_type = self.folder.model_type or "unknown"
        train = self.folder.context_length or DEFAULT_CONTEXT
        context_len = cfg.context_len or min(train, DEFAULT_CONTEXT)
        bind = cfg.engine_options.get("cpu_threads_bind")
        if bind is not None and not isinstance(bind, str):
            raise TypeError(f"engine_options: cpu_threads_bind must be a str such as '0|1', got {bind!r}")
        from vllm.platforms import current_platform

        kw = engine_args(self.path, cfg, context_len, current_platform.is_cpu())
        if bind is not None and current_platform.is_cpu():
            _check_bind(bind, self.path)
        super().__init__(int(kw.get("max_num_seqs") or DEFAULT_SLOTS))
        self.context_len = context_len
        self.engine_kw = kw
        # classify's logits need both settings; a caller may override either through engine_args
        self._logits = kw.get("logprobs_mode") == LOGITS_MODE and kw.get("max_logprobs") == -1
        self._engine: Any = None
        self._tok: Any = None
        self._tap: _SchedulerTap | None = None
        self._rpc_dir: str | None = None  # where this engine's ZeroMQ sockets live; removed at close
        try:
            self.engine_loop().run(self._start(kw, bind))
            self._tok = self._live().get_tokenizer()
            self._bos_text = str(self._tok.bos_token or "")
            self._template = (
                None if self.folder.chat_template else builtin_template(self.model_type, self._has_token)
            )
            turn = self._template.end_of_turn if self._template is not None else ()
            self._turn_ids = tuple(int(self._tok.convert_tokens_to_ids(t)) for t in turn)
        except BaseException as exc:
            self._closed.set()  # a model that never was: free now, and no "not closed" warning
            self._free()
            if isinstance(exc, ModelLoadError) or not isinstance(exc, Exception):
                raise
            # vLLM validates its settings with pydantic (ValueErrors) and in its engine
            # process: either way a setting it refuses, with its own reason.
            reason = getattr(exc, "child_reason", "") or f"{type(exc).__name__}: {exc}{_root_cause(exc)}"
            raise ModelLoadError(
                f"{self.path}: vLLM {vllm.__version__} refused the model or its settings: {reason}", self.path
            ) from exc

    async def _start(self, kw: dict[str, Any], bind: str | None) -> None:
        """Make the engine on the engine loop (its output handler task lives there)."""
        try:
            args = AsyncEngineArgs(**kw)
        except TypeError as exc:  # an unknown AsyncEngineArgs field: vLLM's own words
            raise ModelLoadError(f"{self.path}: vLLM refused an engine argument: {exc}", self.path) from exc
        taps: list[_SchedulerTap] = []

        def tap(vllm_config: Any, engine_index: int = 0) -> _SchedulerTap:
            made = _SchedulerTap(vllm_config, engine_index)
            taps.append(made)
            return made

        with _ENV_LOCK:  # the spawned engine and workers read these when they start
            saved = {name: os.environ.get(name) for name in _SPAWN_ENV}
            if bind is not None:
                os.environ["VLLM_CPU_OMP_THREADS_BIND"] = bind
            if saved["VLLM_RPC_BASE_PATH"] is None:
                # vLLM names its ZeroMQ sockets ipc://<temp folder>/<uuid4> and never unlinks
                # them: a few per load, hundreds in /tmp after a day of tests. Every address is
                # made while the engine starts (here, or in the processes spawned here), so a
                # folder of this model's own, removed at close, keeps them all.
                self._rpc_dir = tempfile.mkdtemp(prefix="core-inference-vllm-")
                os.environ["VLLM_RPC_BASE_PATH"] = self._rpc_dir
            tee = StderrTee()
            try:
                with tee:
                    self._engine = AsyncLLM.from_engine_args(args, stat_loggers=[tap])
            except Exception as exc:
                # The engine process's failure is written to its stderr; only "see above" comes back
                exc.child_reason = tee.reason()  # type: ignore[attr-defined]
                raise
            finally:
                for name, value in saved.items():
                    if value is None:
                        os.environ.pop(name, None)
                    else:
                        os.environ[name] = value
        self._tap = taps[0] if taps else None

    def _has_token(self, text: str) -> bool:
        return text in self._tok.get_vocab()

    # -- prompts and templates ---------------------------------------------------------

    def _render_chat(self, messages: list[Message]) -> str:
        source = self.folder.chat_template
        if source:
            return render_jinja(source, messages, self._bos_text, str(self._tok.eos_token or ""))
        if self._template is None:
            raise no_template_error(self.path, self.model_type)
        return str(self._template.render(messages))

    def _tokenize(self, text: str) -> list[int]:
        """The prompt's tokens; the tokenizer's BOS is added unless the text begins with it."""
        bos = self._bos_text
        add = not (bos and text.startswith(bos))
        return [int(i) for i in self._tok(text, add_special_tokens=add)["input_ids"]]

    def _detokenize(self, ids: Sequence[int]) -> str:
        return str(self._tok.decode(list(ids), skip_special_tokens=True))

    def _prompt_tokens(self, text: str) -> list[int]:
        tokens = self._tokenize(text)
        if not tokens:
            raise ValueError("prompt: no tokens to decode (an empty prompt, and the tokenizer adds no BOS)")
        if len(tokens) + 1 > self.context_len:
            raise ContextLengthExceeded(len(tokens), self.context_len)
        return tokens

    # -- the raw streams -----------------------------------------------------------

    def _params(self, cfg: GenerateConfig, prompt_len: int, stop_ids: Sequence[int] = (),
                **extra: Any) -> Any:
        """vLLM's ``SamplingParams`` for one request: every option, deltas, no text stops.

        Stop strings and the caller's stop ids are matched by our ``TokenFinisher`` (which
        then closes the stream, aborting the request); ``stop_ids`` here are a chat
        template's end-of-turn tokens, which end the answer as the end-of-text token does.
        """
        room = max(self.context_len - prompt_len, 1)
        return SamplingParams(
            n=1,
            max_tokens=max(1, min(cfg.max_tokens, room)),
            temperature=cfg.temperature,
            top_k=cfg.top_k,  # 0 is off in vLLM too
            top_p=cfg.top_p or 1.0,
            repetition_penalty=cfg.repeat_penalty or 1.0,
            seed=None if cfg.seed is None else engine_seed(cfg.seed),
            stop_token_ids=list(stop_ids),
            output_kind=RequestOutputKind.DELTA,
            skip_special_tokens=True,
            **extra,
        )

    def _aengine_generate(
        self, prompt: str, cfg: GenerateConfig, ctx: Context, rec: MetricsRecorder
    ) -> AsyncGenerator[Piece, None]:
        return self._astream(self._prompt_tokens(prompt), cfg, rec, ())

    def _aengine_chat(
        self, prepared: Any, cfg: GenerateConfig, ctx: Context, rec: MetricsRecorder
    ) -> AsyncGenerator[Piece, None]:
        return self._astream(self._prompt_tokens(prepared), cfg, rec, self._turn_ids)

    def _live(self) -> Any:
        engine = self._engine
        if engine is None:
            raise EngineError("the vllm backend's engine is not running")
        return engine

    async def _astream(self, ids: list[int], cfg: GenerateConfig, rec: MetricsRecorder,
                       stop_ids: Sequence[int],
                       logits: list[np.ndarray[Any, Any]] | None = None) -> AsyncGenerator[Piece, None]:
        """One vLLM request's new tokens, as each ``RequestOutput`` delta brings them.

        With ``logits`` (a list to fill), the request also asks for every token's raw logit
        at each position (``logprobs=-1``), and each position's row is appended as a numpy
        float32 array of the vocabulary's size. vLLM then leaves its text to us
        (``detokenize=False``): it would otherwise turn all the vocabulary's ids into text
        for every position.
        """
        engine = self._live()
        texts = self._texts(ids)
        extra: dict[str, Any] = {} if logits is None else {"logprobs": -1, "flat_logprobs": True}
        if logits is not None or texts is not None:
            # each id's text is made here (``texts``): vLLM's own detokenizing of the same ids,
            # in the front end beside ours, would only cost time
            extra["detokenize"] = False
        params = self._params(cfg, len(ids), stop_ids, **extra)
        rid = f"ci-{next(_SEQ)}-{uuid.uuid4().hex[:8]}"
        done = False
        seen = 0
        tail = ids[-_TAIL:]  # the last ids before each delta, for the text of merged ones
        try:
            async with contextlib.aclosing(engine.generate({"prompt_token_ids": ids}, params, rid)) as outs:
                async for out in outs:
                    if not seen:
                        rec.prefill_done(len(ids))
                    comp = out.outputs[0]
                    tids = list(comp.token_ids)
                    text = comp.text
                    if out.finished:
                        done = True
                        if comp.finish_reason == "stop" and not isinstance(comp.stop_reason, str) and tids:
                            tids.pop()  # the end-of-text (or end-of-turn) token ends the stream unseen
                        elif comp.finish_reason == "length" and seen + len(tids) < cfg.max_tokens:
                            rec.finish_reason = "context_full"
                        elif comp.finish_reason not in ("stop", "length"):
                            raise EngineError(
                                f"vLLM ended the request: {comp.finish_reason} ({comp.stop_reason})")
                    _engine_times(out.metrics, rec)
                    if logits is not None and comp.logprobs is not None:
                        logits.extend(self._rows(comp.logprobs))
                    seen += len(tids)
                    # A consumer slower than the engine gets several ids in one delta (vLLM merges
                    # them): each gets its own text, as it would have one at a time
                    if texts is not None:
                        pieces = [texts(t) for t in tids]
                    elif params.detokenize:
                        pieces = [text] if len(tids) == 1 else self._split(tail, tids, text)
                    else:  # vLLM made no text: each id's from decoding it after the ids before it
                        pieces = self._split(tail, tids, None)
                    tail = (tail + tids)[-_TAIL:]
                    for tid, piece in zip(tids, pieces, strict=True):
                        yield int(tid), piece
        finally:
            if not done:  # closing vLLM's generator aborts already; this covers a start cut short
                with contextlib.suppress(Exception):
                    await engine.abort(rid)

    def _texts(self, prompt: list[int]) -> Callable[[int], str] | None:
        """Each generated id's text, one id at a time, as vLLM's own detokenizer makes it
        (a ``tokenizers`` ``DecodeStream`` primed with the prompt), whether vLLM's deltas
        carried it alone or merged; None for a tokenizer without a fast backend."""
        raw = getattr(self._tok, "_tokenizer", None)
        if raw is None:
            return None
        try:
            from tokenizers import Tokenizer
            from tokenizers.decoders import DecodeStream
        except ImportError:
            return None
        if not isinstance(raw, Tokenizer):
            return None
        state = [DecodeStream(ids=prompt, skip_special_tokens=True)]

        def step(tid: int) -> str:
            try:
                return state[0].step(raw, tid) or ""
            except Exception:  # vLLM's own recovery: a fresh stream (tokenizers#17448's invalid prefix)
                state[0] = DecodeStream(skip_special_tokens=True)
                return state[0].step(raw, tid) or ""

        return step

    def _split(self, tail: list[int], tids: list[int], text: str | None) -> list[str]:
        """Each id's text in a merged delta: what decoding one more id adds, a character
        split across ids going with the id that completes it (as vLLM's own detokenizer
        does). Where the parts do not add up to vLLM's text, all of it goes with the last id
        (``text`` None: vLLM made none, and the delta's decoded text goes there)."""
        def upto(k: int) -> str:
            return str(self._tok.decode(tail + tids[:k], skip_special_tokens=True)).rstrip("\ufffd")

        base = upto(0)
        out: list[str] = []
        prev = base
        for k in range(1, len(tids) + 1):
            cur = upto(k)
            if not cur.startswith(prev):
                break
            out.append(cur[len(prev):])
            prev = cur
        if len(out) == len(tids) and (text is None or "".join(out) == text):
            return out
        if text is None:
            text = str(self._tok.decode(tids, skip_special_tokens=True))
        return [""] * (len(tids) - 1) + [text]

    def _rows(self, flat: Any) -> list[np.ndarray[Any, Any]]:
        """Each position's logits, dense over the vocabulary, from vLLM's ``FlatLogprobs``
        (per position: the sampled id first, then every id of the vocabulary by rank)."""
        rows = []
        for start, end in zip(flat.start_indices, flat.end_indices, strict=True):
            ids = np.asarray(flat.token_ids[start:end], dtype=np.int64)
            vals = np.asarray(flat.logprobs[start:end], dtype=np.float32)  # float32 on the worker: exact
            size = max(int(self.folder.vocab_size or 0), int(ids.max()) + 1 if ids.size else 0)
            row = np.full(size, -np.inf, dtype=np.float32)
            row[ids] = vals
            rows.append(row)
        return rows

    # -- classify and batch: every prompt's request added at once ---------------------

    def _classify(
        self, prompts: list[str], cfg: GenerateConfig, ctx: Context, rec: MetricsRecorder
    ) -> list[ClassifyResult]:
        if cfg.return_logits and not self._logits:
            raise ValueError(
                "return_logits: this vllm model was loaded with engine_args that override "
                f"logprobs_mode={LOGITS_MODE!r} or max_logprobs=-1, which classify's logits need "
                "(capabilities.logits is False)")
        return self.engine_loop().run(self._aclassify(prompts, cfg, rec), ctx, self._closed)

    async def _aclassify(self, prompts: list[str], cfg: GenerateConfig,
                         rec: MetricsRecorder) -> list[ClassifyResult]:
        one_token = replace(cfg, max_tokens=1, stop=(), stop_tokens=())

        async def one(prompt: str) -> ClassifyResult:
            sub = MetricsRecorder()
            got: list[Piece] = []
            rows: list[np.ndarray[Any, Any]] | None = [] if cfg.return_logits else None
            try:
                ids = self._prompt_tokens(prompt)
                async for piece in self._astream(ids, one_token, sub, (), rows):
                    got.append(piece)
                if rows is not None and not rows:
                    raise EngineError("vLLM returned no logits for a request that asked for them")
            except Exception as exc:
                return ClassifyResult(Token(-1, ""), err=self._mapped(exc), metrics=sub.finish())
            tid, text = got[-1] if got else (-1, "")
            sub.generated_tokens = 1
            sub.first_token = sub.end = time.perf_counter()
            rec.prompt_tokens += sub.prompt_tokens
            rec.generated_tokens += 1
            row: Any = rows[-1] if rows else None  # a float32 array, as the other backends give
            return ClassifyResult(Token(tid, str(text)), row, sub.prompt_tokens, sub.finish())

        return list(await asyncio.gather(*(one(p) for p in prompts)))

    def _batch_generate(
        self, prompts: list[str], cfg: GenerateConfig, ctx: Context, rec: MetricsRecorder
    ) -> list[BatchResult]:
        return self.engine_loop().run(self._abatch(prompts, cfg, ctx, rec), ctx, self._closed)

    async def _abatch(self, prompts: list[str], cfg: GenerateConfig, ctx: Context,
                      rec: MetricsRecorder) -> list[BatchResult]:
        async def one(prompt: str) -> BatchResult:
            sub = MetricsRecorder()
            fin = TokenFinisher(cfg, sub)
            raw: AsyncGenerator[Piece, None] | None = None
            try:
                raw = self._astream(self._prompt_tokens(prompt), cfg, sub, ())
                tokens = tuple([t async for t in afinish_tokens(raw, cfg, ctx, sub, self._closed, fin)])
                return BatchResult(tokens, None, fin.finish_reason or "", fin.stop, sub.prompt_tokens,
                                   sub.finish())
            except Exception as exc:  # one bad prompt does not sink the batch
                if ctx.err() is not None or self._closed.is_set():
                    raise  # ... but a cancelled call or a closed model does
                return BatchResult(err=self._mapped(exc), finish_reason="error",
                                   prompt_tokens=sub.prompt_tokens, metrics=sub.finish())
            finally:
                if raw is not None:
                    await raw.aclose()
                rec.prompt_tokens += sub.prompt_tokens
                rec.generated_tokens += sub.generated_tokens
                rec.first_token = rec.first_token or sub.first_token

        return list(await asyncio.gather(*(one(p) for p in prompts)))

    # -- the engine's state --------------------------------------------------------

    def engine_stats(self) -> dict[str, int]:
        """The engine's own counts: requests running and waiting in its scheduler (as of its
        last reported step) and requests not yet finished in this process's front end."""
        tap = self._tap
        engine = self._engine
        return {
            "running": tap.running if tap is not None else 0,
            "waiting": tap.waiting if tap is not None else 0,
            "unfinished": int(engine.get_num_unfinished_requests()) if engine is not None else 0,
        }

    def running_history(self) -> list[int]:
        """The scheduler's running-request count at each engine step it reported (the last 1000)."""
        return list(self._tap.history) if self._tap is not None else []

    def clear_running_history(self) -> None:
        if self._tap is not None:
            self._tap.history.clear()

    # -- the rest ------------------------------------------------------------------

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(
            token_ids=True,
            logits=self._logits,
            classify="native",
            batch_generate="native",
            chat_template=bool(self.folder.chat_template) or self._template is not None,
            tokenize=True,
            parallel_slots=self._slots.size,
            async_engine=True,
        )

    def _describe(self) -> ModelInfo:
        f = self.folder
        return ModelInfo(architecture=self.model_type, vocab_size=f.vocab_size, num_layers=f.num_layers,
                         hidden_size=f.hidden_size, context_length=f.context_length,
                         quant_bits=f.quant_bits, quant_group=f.quant_group, quant_type=f.quantisation)

    def _map_engine_error(self, exc: Exception) -> InferenceError:
        return EngineError(f"vllm: {type(exc).__name__}: {exc}{_root_cause(exc)}")

    def _close_engine(self) -> None:
        """Shut the engine process (and, through it, every worker) down and wait for it."""
        engine, self._engine = self._engine, None
        try:
            if engine is not None:
                self._shutdown(engine)
        finally:
            rpc_dir, self._rpc_dir = self._rpc_dir, None
            if rpc_dir is not None:
                shutil.rmtree(rpc_dir, ignore_errors=True)

    def _shutdown(self, engine: Any) -> None:
        """Stop the engine from its own loop where that loop still runs, else from here."""

        async def shutdown() -> None:
            engine.shutdown(timeout=SHUTDOWN_TIMEOUT)

        loop = self._loop
        if loop is not None and not loop.loop.is_closed():
            with contextlib.suppress(Exception, concurrent.futures.TimeoutError):
                loop.submit(shutdown()).result(timeout=SHUTDOWN_TIMEOUT + 10)
                return
        with contextlib.suppress(Exception):
            engine.shutdown(timeout=SHUTDOWN_TIMEOUT)

    def __repr__(self) -> str:
        return f"<VllmModel {self.path!r} {self.engine_kw.get('tensor_parallel_size', 1)}-way>"


def _engine_times(stats: Any, rec: MetricsRecorder) -> None:
    """Prefill and decode time from vLLM's own request stats (engine-core timestamps)."""
    if stats is None:
        return
    scheduled = getattr(stats, "scheduled_ts", 0.0)
    first = getattr(stats, "first_token_ts", 0.0)
    last = getattr(stats, "last_token_ts", 0.0)
    if scheduled and first >= scheduled:
        rec.prefill_duration = first - scheduled
    if first and last >= first:
        rec.decode_duration = last - first
        rec.decoded_tokens = max(int(getattr(stats, "num_generation_tokens", 0)) - 1, 0)


def _root_cause(exc: BaseException) -> str:
    """The innermost cause's words, where vLLM chained one (its engine errors say 'see above')."""
    inner = exc
    seen = 0
    while (inner.__cause__ or inner.__context__) is not None and seen < 10:
        inner = inner.__cause__ or inner.__context__  # type: ignore[assignment]
        seen += 1
    return f" (cause: {type(inner).__name__}: {inner})" if inner is not exc else ""


__all__ = ["VllmModel", "engine_args"]
