"""``batch_generate`` and ``classify`` over a Ray cluster: one model replica per actor.

>>> from core_inference import distributed
>>> results = distributed.batch_generate(prompts, replicas=2, max_tokens=8)   # doctest: +SKIP

With no ``address`` a local cluster is started for the call and stopped after it; with an
``address`` (``"auto"``, ``"ray://head:10001"``, ``"head:6379"``) the call connects to that
cluster and leaves it running. Each replica is a Ray actor holding one loaded model (any
backend: what ``load_model`` loads on that node) and reserving ``threads`` CPUs (and
``gpus`` GPUs); prompts go out in chunks, one chunk per replica at a time, and results
come back in input order. A chunk whose replica dies is sent again to a replica that is
alive (the dead one is restarted by Ray and rejoins once its model is loaded again).

``Pool`` keeps the replicas loaded across calls; the module functions make one per call.
``batch_generate_unordered``/``classify_unordered`` yield ``(index, result)`` as chunks
finish. Everything here sees models only through the contract (``load_model`` and the
result per call); Ray is imported on first use, never by ``import core_inference``.
"""

from __future__ import annotations

import collections
import copyreg
import inspect
import itertools
import logging
import math
import os
import pickle
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from typing import Any, ParamSpec, TypeVar

from .context import Context
from .errors import BackendUnavailable, EngineError, InferenceError, ModelLoadError
from .memory import cpu_count
from .model import check_prompts
from .options import apply_generate_opts, apply_load_opts
from .progress import Bar, Progress, close, reporter
from .types import BatchResult, ClassifyResult, GenerateConfig, LoadConfig, Token

logger = logging.getLogger(__name__)

EXTRA = "ray"
MAX_CHUNK = 64  # the auto chunk size at most: llama.cpp decodes up to 64 prompts per step
CHUNKS_PER_REPLICA = 4  # the auto chunk size aims at this many chunks per replica (balance)
RESTARTS = 4  # Ray restarts a dead replica this many times; then the run goes on without it
SPLIT_AFTER = 2  # a chunk that lost its replica this often is retried prompt by prompt
GIVE_UP_AFTER = 3  # a single prompt that lost its replica this often fails alone (its err)
POLL = 0.1  # seconds between looks at the caller's Context while chunks run
REASK = 0.5  # seconds between readiness questions to a replica that Ray is restarting
SLOW_START = 60.0  # seconds after which replicas not yet ready are reported (a warning)

Result = TypeVar("Result", BatchResult, ClassifyResult)
_P = ParamSpec("_P")
_R = TypeVar("_R")
_GENERATE_FIELDS = frozenset(f.name for f in fields(GenerateConfig))
_LOAD_FIELDS = frozenset(f.name for f in fields(LoadConfig))


class RayUnavailable(BackendUnavailable):
    """Ray cannot be imported where ``core_inference.distributed`` runs."""

    def __init__(self, reason: str) -> None:
        InferenceError.__init__(
            self, f"core_inference.distributed needs Ray: {reason}; install it with: "
            f"pip install 'core-inference[{EXTRA}]'"
        )
        self.name, self.reason, self.extra = "ray", reason, EXTRA

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.reason,), self.__dict__)


def _ray() -> Any:
    """The ``ray`` module, or ``RayUnavailable`` chaining the import's own error."""
    try:
        import ray
    except ImportError as exc:
        raise RayUnavailable(f"cannot import ray ({exc})") from exc
    return ray


# -- errors that cross a process boundary ----------------------------------------------------


def _rebuild_error(cls: type[BaseException], args: tuple[Any, ...], state: dict[str, Any]) -> BaseException:
    """An exception of ``cls`` with ``args`` and attributes, made without calling ``__init__``."""
    exc = cls.__new__(cls, *args)
    exc.args = args
    exc.__dict__.update(state)
    return exc


def _reduce_error(exc: BaseException) -> tuple[Any, ...]:
    return (_rebuild_error, (type(exc), exc.args, dict(exc.__dict__)))


