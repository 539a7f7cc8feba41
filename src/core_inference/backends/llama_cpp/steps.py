"""Continuous batching for the llama.cpp streams of one model: many callers, one decode per step.

There is no scheduler thread. A stream that needs its next token posts a ``Job`` and,
if no step is running, runs one itself for every job posted so far (the leader); the
others sleep until their job is done. The decodes themselves all run on the process's
one decode thread (``engine._DecodeThread``), whichever caller leads.

A step is one ``llama_decode`` carrying the next token of every stream that is
generating and the prefill chunks of streams that are starting, up to a token budget
(the model's ``_run_step``). A prompt's chunks are cut at fixed positions whatever the
load; with ``batch_invariant`` a chunk rides in the step's decode only where llama.cpp's
micro-batches leave its logits what they are alone, else it gets a decode of its own.

``classify`` and ``batch_generate`` post their decodes here too, as work jobs (``work``):
they decode a context of their own, so they cannot ride in the streams' decode, but they
share the step's token budget with the streams' prefill chunks and run in the step, after
the streams' tokens. One queue decides who goes next, and a call whose context ends while
its job waits leaves the queue at once. The leader does not run another thread's work: it
gives that thread its turn and waits (so a Ctrl-C lands only in its own thread's work).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from ...context import Context
from ...errors import EngineError

GATHER_WAIT = 0.004  # seconds a leader waits for streams that were in the last step to post again


class FairLock:
    """A lock granted in the order it was asked for, that Ctrl-C cannot leave held.

    ``threading.Lock`` lets a thread that releases and at once re-acquires it win again
    and again: a ``batch_generate`` looping over steps would starve the streams waiting
    for their turn between its steps. Tickets make the turns strict.

    ``KeyboardInterrupt`` lands in the main thread after whichever C call it arrived in,
    so it can leave ``acquire`` holding a ticket, or holding the lock, with no ``with``
    block yet to release it; every later caller would then wait for good (a Ctrl-C'd
    stream hung the next one). ``acquire`` therefore gives up its ticket, or the lock,
    on the way out. The inner mutex is used as ``with self._mutex`` (a C lock, whose
    ``__enter__``/``__exit__`` cannot be cut short), never as ``with self._cond``.
    """

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._cond = threading.Condition(self._mutex)
        self._next = 0  # the next ticket to hand out
        self._serving = 0  # the ticket that holds the lock (or is about to)
        self._abandoned: set[int] = set()  # tickets whose holders left before their turn
        self._owner: int | None = None  # the thread that holds the lock

    def acquire(self) -> None:
        me = threading.get_ident()
        ticket = -1
        try:
            with self._mutex:
                ticket = self._next
                self._next = ticket + 1
                while ticket != self._serving:
                    self._cond.wait()
                self._owner = me
        except BaseException:
            self._give_up(ticket, me)
            raise

    def release(self) -> None:
        with self._mutex:
            self._advance()

    def _give_up(self, ticket: int, me: int) -> None:
        """An interrupted ``acquire``: pass the lock on if it got it, else drop its ticket."""
        with self._mutex:
            if self._owner == me or (ticket >= 0 and ticket == self._serving):
                self._advance()
            elif ticket > self._serving:
                self._abandoned.add(ticket)

    def _advance(self) -> None:
        """Hand the lock to the next ticket still waiting (the mutex is held)."""
        self._owner = None
        self._serving += 1
        while self._serving in self._abandoned:
            self._abandoned.discard(self._serving)
            self._serving += 1
        self._cond.notify_all()

    def __enter__(self) -> FairLock:
        try:
            self.acquire()
        except BaseException:  # Ctrl-C just after ``acquire`` returned: nothing would release it
            self._give_up(-1, threading.get_ident())
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _held_lock() -> threading.Lock:
    lock = threading.Lock()
    lock.acquire()
    return lock


@dataclass(eq=False)
class Job:
    """One stream's request for the next step: a prefill chunk, or one token to decode;
    or a decode of ``classify``/``batch_generate`` (``work``, ``rows`` rows).

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
    reset: bool = False  # empty the sequence from ``pos`` on before this chunk (its first)
    want_logits: bool = False  # copy out the logits row the token is sampled from (classify)
    work: Callable[[], None] | None = None  # a decode of another context, run in the step by its thread
    rows: int = 0  # a work job's rows, charged to the step's prefill budget
    turn: bool = False  # a work job's thread may run it now (the leader waits for ``finished``)
    finished: threading.Event = field(default_factory=threading.Event, repr=False)  # work run, or given up
    token: int = -1
    logits: Any = None
    error: BaseException | None = None
    seconds: float = 0.0
    done: bool = False
    gather_until: float | None = None  # when a leader stops waiting for the last step's streams
    thread: int = field(default_factory=threading.get_ident)  # the stream's thread (Ctrl-C is its own)
    wake: threading.Lock = field(default_factory=_held_lock, repr=False)  # released to wake that thread
    woken: bool = False  # ``wake`` was released and not taken back yet (under the steps' lock)

    @property
    def decoding(self) -> bool:
        """A stream's next token (the step's shared decode), not a prefill chunk."""
        return len(self.tokens) == 1 and self.sample and self.watched is None and not self.reset

    @property
    def size(self) -> int:
        """The rows the job puts in its step: a chunk's tokens, or a work job's rows."""
        return self.rows if self.work is not None else len(self.tokens)


