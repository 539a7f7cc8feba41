"""Continuous batching for the llama.cpp streams of one model: many callers, one decode per step.

There is no scheduler thread. A stream that needs its next token posts a ``Job`` and,
if no step is running, runs one itself for every job posted so far (the leader); the
others sleep until their job is done. The decodes themselves all run on the process's
one decode thread (``engine._DecodeThread``), whichever caller leads.

A step is: one ``llama_decode`` carrying the next token of every stream that is
generating, then prefill chunks of streams that are starting, up to a token budget,
each chunk its own decode. Keeping a prompt's chunks as decodes of their own, cut at
fixed positions, keeps a prompt's logits what they are when it runs alone (llama.cpp's
per-sequence cache gives every sequence of a micro-batch the same token count, so a
chunk packed beside others would be split where the others end).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from ...context import Context
from ...errors import EngineError

GATHER_WAIT = 0.004  # seconds a leader waits for streams that were in the last step to post again


class FairLock:
    """A lock granted in the order it was asked for.

    ``threading.Lock`` lets a thread that releases and at once re-acquires it win again
    and again: a ``batch_generate`` looping over steps would starve the streams waiting
    for their turn between its steps. Tickets make the turns strict.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._next = 0  # the next ticket to hand out
        self._serving = 0  # the ticket that holds the lock

    def acquire(self) -> None:
        with self._cond:
            ticket = self._next
            self._next += 1
            while ticket != self._serving:
                self._cond.wait()

    def release(self) -> None:
        with self._cond:
            self._serving += 1
            self._cond.notify_all()

    def __enter__(self) -> FairLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@dataclass(eq=False)
class Job:
    """One stream's request for the next step: a prefill chunk, or one token to decode.

    ``sample`` asks for the next token after the job's last position (the last chunk
    of a prompt, and every decode). The leader fills ``token`` or ``error`` and
    ``seconds`` (the decode's own time), then sets ``done``.
    """

    seq: int
    tokens: list[int]
    pos: int
    sample: bool
    sampler: Any
    ctx: Context
    watched: object | None = None  # the prefill watcher's key: this chunk's decode may be aborted
    token: int = -1
    error: BaseException | None = None
    seconds: float = 0.0
    done: bool = False
    gather_until: float | None = None  # when a leader stops waiting for the last step's streams

    @property
    def decoding(self) -> bool:
        return len(self.tokens) == 1 and self.sample and self.watched is None


@dataclass
class StepStats:
    """Counts for tests: how many steps ran, and how many streams' tokens they carried."""

    steps: int = 0
    widest: int = 0  # the most streams' tokens one step carried
    shared: int = 0  # steps that carried more than one stream's next token


class Steps:
    """The step loop of one llama.cpp context, run by whichever caller needs a token next.

    ``run_step(decodes, chunks)`` does a step's engine work under the engine lock (the
    model's, so ``classify``/``batch_generate`` take turns with steps).
    """

    def __init__(
        self,
        engine_lock: FairLock,
        run_step: Callable[[list[Job], list[Job]], None],
        prefill_budget: int,
    ) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._pending: deque[Job] = deque()
        self._members: set[int] = set()  # the seqs of the streams in a call
        self._served: set[int] = set()  # members the last step served, awaited by the next
        self._busy = False
        self._engine_lock = engine_lock
        self._run_step = run_step
        self._budget = prefill_budget
        self.stats = StepStats()

    @contextmanager
    def member(self, seq: int) -> Iterator[None]:
        """Register a stream for the whole of its call (its absence ends the leader's wait)."""
        with self._cond:
            self._members.add(seq)
        try:
            yield
        finally:
            with self._cond:
                self._members.discard(seq)
                self._served.discard(seq)
                self._cond.notify_all()

    def run(self, job: Job) -> Job:
        """Post ``job`` and return once a step did it: led by this thread or another one."""
        cond = self._cond
        with cond:
            self._pending.append(job)
            cond.notify_all()  # a leader gathering this step may be waiting for this job
            while not job.done:
                if self._busy:
                    cond.wait(0.05)
                    if not job.done and job in self._pending and job.ctx.done():
                        self._pending.remove(job)  # not taken yet: leave now, not after a step
                        job.ctx.raise_if_done()
                    continue
                if not self._gathered(job):
                    continue
                self._busy = True
                decodes, chunks = self._take()
                cond.release()
                try:
                    self._lead(decodes, chunks)
                finally:
                    cond.acquire()
                    self._busy = False
                    cond.notify_all()
        return job

    def _gathered(self, job: Job) -> bool:
        """Whether to step now: every stream served last step has posted again, or the wait is over.

        Called with the condition held; may wait on it (and return False to look again).
        After a step, its streams' threads each hand their token to their consumer and come
        back; stepping before they do would split the streams into alternating halves.
        """
        missing = self._served - {j.seq for j in self._pending}
        if not missing:
            return True
        now = time.monotonic()
        if job.gather_until is None:
            job.gather_until = now + GATHER_WAIT
        deadline = job.gather_until
        if now >= deadline:
            self._served -= missing  # slow consumers: not waited for again until they are back
            return True
        self._cond.wait(deadline - now)
        return False

    def _take(self) -> tuple[list[Job], list[Job]]:
        """This step's jobs: every pending decode, then prefill chunks up to the budget (FIFO)."""
        decodes: list[Job] = []
        chunks: list[Job] = []
        budget = self._budget
        rest: deque[Job] = deque()
        for job in self._pending:
            if job.decoding:
                decodes.append(job)
            elif not chunks or budget >= len(job.tokens):
                chunks.append(job)  # the first chunk always goes, whatever its size
                budget -= len(job.tokens)
            else:
                rest.append(job)
        self._pending = rest
        self._served = {j.seq for j in decodes + chunks} & self._members
        return decodes, chunks

    def _lead(self, decodes: list[Job], chunks: list[Job]) -> None:
        try:
            with self._engine_lock:
                self._run_step(decodes, chunks)
        except Exception as exc:  # the step as a whole failed: every job of it gets the error
            for j in decodes + chunks:
                if j.error is None and j.token < 0:
                    j.error = exc
        except BaseException:  # Ctrl-C in the leader's thread: the leader's own; the others end
            for j in decodes + chunks:
                if j.error is None and j.token < 0:
                    j.error = EngineError("llama.cpp step interrupted in another thread")
            raise
        finally:
            for j in decodes + chunks:
                j.done = True
        st = self.stats
        st.steps += 1
        st.widest = max(st.widest, len(decodes))
        st.shared += len(decodes) > 1


__all__ = ["FairLock", "Job", "StepStats", "Steps"]