def _portable(exc: BaseException) -> BaseException:
    """``exc``, made to survive pickling (Ray sends results and errors between processes).

    Pickle rebuilds an exception by calling its class with ``args`` alone, which fails for
    classes whose ``__init__`` takes other arguments (``ContextLengthExceeded(requested,
    limit)``): for those, this process pickles them by attributes instead (``copyreg``; Ray's
    pickler reads the same table). What cannot be pickled at all becomes an ``EngineError``
    with its text.
    """
    for _ in range(2):
        try:
            pickle.loads(pickle.dumps(exc))
            return exc
        except Exception:
            copyreg.pickle(type(exc), _reduce_error)
    return EngineError(f"{type(exc).__name__}: {exc}")


def _portable_result(result: Result) -> Result:
    if result.err is None:
        return result
    return replace(result, err=_portable(result.err))


# -- the replica: one Ray actor, one loaded model -------------------------------------------------


class _Replica:
    """One model replica, living in a Ray actor process: loads the model once, runs chunks.

    The constructor never raises (Ray would restart an actor whose constructor fails, for
    ever): a load failure is kept and reported by ``ready``.
    """

    def __init__(self, path: str, default: bool, load_cfg: LoadConfig, engine_kw: dict[str, Any]) -> None:
        self._model: Any = None
        self._error: BaseException | None = None
        self._calls: dict[int, Context] = {}
        self._cancelled: set[int] = set()
        self._lock = threading.Lock()
        self._where = f"{socket.gethostname()} pid {os.getpid()}"
        try:
            from .registry import load_model

            if default and not os.path.exists(path):  # another node: its own copy of the default model
                from .default_model import default_model_path

                path = str(default_model_path(progress=False))
            self._model = load_model(path, load_cfg, **engine_kw)
        except Exception as exc:
            self._error = _portable(exc)

    def ready(self) -> tuple[str, Any, str]:
        """("ok", model type, where) or ("error", the load failure, where)."""
        if self._error is not None:
            return ("error", self._error, self._where)
        return ("ok", str(getattr(self._model, "model_type", "")), self._where)

    def run(
        self, call: int, kind: str, prompts: list[str], cfg: GenerateConfig, timeout: float | None
    ) -> tuple[str, Any, str]:
        """("ok", results) or ("error", what ended the whole chunk); ``timeout``: seconds left."""
        base = Context.background()
        ctx = base.with_cancel() if timeout is None else base.with_timeout(timeout)
        with self._lock:
            if call in self._cancelled:
                self._cancelled.discard(call)
                ctx.cancel()
            self._calls[call] = ctx
        try:
            if self._model is None:
                raise EngineError(f"the replica has no model: {self._error}")
            if kind == "classify":
                out: list[Any] = self._model.classify(prompts, cfg, ctx=ctx)
            else:
                out = self._model.batch_generate(prompts, cfg, ctx=ctx)
            return ("ok", [_portable_result(r) for r in out], self._where)
        except Exception as exc:
            return ("error", _portable(exc), self._where)
        finally:
            with self._lock:
                self._calls.pop(call, None)

    def cancel(self, call: int) -> None:
        """Cancel chunk ``call`` (running, or not yet started: it then ends at once)."""
        with self._lock:
            ctx = self._calls.get(call)
            if ctx is not None:
                ctx.cancel()
            else:
                self._cancelled.add(call)

    def close(self) -> None:
        """Free the model before the actor is killed."""
        if self._model is not None:
            self._model.close()


# -- the cluster ----------------------------------------------------------------------------


def _short_temp_root() -> str | None:
    """Where a local cluster's session folder goes: Ray's socket paths must stay under 108 bytes."""
    explicit = os.environ.get("RAY_TMPDIR")
    if explicit:
        return explicit
    return "/tmp" if os.name == "posix" and os.path.isdir("/tmp") else None