@dataclass
class StepStats:
    """Counts for tests: how many steps ran, and how many streams' tokens they carried."""

    steps: int = 0
    widest: int = 0  # the most streams' tokens one step carried
    shared: int = 0  # steps that carried more than one stream's next token
    packed: int = 0  # prefill chunks that rode in a step's one decode (beside streams or other chunks)
    filled: int = 0  # filler rows that kept a step's streams one micro-batch across a free sequence
    redone: int = 0  # steps whose one decode failed as a whole and was decoded again job by job
    work: int = 0  # classify/batch_generate decodes run in a step's turn


class Steps:
    """The step loop of one llama.cpp context, run by whichever caller needs a token next.

    ``run_step(decodes, chunks)`` does a step's engine work under the engine lock (the
    model's); the step's work jobs then run in turn, still under it (``_turns``).
    """

    def __init__(
        self,
        engine_lock: FairLock,
        run_step: Callable[[list[Job], list[Job]], None],
        prefill_budget: int,
    ) -> None:
        # used as ``with self._lock`` (a C lock): see FairLock on why not ``with self._cond``
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._pending: deque[Job] = deque()
        self._members: set[int] = set()  # the seqs of the streams in a call
        self._served: set[int] = set()  # members the last step served, awaited by the next
        self._taken: list[Job] = []  # the running step's jobs (kept here, not in a leader's locals)
        self._n_decodes = 0  # how many of ``_taken`` are decodes (the rest are prefill chunks)
        self._busy = False
        self._engine_lock = engine_lock
        self._run_step = run_step
        self._budget = prefill_budget
        self.stats = StepStats()

    @contextmanager
    def member(self, seq: int) -> Iterator[None]:
        """Register a stream for the whole of its call (its absence ends the leader's wait)."""
        try:
            with self._lock:
                self._members.add(seq)
            yield
        finally:
            with self._lock:
                self._members.discard(seq)
                self._served.discard(seq)
                self._cond.notify_all()

    def run(self, job: Job) -> Job:
        """Post ``job`` and return once a step did it: led by this thread or another one.

        A step runs outside the lock; the next pass through the loop ends it. What a
        leader took is in ``_taken``, so a ``KeyboardInterrupt`` landing anywhere leaves
        no job that nobody will ever do, and no step marked busy for good.

        A follower sleeps on its own job's ``wake`` lock, released when its step is over
        or when it should lead the next one; only a gathering leader waits on the
        condition. (All of them waiting on it, every post woke every stream: 16 streams
        made 256 wake-ups a step.)
        """
        lock = self._lock
        posted = leading = follow = False
        try:
            while True:
                with lock:
                    if leading:
                        self._end_step()
                        leading = False
                    if not posted:
                        self._pending.append(job)
                        posted = True
                        self._cond.notify_all()  # a leader gathering this step may be waiting for it
                    if job.done:
                        return job
                    follow = self._busy
                    if follow:
                        if job in self._pending and job.ctx.done():
                            self._pending.remove(job)  # not taken yet: leave now, not after a step
                            job.ctx.raise_if_done()
                        if job.woken:  # a wake-up from before this wait: take it back
                            job.wake.acquire(False)
                            job.woken = False
                    else:
                        if not self._gathered(job):
                            continue
                        self._busy = leading = True
                        self._take()
                if not follow:
                    self._lead()
                elif job.turn and not job.finished.is_set():
                    _own_turn(job)  # a work job: the leader holds the engine for it meanwhile
                else:
                    job.wake.acquire(timeout=0.05)  # at most this long between checks of its context
        except BaseException:
            self._withdraw(job, leading)
            raise

    def work(self, rows: int, ctx: Context, fn: Callable[[], None]) -> None:
        """Run ``fn`` (a decode of ``rows`` rows on another context, and what reads its
        outputs) in this thread, in a step; its error is raised here. ``fn`` must not take
        the engine lock: the step holds it for ``fn``."""
        job = self.run(Job(-1, [], 0, False, None, ctx, work=fn, rows=rows))
        if job.error is not None:
            raise job.error

    def _wake(self, job: Job) -> None:
        """Wake the thread of ``job`` (the lock is held)."""
        if not job.woken:
            job.woken = True
            job.wake.release()

    def _end_step(self) -> None:
        """The leader's step is over (the lock is held): every job it took is done; the
        streams of those jobs are woken, and one stream still waiting, to lead the next step."""
        for j in self._taken:
            if not j.done:  # the leader was interrupted before it got to them
                j.error = EngineError("llama.cpp step interrupted in another thread")
                j.done = True
            self._wake(j)
        self._taken = []
        self._busy = False
        if self._pending:
            self._wake(self._pending[0])
        self._cond.notify_all()  # a caller leaving with an exception may wait for its step

    def _withdraw(self, job: Job, leading: bool) -> None:
        """``run`` is leaving with an exception: leave the loop as the others need it."""
        with self._lock:
            if job in self._pending:
                self._pending.remove(job)
            job.finished.set()  # a work job's turn, if given, is given up: the leader waits no more
            if leading:
                self._end_step()
            # taken by another leader: wait for its step, so the caller does not clear its
            # sequence while a decode for it is still to come
            while not job.done and job in self._taken:
                self._cond.wait(0.05)

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

    def _take(self) -> None:
        """This step's jobs into ``_taken``: every pending decode, then prefill chunks and work
        jobs up to the budget (FIFO; the work jobs run last). Nothing is changed until the
        last lines, which make no calls."""
        decodes: list[Job] = []
        chunks: list[Job] = []
        budget = self._budget
        rest: deque[Job] = deque()
        for job in self._pending:
            if job.decoding:
                decodes.append(job)
            elif not chunks or budget >= job.size:
                chunks.append(job)  # the first chunk always goes, whatever its size
                budget -= job.size
            else:
                rest.append(job)
        chunks.sort(key=lambda j: j.work is not None)  # work jobs last (stable: FIFO otherwise)
        taken = decodes + chunks
        served = {j.seq for j in taken} & self._members
        self._taken, self._pending, self._served = taken, rest, served
        self._n_decodes = len(decodes)

    def _lead(self) -> None:
        taken = self._taken
        decodes, chunks = taken[: self._n_decodes], taken[self._n_decodes :]
        works = [j for j in chunks if j.work is not None]
        chunks = [j for j in chunks if j.work is None]
        try:
            with self._engine_lock:
                try:
                    # also with only work jobs: it raises ModelClosed once the model is closed
                    self._run_step(decodes, chunks)
                except Exception:
                    raise  # the step failed as a whole: its work jobs get the error below
                except BaseException:  # Ctrl-C in the leader: other threads' work still gets its turn
                    self._turns(works)
                    raise
                self._turns(works)
        except Exception as exc:  # the step as a whole failed: every job of it gets the error
            for j in taken:
                if j.error is None and j.token < 0:
                    j.error = exc
        except BaseException:  # Ctrl-C in the leader's thread: the leader's own; the others end
            for j in taken:
                if j.error is None and j.token < 0:
                    j.error = EngineError("llama.cpp step interrupted in another thread")
            raise
        finally:
            for j in taken:
                j.done = True
        st = self.stats
        st.steps += 1
        st.widest = max(st.widest, len(decodes))
        st.shared += len(decodes) > 1
        st.work += len(works)

    def _turns(self, works: list[Job]) -> None:
        """Each work job's turn, in order (the engine lock is held): the leader runs its own;
        another thread's is handed to that thread, and the leader waits for it to finish.

        A Ctrl-C in the leader's thread waits too (that thread's decode holds the engine)
        and is raised once every turn is over; a work job whose thread left first (its own
        Ctrl-C, or its context ending) is skipped.
        """
        held: list[BaseException] = []
        for j in works:
            while True:  # a Ctrl-C landing anywhere in here waits for the turn to be over
                try:
                    self._turn(j)
                    break
                except BaseException as exc:
                    held.append(exc)
        if held:
            raise held[0]

    def _turn(self, job: Job) -> None:
        """One work job's turn: run here if it is the leader's own, else handed over and
        waited for. Safe to call again after an interrupt: it picks up where it was."""
        if job.thread == threading.get_ident():
            if not job.finished.is_set():
                _own_turn(job)
            return
        with self._lock:
            if not job.finished.is_set() and not job.turn:
                job.turn = True
                self._wake(job)
        while not job.finished.wait(0.05):
            pass


def _own_turn(job: Job) -> None:
    """Run a work job in its own thread: its error is its own (and a Ctrl-C is raised on)."""
    assert job.work is not None
    try:
        job.work()
        job.token = 0  # done: a work job samples nothing of the step's
    except Exception as exc:
        job.error = exc
    except BaseException as exc:
        job.error = exc
        raise
    finally:
        job.finished.set()


__all__ = ["FairLock", "Job", "StepStats", "Steps"]
