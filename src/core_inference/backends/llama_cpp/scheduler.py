"""Continuous batching: one thread per model decodes every active sequence together.

Each step runs, under the model's engine lock, one ``llama_decode`` per context that
carries the next token of every decoding sequence on it, then prefill chunks of the
sequences that are starting, up to a token budget, so that a long prompt costs the
others one chunk a step and never a whole prompt.

Greedy answers depend on how llama.cpp cuts a sequence's tokens into micro-batches
(a prompt prefilled in chunks of 128 gives logits up to ~1.0 away from the same prompt
in chunks of 512), so prompts are cut at fixed boundaries (multiples of the model's
``prefill_chunk``) whatever else runs, and a chunk never shares its ``llama_decode``
with another sequence's tokens unless they are first chunks of the same length (with a
non-unified KV cache llama.cpp gives each sequence of a micro-batch the same number of
tokens, so a shorter neighbour would cut the chunk in two), and only when that length is
a multiple of 4: llama.cpp's CPU matmuls take rows four at a time and the rows left over
one by one, which rounds differently, so a 6-token prompt beside another gives other
logits than alone while an 8-token one does not. A prompt thus prefills the same way
alone, in ``classify``, in ``batch_generate`` and beside other streams.

Imported only when the ``llama_cpp`` backend loads a model (it drives ``engine.py``).
"""

from __future__ import annotations

import atexit
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Any

from ...context import Context
from ...errors import ModelClosed
from .engine import Aborted

LOOKAHEAD = 8  # tokens a sequence may run ahead of its reader before it sits out steps
GROUP_CHUNK_MAX = 256  # first chunks up to this long may share a decode with equal ones
# Prefill decodes per step beside the decoding sequences' one: each reads all the weights,
# so a step of many short prompts' chunks would cost the decoding sequences as much as a long one.
PREFILL_CALLS = 2
POLL = 0.02  # seconds between a waiting caller's looks at its context


class Usage:
    """The engine time one call's sequences took: each step counted once per call."""

    __slots__ = ("decode", "prefill", "served")

    def __init__(self) -> None:
        self.prefill = 0.0
        self.decode = 0.0
        self.served = -1  # the last step that prefilled for this call (round-robin between calls)


class Job:
    """One sequence's work: prefill its prompt in fixed chunks, then decode token by token."""

    def __init__(
        self,
        lctx: Any,
        seq: int,
        prompt: list[int],
        sampler: Any,
        limit: int,
        stop: frozenset[int],
        usage: Usage,
        ctx: Context,
        want_logits: bool = False,
    ) -> None:
        self.lctx, self.seq, self.prompt, self.sampler = lctx, seq, prompt, sampler
        self.limit, self.stop, self.usage, self.ctx = limit, stop, usage, ctx
        self.want_logits = want_logits
        self.done = 0  # prompt tokens prefilled so far
        self.pos = 0  # where the pending token goes
        self.pending: int | None = None  # the last sampled token, fed in the next step
        self.produced = 0
        self.out: deque[int] = deque()  # sampled tokens the caller has not taken yet
        self.logits: Any = None
        self.first_at = 0.0  # when the first token was sampled
        self.finished = False  # no more tokens will come
        self.error: BaseException | None = None
        self.released = False

    def live(self) -> bool:
        return not (self.released or self.finished or self.error is not None or self.ctx.done())