@contextmanager
def local_cluster(
    num_cpus: int | None = None, num_gpus: int | None = None, **init_options: Any
) -> Iterator[Any]:
    """Start a Ray cluster on this machine, yield the ``ray`` module, stop it and remove its files.

    Its session files go to a folder of their own (removed afterwards), not Ray's shared
    ``/tmp/ray``; the dashboard is off and workers' output is not copied to this process
    (pass ``log_to_driver=True`` to see it). ``init_options`` go to ``ray.init``.
    """
    ray = _ray()
    if ray.is_initialized():
        raise RuntimeError("Ray is already initialised in this process; use that cluster (address=None)")
    temp = tempfile.mkdtemp(prefix="ray-", dir=_short_temp_root())
    options: dict[str, Any] = {
        "include_dashboard": False, "log_to_driver": False, "logging_level": logging.WARNING,
        "_temp_dir": temp,
    }
    options.update(init_options)
    try:
        ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, **options)
        yield ray
    finally:
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


@contextmanager
def _connected(
    address: str | None, num_cpus: int, num_gpus: int, init_options: Mapping[str, Any]
) -> Iterator[Any]:
    """Ray, connected: the current connection, ``address``'s cluster, or a local one of our own."""
    ray = _ray()
    if ray.is_initialized():  # the caller's own connection: used and left as it is
        yield ray
    elif address is None:
        with local_cluster(num_cpus, num_gpus or None, **init_options) as ray:
            yield ray
    else:
        options = {"logging_level": logging.WARNING, **init_options}
        ray.init(address=address, **options)
        try:
            yield ray
        finally:
            ray.shutdown()  # disconnects this driver; the cluster keeps running


# -- options --------------------------------------------------------------------------------


def _split_options(
    opts: Sequence[Any], generate_options: Mapping[str, Any], load_options: Mapping[str, Any],
    backend: str, threads: int,
) -> tuple[GenerateConfig, LoadConfig, dict[str, Any]]:
    """Positional options sorted into generate and load options (by the fields they set)."""
    gen: list[Any] = []
    load: list[Any] = []
    for opt in opts:
        if isinstance(opt, GenerateConfig):
            gen.append(opt)
        elif isinstance(opt, LoadConfig):
            load.append(opt)
        elif callable(opt):
            probe: dict[str, Any] = {}
            opt(probe)
            (load if probe and set(probe) <= _LOAD_FIELDS else gen).append(opt)
        else:
            raise TypeError(f"expected an option, a GenerateConfig or a LoadConfig, got {type(opt).__name__}")
    cfg = apply_generate_opts(gen, **generate_options)
    load_kw = {k: v for k, v in load_options.items() if k in _LOAD_FIELDS}
    engine_kw = {k: v for k, v in load_options.items() if k not in _LOAD_FIELDS}
    if backend:
        load_kw["backend"] = backend
    load_kw["threads"] = threads
    return cfg, apply_load_opts(load, **load_kw), engine_kw


# -- progress -------------------------------------------------------------------------------


def _prompts(done: int, total: int, seconds: float) -> str:
    return f"{done}/{total} prompts ({done / max(seconds, 1e-9):.1f}/s)"


def _reporter(progress: bool | Progress, what: str) -> Progress:
    return reporter(progress, lambda: Bar(what, _prompts, every=10))


# -- the pool -------------------------------------------------------------------------------


@dataclass
class _Chunk:
    indices: list[int]
    attempts: int = 0


@dataclass
class _Member:
    number: int
    actor: Any
    where: str = ""


_calls = itertools.count(1)


class Pool:
    """Model replicas on a Ray cluster, loaded once and used by many calls.

    >>> with distributed.Pool(replicas=2) as pool:                     # doctest: +SKIP
    ...     texts = [r.text for r in pool.batch_generate(prompts, max_tokens=8)]

    ``model``: a path or URL that every node can load (None: the default model, found on
    each node). ``replicas``: actors, each with one model and ``threads`` CPUs (0: one per
    ``threads`` CPUs of the cluster). ``gpus``: GPUs per replica. ``backend``/``load_options``
    and load options among ``opts`` go to ``load_model`` on every replica. No ``address``:
    a local cluster, started here and stopped by ``close()``; an address: that cluster,
    left running. Raises ``ModelLoadError`` with the replica's reason when a replica cannot
    load the model. One call at a time per pool.
    """

    def __init__(
        self,
        model: str | os.PathLike[str] | None = None,
        *opts: Any,
        replicas: int = 0,
        threads: int = 1,
        gpus: float = 0,
        backend: str = "",
        address: str | None = None,
        load_options: Mapping[str, Any] | None = None,
        init_options: Mapping[str, Any] | None = None,
        ctx: Context | None = None,
    ) -> None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads: must be an int >= 1, got {threads!r}")
        if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 0:
            raise ValueError(f"replicas: must be an int >= 0, got {replicas!r}")
        if gpus < 0:
            raise ValueError(f"gpus: must be >= 0, got {gpus!r}")
        _ray()  # a missing Ray is the first thing to say
        _, self._load_cfg, self._engine_kw = _split_options(opts, {}, load_options or {}, backend, threads)
        if any(not isinstance(o, LoadConfig) and not _sets_load(o) for o in opts):
            raise TypeError("Pool takes load options only; give generate options to its calls")
        self._default = model is None
        if model is None:
            from .default_model import default_model_path

            model = default_model_path(progress=False)
        self.model = os.fspath(model)
        self.threads, self.gpus = threads, gpus
        self._lock = threading.Lock()
        self._members: list[_Member] = []
        self._closed = False
        ctx = ctx or Context.background()
        wanted = replicas or max(1, cpu_count() // threads)
        self._cluster = _connected(address, wanted * threads, math.ceil(wanted * gpus), init_options or {})
        self._ray = self._cluster.__enter__()
        try:
            self.replicas = replicas or self._fitting()
            self._check_room()
            self._start(ctx)
        except BaseException:
            self.close()
            raise

    # -- set-up and teardown

    def _fitting(self) -> int:
        """Replicas that fit the cluster's CPUs (and GPUs) at ``threads`` (and ``gpus``) each."""
        total = self._ray.cluster_resources()
        fit = int(total.get("CPU", 0)) // self.threads
        if self.gpus:
            fit = min(fit, int(total.get("GPU", 0) // self.gpus))
        return max(1, fit)

    def _check_room(self) -> None:
        """Refuse replicas the cluster can never place (they would wait for ever)."""
        total = self._ray.cluster_resources()
        need_cpu, need_gpu = self.replicas * self.threads, self.replicas * self.gpus
        if total.get("CPU", 0) < need_cpu or total.get("GPU", 0) < need_gpu:
            raise ValueError(
                f"{self.replicas} replicas x {self.threads} threads"
                + (f" x {self.gpus} GPUs" if self.gpus else "")
                + f" need {need_cpu} CPUs{f' and {need_gpu:g} GPUs' if self.gpus else ''}; the cluster has "
                f"{total.get('CPU', 0):g} CPUs and {total.get('GPU', 0):g} GPUs"
            )

    def _start(self, ctx: Context) -> None:
        ray = self._ray
        actor_class = ray.remote(_Replica).options(
            num_cpus=self.threads, num_gpus=self.gpus, max_restarts=RESTARTS, max_task_retries=0,
            max_concurrency=2,  # run and cancel: a chunk is cancelled while it runs
            scheduling_strategy="SPREAD",  # replicas on as many nodes as the cluster has
        )
        for i in range(self.replicas):
            actor = actor_class.remote(self.model, self._default, self._load_cfg, self._engine_kw)
            self._members.append(_Member(i, actor))
        waiting = {m.actor.ready.remote(): m for m in self._members}
        began, warned = time.monotonic(), False
        while waiting:
            err = ctx.err()
            if err is not None:
                raise type(err)(f"{err} while the replicas were loading the model")
            if not warned and time.monotonic() - began > SLOW_START:
                warned = True  # Ray waits for free resources without a word: say it
                logger.warning(
                    "%d of %d replicas not ready after %.0f s: still loading, or waiting for %d free "
                    "CPUs%s on the cluster", len(waiting), self.replicas, SLOW_START, self.threads,
                    f" and {self.gpus:g} GPUs" if self.gpus else "",
                )
            done, _ = ray.wait(list(waiting), num_returns=1, timeout=POLL)
            for ref in done:
                member = waiting.pop(ref)
                try:
                    status, value, member.where = ray.get(ref)
                except ray.exceptions.RayError as exc:
                    raise ModelLoadError(
                        f"replica {member.number} of {self.replicas} died while loading {self.model}: {exc}",
                        path=self.model,
                    ) from exc
                if status != "ok":
                    raise self._load_error(member, value) from value

    def _load_error(self, member: _Member, exc: BaseException) -> ModelLoadError:
        return ModelLoadError(
            f"replica {member.number} of {self.replicas} ({member.where}) could not load {self.model}: "
            f"{type(exc).__name__}: {exc}",
            path=getattr(exc, "path", None) or self.model,
        )

    @property
    def actors(self) -> tuple[Any, ...]:
        """The replicas' Ray actor handles (to inspect them, or to kill one in a test)."""
        return tuple(m.actor for m in self._members)

    def close(self) -> None:
        """Kill the replicas and, when this pool started it, stop the local cluster; idempotent."""
        if self._closed:
            return
        self._closed = True
        ray = getattr(self, "_ray", None)
        if ray is not None:
            for m in self._members:
                try:
                    ray.kill(m.actor, no_restart=True)
                except Exception:  # already dead, or the cluster is gone: nothing to free
                    logger.debug("replica %d: kill failed", m.number, exc_info=True)
            self._members.clear()
            self._cluster.__exit__(None, None, None)

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self._members)} replicas x {self.threads} threads"
        return f"<distributed.Pool {self.model!r} {state}>"

    # -- calls

    def batch_generate(
        self, prompts: Sequence[str], *opts: Any, chunk_size: int = 0, progress: bool | Progress = True,
        ctx: Context | None = None, **generate_options: Any,
    ) -> list[BatchResult]:
        """``batch_generate`` over the replicas; results in input order, one per prompt."""
        stream = self.batch_generate_unordered(
            prompts, *opts, chunk_size=chunk_size, progress=progress, ctx=ctx, **generate_options
        )
        return _in_order(stream, len(prompts))

    def classify(
        self, prompts: Sequence[str], *opts: Any, chunk_size: int = 0, progress: bool | Progress = True,
        ctx: Context | None = None, **generate_options: Any,
    ) -> list[ClassifyResult]:
        """``classify`` over the replicas; results in input order, one per prompt."""
        stream = self.classify_unordered(
            prompts, *opts, chunk_size=chunk_size, progress=progress, ctx=ctx, **generate_options
        )
        return _in_order(stream, len(prompts))

    def batch_generate_unordered(
        self, prompts: Sequence[str], *opts: Any, chunk_size: int = 0, progress: bool | Progress = True,
        ctx: Context | None = None, **generate_options: Any,
    ) -> Iterator[tuple[int, BatchResult]]:
        """``(index, BatchResult)`` for every prompt, as chunks finish (each index once)."""
        cfg = apply_generate_opts(opts, **generate_options)
        return self._run("batch_generate", check_prompts(prompts), cfg, chunk_size, progress, ctx)

    def classify_unordered(
        self, prompts: Sequence[str], *opts: Any, chunk_size: int = 0, progress: bool | Progress = True,
        ctx: Context | None = None, **generate_options: Any,
    ) -> Iterator[tuple[int, ClassifyResult]]:
        """``(index, ClassifyResult)`` for every prompt, as chunks finish (each index once)."""
        cfg = apply_generate_opts(opts, **generate_options)
        return self._run("classify", check_prompts(prompts), cfg, chunk_size, progress, ctx)

    def _run(
        self, kind: str, prompts: list[str], cfg: GenerateConfig, chunk_size: int,
        progress: bool | Progress, ctx: Context | None,
    ) -> Iterator[tuple[int, Any]]:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 0:
            raise ValueError(f"chunk_size: must be an int >= 0, got {chunk_size!r}")
        if self._closed:
            raise RuntimeError("the pool is closed")
        size = chunk_size or _auto_chunk(len(prompts), len(self._members))
        chunks = [_Chunk(list(range(i, min(i + size, len(prompts))))) for i in range(0, len(prompts), size)]
        report = _reporter(progress, f"{kind} on {len(self._members)} replicas")
        return self._drive(kind, prompts, cfg, chunks, report, ctx or Context.background())

    def _drive(
        self, kind: str, prompts: list[str], cfg: GenerateConfig, chunks: list[_Chunk],
        report: Progress, ctx: Context,
    ) -> Iterator[tuple[int, Any]]:
        """Hand chunks to idle replicas, collect what finishes, re-send what a dead replica lost."""
        if not self._lock.acquire(blocking=False):
            raise RuntimeError("this pool is already running a call (one call at a time per pool)")
        ray = self._ray
        pending = collections.deque(chunks)
        idle = list(self._members)
        running: dict[Any, tuple[_Member, _Chunk, int]] = {}
        returning: dict[Any, _Member] = {}  # replicas restarting after a death: their ready() calls
        resting: list[tuple[float, _Member]] = []  # restarting replicas to ask again, and when
        total, done = len(prompts), 0
        try:
            report(0, total)
            while pending or running:
                err = ctx.err()
                if err is not None:
                    raise type(err)(str(err))
                while pending and idle:
                    self._send(kind, prompts, cfg, pending.popleft(), idle.pop(0), running, ctx)
                now = time.monotonic()
                for entry in [e for e in resting if e[0] <= now]:
                    resting.remove(entry)
                    returning[entry[1].actor.ready.remote()] = entry[1]
                if not running and not returning and not resting:
                    raise EngineError(f"every replica of the pool has died; {len(pending)} chunks left")
                waiting = [*running, *returning]
                if not waiting:
                    time.sleep(POLL)
                    continue
                ready, _ = ray.wait(waiting, num_returns=1, timeout=POLL)
                for ref in ready:
                    if ref in returning:
                        self._rejoined(returning.pop(ref), ref, idle, resting)
                        continue
                    member, chunk, _call = running.pop(ref)
                    try:
                        status, value, member.where = ray.get(ref)
                    except (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError) as exc:
                        # the replica (or its node) died: the chunk goes again
                        self._lost(member, chunk, exc, pending, returning)
                        for index, result in self._given_up(kind, chunk, pending):
                            done += 1
                            report(done, total)
                            yield index, result
                        continue
                    if status != "ok":  # the whole chunk failed (as model.batch_generate raises)
                        ended = ctx.err()
                        if ended is not None:
                            raise type(ended)(str(ended)) from value
                        _note(value, f"raised on replica {member.number} ({member.where})")
                        raise value
                    idle.append(member)
                    if pending:  # keep the replica busy while the caller reads these results
                        self._send(kind, prompts, cfg, pending.popleft(), idle.pop(), running, ctx)
                    report(done + len(chunk.indices), total)
                    for index, result in zip(chunk.indices, value, strict=True):
                        done += 1
                        yield index, result
        finally:
            for member, _chunk, call in running.values():  # closed early, failed or cancelled
                try:
                    member.actor.cancel.remote(call)
                except Exception:
                    logger.debug("replica %d: cancel failed", member.number, exc_info=True)
            close(report)  # a bar left mid-line by a failure or a cancel: the error starts a new line
            self._lock.release()

    def _send(
        self, kind: str, prompts: list[str], cfg: GenerateConfig, chunk: _Chunk, member: _Member,
        running: dict[Any, tuple[_Member, _Chunk, int]], ctx: Context,
    ) -> None:
        call = next(_calls)
        timeout = None if ctx.deadline is None else max(0.0, ctx.deadline - time.monotonic())
        texts = [prompts[i] for i in chunk.indices]
        ref = member.actor.run.remote(call, kind, texts, cfg, timeout)
        running[ref] = (member, chunk, call)

    def _lost(
        self, member: _Member, chunk: _Chunk, exc: BaseException, pending: collections.deque[_Chunk],
        returning: dict[Any, _Member],
    ) -> None:
        chunk.attempts += 1
        logger.warning(
            "replica %d (%s) died running a chunk of %d prompts (%s); the chunk is sent again",
            member.number, member.where, len(chunk.indices), type(exc).__name__,
        )
        if chunk.attempts >= SPLIT_AFTER and len(chunk.indices) > 1:  # find the prompt that kills them
            pending.extendleft(_Chunk([i], chunk.attempts) for i in reversed(chunk.indices))
        else:
            pending.appendleft(chunk)
        returning[member.actor.ready.remote()] = member  # Ray restarts it; it rejoins once loaded

    def _given_up(
        self, kind: str, chunk: _Chunk, pending: collections.deque[_Chunk]
    ) -> Iterator[tuple[int, Any]]:
        """A single prompt that has killed its replica too often fails on its own."""
        if len(chunk.indices) == 1 and chunk.attempts >= GIVE_UP_AFTER and pending and pending[0] is chunk:
            pending.popleft()
            index = chunk.indices[0]
            err = EngineError(f"prompt {index}: its replica died {chunk.attempts} times running it")
            if kind == "classify":
                yield chunk.indices[0], ClassifyResult(Token(-1, ""), err=err)
            else:
                yield chunk.indices[0], BatchResult(err=err, finish_reason="error")

    def _rejoined(
        self, member: _Member, ref: Any, idle: list[_Member], resting: list[tuple[float, _Member]]
    ) -> None:
        ray = self._ray
        try:
            status, value, member.where = ray.get(ref)
        except ray.exceptions.ActorUnavailableError:  # still restarting: ask again in a moment
            resting.append((time.monotonic() + REASK, member))
            return
        except ray.exceptions.RayError as exc:
            logger.warning("replica %d is gone for good (%s); the others go on", member.number, exc)
            self._members.remove(member)
            return
        if status != "ok":
            logger.warning("replica %d came back but cannot load the model (%s); the others go on",
                           member.number, value)
            self._members.remove(member)
            self._ray.kill(member.actor, no_restart=True)
            return
        logger.info("replica %d (%s) is back", member.number, member.where)
        idle.append(member)


def _note(exc: BaseException, note: str) -> None:
    add_note = getattr(exc, "add_note", None)  # Python 3.11+
    if add_note is not None:
        add_note(note)


def _sets_load(opt: Any) -> bool:
    if not callable(opt):
        return False
    probe: dict[str, Any] = {}
    opt(probe)
    return bool(probe) and set(probe) <= _LOAD_FIELDS


def _auto_chunk(n: int, replicas: int) -> int:
    """About ``CHUNKS_PER_REPLICA`` chunks per replica, at most ``MAX_CHUNK`` prompts each."""
    return max(1, min(MAX_CHUNK, math.ceil(n / max(1, replicas * CHUNKS_PER_REPLICA))))


def _in_order(stream: Iterator[tuple[int, Result]], n: int) -> list[Result]:
    out: list[Result | None] = [None] * n
    for index, result in stream:
        out[index] = result
    missing = [i for i, r in enumerate(out) if r is None]
    if missing:  # never expected: every chunk either returns or raises
        raise EngineError(f"no result came back for prompts {missing[:10]}")
    return [r for r in out if r is not None]


# -- one call, one pool --------------------------------------------------------------------


def _pool_args(
    opts: Sequence[Any], generate_options: dict[str, Any]
) -> tuple[list[Any], list[Any]]:
    """Positional options split into load options (for the pool) and generate options."""
    load = [o for o in opts if isinstance(o, LoadConfig) or _sets_load(o)]
    gen = [o for o in opts if not (isinstance(o, LoadConfig) or _sets_load(o))]
    return load, gen


def _one_call(
    prompts: Sequence[str],
    *opts: Any,
    model: str | os.PathLike[str] | None = None,
    replicas: int = 0,
    threads: int = 1,
    gpus: float = 0,
    backend: str = "",
    address: str | None = None,
    chunk_size: int = 0,
    progress: bool | Progress = True,
    ctx: Context | None = None,
    load_options: Mapping[str, Any] | None = None,
    init_options: Mapping[str, Any] | None = None,
    **generate_options: Any,
) -> None:
    """The parameters of the module's four calls, written once: the prompts, options (load
    options go to the pool, the rest to the calls), ``Pool``'s keywords, how the prompts are
    sent (``chunk_size``, ``progress``, ``ctx``), and generate options by name."""


_ONE_CALL = inspect.signature(_one_call)
_POOL_KEYWORDS = ("replicas", "threads", "gpus", "backend", "address", "load_options", "init_options", "ctx")


def _takes(template: Callable[_P, object]) -> Callable[[Callable[..., _R]], Callable[_P, _R]]:
    """Give a call ``template``'s parameters: for type checkers (``ParamSpec``) and for
    ``help()``/``inspect.signature`` (``__signature__``); the call binds them with ``_bound``."""
    shape = inspect.signature(template)

    def apply(func: Callable[..., _R]) -> Callable[_P, _R]:
        own = inspect.signature(func)
        func.__signature__ = shape.replace(return_annotation=own.return_annotation)  # type: ignore[attr-defined]
        return func

    return apply


@dataclass(frozen=True)
class _Call:
    """One module call's arguments, bound and checked before any cluster starts."""

    prompts: Sequence[str]
    cfg: GenerateConfig
    model: str | os.PathLike[str] | None
    load: list[Any]
    pool_kw: dict[str, Any]
    chunk_size: int
    progress: bool | Progress
    ctx: Context | None


def _bound(prompts: Sequence[str], opts: tuple[Any, ...], kw: dict[str, Any]) -> _Call:
    """Bind a call's arguments to ``_one_call``'s parameters (defaults included) and check the
    prompts and generate options here, before any cluster starts."""
    args = _ONE_CALL.bind(prompts, *opts, **kw)
    args.apply_defaults()
    a = args.arguments
    generate_options: dict[str, Any] = a["generate_options"]
    check_prompts(prompts)
    load, gen = _pool_args(opts, generate_options)
    cfg = apply_generate_opts(gen, **generate_options)
    return _Call(prompts, cfg, a["model"], load, {k: a[k] for k in _POOL_KEYWORDS}, a["chunk_size"],
                 a["progress"], a["ctx"])


def _pooled(kind: str, call: _Call) -> Iterator[tuple[int, Any]]:
    """A pool for this call alone: its results as chunks finish, then the pool closed."""
    with Pool(call.model, *call.load, **call.pool_kw) as pool:
        run = pool.classify_unordered if kind == "classify" else pool.batch_generate_unordered
        yield from run(call.prompts, call.cfg, chunk_size=call.chunk_size, progress=call.progress,
                       ctx=call.ctx)


@_takes(_one_call)
def batch_generate(prompts: Sequence[str], *opts: Any, **kw: Any) -> list[BatchResult]:
    """``batch_generate`` for every prompt over a Ray cluster; results in input order.

    ``replicas`` actors each load ``model`` (None: the default model) with ``threads``
    engine threads; chunks of ``chunk_size`` prompts (0: about four per replica, at most
    64 prompts) go to idle replicas. No ``address``: a local cluster for this call only.
    ``progress``: prompts done on stderr (or a callable ``(done, total)``). ``ctx``:
    cancellation and deadline (the seconds left go to the replicas).
    """
    return _in_order(_pooled("batch_generate", _bound(prompts, opts, kw)), len(prompts))


@_takes(_one_call)
def classify(prompts: Sequence[str], *opts: Any, **kw: Any) -> list[ClassifyResult]:
    """``classify`` for every prompt over a Ray cluster; results in input order (see ``batch_generate``)."""
    return _in_order(_pooled("classify", _bound(prompts, opts, kw)), len(prompts))


@_takes(_one_call)
def batch_generate_unordered(
    prompts: Sequence[str], *opts: Any, **kw: Any
) -> Iterator[tuple[int, BatchResult]]:
    """``(index, BatchResult)`` as chunks finish, each index once; the cluster lives while it runs.

    Leaving the loop early (or ``close()``) cancels the chunks still running and stops the
    replicas (and the local cluster, if one was started for it).
    """
    return _pooled("batch_generate", _bound(prompts, opts, kw))


@_takes(_one_call)
def classify_unordered(
    prompts: Sequence[str], *opts: Any, **kw: Any
) -> Iterator[tuple[int, ClassifyResult]]:
    """``(index, ClassifyResult)`` as chunks finish, each index once (see ``batch_generate_unordered``)."""
    return _pooled("classify", _bound(prompts, opts, kw))


__all__ = [
    "Pool", "RayUnavailable", "batch_generate", "batch_generate_unordered", "classify",
    "classify_unordered", "local_cluster",
]