class Scheduler:
    """Decodes the jobs of one model together; callers wait for their own job's tokens."""

    def __init__(self, model: Any, chunk: int, engine_lock: threading.Lock, closed: threading.Event) -> None:
        self._model = model  # the engine's Model (vocabulary), not the contract's model
        self.chunk = max(1, chunk)
        self._lock = engine_lock
        self._closed = closed
        self._cond = threading.Condition(threading.RLock())
        self._jobs: list[Job] = []
        self._armed: list[Job] = []  # the jobs of the prefill decode now running (abortable)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._freed = False
        self.steps = 0
        _live.add(self)

    # -- callers ------------------------------------------------------------------------

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._stopping:
                raise ModelClosed("model closed")
            self._jobs.append(job)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="core-inference llama.cpp batch",
                                                daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def release(self, job: Job) -> None:
        """Take a job out (finished, cancelled or failed): its sequence is cleared, its sampler freed.

        Waits for the running step (it may be using the job), so the sequence id is free
        for the next call once this returns.
        """
        if sys.is_finalizing():
            return  # interpreter exit: the thread may be frozen holding a lock; the process frees it all
        with self._lock:
            with self._cond:
                job.released = True
                if job in self._jobs:
                    self._jobs.remove(job)
                self._cond.notify_all()
            if not self._freed:
                job.lctx.clear_seq(job.seq)
            job.sampler.free()

    def next_token(self, job: Job) -> int | None:
        """The job's next sampled token, None once it has no more; raises if its call ended."""
        with self._cond:
            while True:
                if job.out:
                    if len(job.out) >= LOOKAHEAD:
                        self._cond.notify_all()  # the scheduler may decode this job again
                    return job.out.popleft()
                self._check(job)
                if job.finished:
                    return None
                self._cond.wait(POLL)

    def wait_any(self, jobs: Sequence[Job], ctx: Context) -> None:
        """Wait until one of ``jobs`` has a token, has finished or has failed."""
        with self._cond:
            while True:
                for job in jobs:
                    if job.out or job.finished or job.error is not None:
                        return
                    self._check(job)
                self._cond.wait(POLL)

    def take(self, job: Job) -> list[int]:
        """Every token the job has sampled that the caller has not taken yet."""
        with self._cond:
            out = list(job.out)
            job.out.clear()
            if len(out) >= LOOKAHEAD:
                self._cond.notify_all()
            return out

    def _check(self, job: Job) -> None:
        """Raise if the job's call ended or the model closed (stopping its running prefill); or its error."""
        if job.ctx.done() or self._closed.is_set():
            if job in self._armed and all(not a.live() or self._closed.is_set() for a in self._armed):
                job.lctx.abort()  # its prefill decode stops at the next graph node
            job.ctx.raise_if_done()
            raise ModelClosed("model closed during the call")
        if job.error is not None:
            raise job.error

    def stop_thread(self) -> None:
        """Stop the thread once its step is done (jobs stay; a new submit would start it again)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def shutdown(self) -> bool:
        """Stop the thread (called by close before the contexts are freed); False if it would not.

        At interpreter exit a daemon thread never runs again once it needs the GIL (and may
        hold a lock as it stops), so nothing is waited for: the caller must not free what it
        may be using, and the process frees it all.
        """
        if sys.is_finalizing():
            thread = self._thread
            if thread is not None and thread.is_alive():
                return False
        else:
            self.stop_thread()
        self._freed = True
        return True

    # -- the scheduler thread -------------------------------------------------------------

    def _runnable(self, job: Job) -> bool:
        if not job.live():
            return False
        return job.done < len(job.prompt) or (job.pending is not None and len(job.out) < LOOKAHEAD)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not any(map(self._runnable, self._jobs)):
                    if not self._jobs:
                        self._thread = None
                        return
                    self._cond.wait(0.05)
                if self._stopping:
                    self._thread = None
                    return
            with self._lock:
                if self._closed.is_set():  # callers see it and raise; the loop waits for their releases
                    with self._cond:
                        self._fail(self._jobs, ModelClosed("model closed during the call"))
                    continue
                self._step()
            with self._cond:
                self._cond.notify_all()

    def _step(self) -> None:
        """One step: every decoding job's next token, then prefill chunks within the budget."""
        self.steps += 1
        with self._cond:
            jobs = [j for j in self._jobs if self._runnable(j)]
        decoding: dict[int, list[Job]] = {}
        for j in jobs:
            if j.done >= len(j.prompt):
                decoding.setdefault(id(j.lctx), []).append(j)
        for group in decoding.values():
            self._decode(group)
        # Prefill: the call served longest ago goes first, then by arrival.
        waiting = sorted((j for j in jobs if j.done < len(j.prompt)), key=lambda j: j.usage.served)
        spent = calls = 0
        while waiting and spent < self.chunk and calls < PREFILL_CALLS:
            calls += 1
            first = waiting.pop(0)
            n = len(self._next_chunk(first))
            group = [first]
            if first.done == 0 and n <= GROUP_CHUNK_MAX and n % 4 == 0:
                room = min(self.chunk, first.lctx.n_batch) - spent
                for other in list(waiting):
                    if (n * (len(group) + 1) <= room and other.lctx is first.lctx and other.done == 0
                            and len(other.prompt) >= n and len(self._next_chunk(other)) == n):
                        group.append(other)
                        waiting.remove(other)
            self._prefill(group)
            spent += n * len(group)

    def _next_chunk(self, job: Job) -> list[int]:
        """The job's next prompt tokens, up to the next multiple of ``chunk`` (fixed boundaries)."""
        end = (job.done // self.chunk + 1) * self.chunk
        return job.prompt[job.done : min(end, job.done + job.lctx.n_batch)]

    def _decode(self, group: list[Job]) -> None:
        lctx = group[0].lctx
        batch = lctx.batch
        batch.clear()
        index = [batch.add(j.pending, j.pos, j.seq, True) for j in group]
        began = time.perf_counter()
        try:
            lctx.decode()
        except Exception as exc:  # a failed step fails the sequences in it, no others
            self._fail(group, exc)
            return
        finally:
            self._charge(group, "decode", time.perf_counter() - began)
        for j, i in zip(group, index, strict=True):
            j.pos += 1
            self._sample(j, i)

    def _prefill(self, group: list[Job]) -> None:
        lctx = group[0].lctx
        batch = lctx.batch
        batch.clear()
        lasts: list[tuple[Job, int]] = []
        sizes = []
        for j in group:
            chunk = self._next_chunk(j)
            sizes.append(len(chunk))
            end = len(j.prompt) - 1
            for k, t in enumerate(chunk):
                p = j.done + k
                i = batch.add(t, p, j.seq, p == end)
                if p == end:
                    lasts.append((j, i))
        with self._cond:
            self._armed = group
        began = time.perf_counter()
        try:
            lctx.decode()
        except Aborted as exc:
            self._fail(group, exc)
            return
        except Exception as exc:
            self._fail(group, exc)
            return
        finally:
            with self._cond:
                self._armed = []
                lctx.clear_abort()
            self._charge(group, "prefill", time.perf_counter() - began)
        for j, n in zip(group, sizes, strict=True):
            j.done += n
            j.usage.served = self.steps
        for j, i in lasts:
            j.pos = len(j.prompt)
            self._sample(j, i)

    def _sample(self, job: Job, index: int) -> None:
        try:
            tid = job.sampler.sample(job.lctx, index)
            if job.want_logits and job.logits is None:
                job.logits = job.lctx.logits(index, self._model.n_vocab)
        except Exception as exc:
            self._fail([job], exc)
            return
        with self._cond:
            job.out.append(tid)
            job.produced += 1
            job.first_at = job.first_at or time.perf_counter()
            if job.produced >= job.limit or tid in job.stop or self._model.is_eog(tid):
                job.finished, job.pending = True, None
            else:
                job.pending = tid

    def _fail(self, jobs: Iterable[Job], exc: BaseException) -> None:
        with self._cond:  # reentrant: _run calls it holding the condition
            for j in jobs:
                j.error = exc
                j.pending = None

    @staticmethod
    def _charge(group: list[Job], what: str, seconds: float) -> None:
        for usage in {id(j.usage): j.usage for j in group}.values():
            setattr(usage, what, getattr(usage, what) + seconds)


_live: weakref.WeakSet[Scheduler] = weakref.WeakSet()


def _stop_at_exit() -> None:
    """Stop every scheduler's thread before the interpreter finalizes.

    Daemon threads keep running C code while the process tears down; one inside
    ``llama_decode`` then meets llama.cpp's freed globals (a segfault at exit). At
    ``atexit`` they can still finish their step, so they are stopped there.
    """
    for sched in list(_live):
        sched.stop_thread()


atexit.register(_stop_at_exit)

__all__ = ["Job", "Scheduler", "Usage"]
