"""Helpers every backend shares: whole-UTF-8 text, stop strings, metrics timing, slots."""

from __future__ import annotations

import codecs
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace

from .context import Context
from .errors import InferenceError, ModelClosed
from .types import BatchResult, ClassifyResult, GenerateConfig, GenerateMetrics, Token


class Utf8Holdback:
    """Decodes token byte pieces, holding back a character split across tokens."""

    __slots__ = ("_decode",)

    def __init__(self) -> None:
        self._decode = codecs.getincrementaldecoder("utf-8")("replace").decode

    def feed(self, piece: bytes) -> str:
        """Text completed by ``piece`` (may be empty while a character is incomplete)."""
        return self._decode(piece)

    def flush(self) -> str:
        """Whatever is still held back, with U+FFFD for an incomplete tail."""
        return self._decode(b"", True)


class StopMatcher:
    """Finds stop strings across token boundaries, holding back a possible stop prefix.

    ``feed``/``flush`` work on text; ``earliest_match``/``earliest_partial`` are the
    matching itself, which ``TokenFinisher`` uses on the text of the tokens it holds.
    """

    __slots__ = ("_buf", "_longest", "_stops")

    def __init__(self, stops: Iterable[str]) -> None:
        self._stops = tuple(stops)
        self._longest = max(map(len, self._stops), default=0)
        self._buf = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Return (text safe to emit, whether a stop string was hit).

        A match is final only when no other stop could still begin earlier: for stops
        "\n" and "a\na", the text "aa\n" is held until the next piece decides.
        """
        buf = self._buf + text
        cut, _ = self.earliest_match(buf)
        pending = self.earliest_partial(buf, len(buf) if cut == -1 else cut)
        if pending != -1:
            self._buf = buf[pending:]
            return buf[:pending], False
        self._buf = ""
        return (buf, False) if cut == -1 else (buf[:cut], True)

    def flush(self) -> tuple[str, bool]:
        """(text held back at the end of the stream, whether a stop string was hit), cut at
        the stop. A stop can be found only now: held while a longer stop that began
        earlier might still have followed ("#" in "a#" with "a#a" also a stop)."""
        buf, self._buf = self._buf, ""
        cut, _ = self.earliest_match(buf)
        return (buf, False) if cut == -1 else (buf[:cut], True)

    def earliest_match(self, buf: str) -> tuple[int, str]:
        """(index, stop) of the earliest stop string in ``buf``, or (-1, "")."""
        cut, which = -1, ""
        for stop in self._stops:
            i = buf.find(stop)
            if i != -1 and (cut == -1 or i < cut):
                cut, which = i, stop
        return cut, which

    def earliest_partial(self, buf: str, before: int) -> int:
        """First index before ``before`` where the rest of ``buf`` is a proper prefix of a stop."""
        stops = self._stops
        for j in range(max(0, len(buf) - self._longest + 1), before):
            tail = buf[j:]
            if any(len(tail) < len(stop) and stop.startswith(tail) for stop in stops):
                return j
        return -1


@dataclass
class MetricsRecorder:
    """Collects one call's counts and times; backends may fill in engine timings.

    ``prefill_duration``/``decode_duration`` are the engine's own time when a backend
    measures it (its decode calls only, never a neighbour's); otherwise the stream
    driver times each pull from the engine's raw stream, so a slow consumer is never
    charged to the engine. ``finish_reason`` is set by a backend that ends a raw stream
    for a reason of its own (``"context_full"``); a raw stream that just ends means
    the engine produced its end-of-text token.
    """

    start: float = field(default_factory=time.perf_counter)
    prompt_tokens: int = 0
    generated_tokens: int = 0
    decoded_tokens: int | None = None  # tokens that came from decode steps (default: all but the first)
    prefill_end: float = 0.0
    first_token: float = 0.0
    end: float = 0.0
    prefill_duration: float | None = None
    decode_duration: float | None = None
    pulled_first: float = 0.0  # the driver's timing of the engine: the pull that gave the first token
    pulled_rest: float = 0.0  # ... and every pull after it
    peak_memory_bytes: int = 0
    active_memory_bytes: int = 0
    finish_reason: str = ""
    cached_prompt_tokens: int = 0  # the first prompt tokens a kept cache already held

    def prefill_done(self, prompt_tokens: int) -> None:
        """Mark the end of prefill."""
        self.prompt_tokens = prompt_tokens
        self.prefill_end = time.perf_counter()

    def finish(self) -> GenerateMetrics:
        """Freeze into a ``GenerateMetrics``."""
        end = self.end or time.perf_counter()
        prefill_end = self.prefill_end or self.first_token or end
        prefill = self.prefill_duration
        if prefill is None:
            prefill = self.pulled_first or (prefill_end - self.start)
        decode = self.decode_duration
        if decode is None:
            decode = self.pulled_rest if self.pulled_first else end - prefill_end
        decoded = self.decoded_tokens
        if decoded is None:
            decoded = max(self.generated_tokens - 1, 0)
        ttft = (self.first_token - self.start) if self.first_token else 0.0
        return GenerateMetrics(
            prompt_tokens=self.prompt_tokens,
            generated_tokens=self.generated_tokens,
            prefill_duration=prefill,
            decode_duration=decode,
            total_duration=end - self.start,
            time_to_first_token=ttft,
            # the tokens actually prefilled: a cached prefix took no time
            prefill_tokens_per_sec=(self.prompt_tokens - self.cached_prompt_tokens) / prefill
            if prefill > 0 else 0.0,
            decode_tokens_per_sec=decoded / decode if decode > 0 else 0.0,
            peak_memory_bytes=self.peak_memory_bytes,
            active_memory_bytes=self.active_memory_bytes,
            cached_prompt_tokens=self.cached_prompt_tokens,
        )


Piece = tuple[int, "bytes | str"]


def _token_factory() -> Callable[[int, str], Token]:
    """``Token(id, text)`` at about half the cost, for the once-per-token path.

    A frozen dataclass's ``__init__`` sets each field through ``object.__setattr__``;
    writing the slots directly is the same object, made faster. Should ``Token`` ever
    gain a ``__post_init__`` (validation), the plain constructor is used instead.
    """
    if hasattr(Token, "__post_init__") or not hasattr(Token, "__slots__"):
        return Token
    new = object.__new__
    slots = vars(Token)  # the member descriptors of the two slots
    set_id, set_text = slots["id"].__set__, slots["text"].__set__

    def make(tid: int, text: str) -> Token:
        tok = new(Token)
        set_id(tok, tid)
        set_text(tok, text)
        return tok

    return make


_make_token = _token_factory()
_NONE: tuple[Token, ...] = ()


class TokenFinisher:
    """Turns an engine's raw ``(id, bytes | str)`` pieces into contract ``Token``s.

    The one piece of stream logic that every backend, the sync and the async path, and
    ``batch_generate`` share: max_tokens, stop ids (not yielded), whole-UTF-8 text and
    stop strings matched across token boundaries. ``push`` returns the tokens that are
    ready; once ``finish_reason`` is set the stream is over. A token whose text could be
    the start of a stop string is held back whole (id and text) until the next pieces
    decide: it is then released as it was, or cut at the stop. So every token yielded is
    one engine token with its own id, in the engine's order, none twice, and a run with a
    stop string yields a prefix of the same run without it. A token whose bytes end
    mid-character carries "" and the next one the whole character.
    """

    __slots__ = (
        "_decode", "_held", "_held_text", "_match", "_partial", "_rec", "_stop_ids", "_stops",
        "count", "finish_reason", "max_tokens", "stop",
    )

    def __init__(self, cfg: GenerateConfig, rec: MetricsRecorder) -> None:
        self.max_tokens = cfg.max_tokens
        self._stop_ids = frozenset(cfg.stop_tokens)
        self._stops = cfg.stop
        matcher = StopMatcher(cfg.stop)
        self._match, self._partial = matcher.earliest_match, matcher.earliest_partial
        self._decode = Utf8Holdback()._decode  # the decoder's own C method: one call per piece
        self._held: list[tuple[int, str]] = []
        self._held_text = ""
        self._rec = rec
        self.count = 0
        self.finish_reason: str | None = "length" if cfg.max_tokens == 0 else None
        self.stop: str | int | None = None  # the stop string or stop id that fired

    def push(self, tid: int, piece: bytes | str) -> tuple[Token, ...]:
        """Feed one engine token; return the tokens ready to yield (often exactly one)."""
        if tid in self._stop_ids:
            out = self.end()  # what is held is decided now: a stop string in it fired first
            if self.stop is None:
                self.finish_reason, self.stop = "stop", tid
            return out
        self.count = count = self.count + 1
        rec = self._rec
        if count == 1:
            rec.first_token = time.perf_counter()
        rec.generated_tokens = count
        text = piece if isinstance(piece, str) else self._decode(piece)
        last = count >= self.max_tokens
        if last:
            self.finish_reason = "length"
        if not self._stops:
            return (_make_token(tid, text),)
        self._held.append((tid, text))
        buf = self._held_text = self._held_text + text
        cut, which = self._match(buf)
        if last:  # no piece can follow: decide now
            if cut != -1:
                self.finish_reason, self.stop = "stop", which
            return self._release(len(buf) + 1 if cut == -1 else cut, cut != -1)
        pending = self._partial(buf, len(buf) if cut == -1 else cut)
        if pending == -1:
            if cut == -1:
                return self._release(len(buf) + 1)
            self.finish_reason, self.stop = "stop", which
            return self._release(cut, True)
        return self._release(pending)

    def end(self, reason: str = "end_of_text") -> tuple[Token, ...]:
        """The engine's stream ended by itself: release what is held, record why it ended."""
        if self.finish_reason is not None:
            return _NONE
        cut, which = self._match(self._held_text) if self._stops else (-1, "")
        if cut != -1:
            self.finish_reason, self.stop = "stop", which
            return self._release(cut, True)
        # Bytes of a character the stream never completed are dropped.
        self.finish_reason = reason
        return self._release(len(self._held_text) + 1)

    def _release(self, upto: int, cut: bool = False) -> tuple[Token, ...]:
        """The held tokens whose text ends before offset ``upto`` (a token that ends
        exactly there goes too, unless it is an empty mid-character piece that belongs
        to what follows). With ``cut`` a stop string starts at ``upto``: the token that
        straddles it goes with its text up to there, and everything after is dropped."""
        held = self._held
        if not held:
            return _NONE
        out = []
        pos = n = 0
        for tid, text in held:
            end = pos + len(text)
            if end < upto or (end == upto and text):
                out.append(_make_token(tid, text))
                pos, n = end, n + 1
                continue
            if cut and pos < upto:
                out.append(_make_token(tid, text[: upto - pos]))
            break
        if cut:
            held.clear()
            self._held_text = ""
        else:
            del held[:n]
            self._held_text = self._held_text[pos:]
        return tuple(out)


class BatchBook:
    """The bookkeeping of one native ``batch_generate`` call, the same for every engine.

    ``encoded`` maps each good prompt's index to its token ids, ``errors`` each bad one's
    to its failure. The engine feeds every prompt's pieces through ``finishers[i]`` and
    appends what it yields to ``tokens[i]``, adding its step times to ``rec``; then sets
    the call's memory on ``rec`` and asks for ``results()``: one ``BatchResult`` per
    prompt, in order, each with its own counts and the timings of the batch.
    """

    def __init__(
        self, encoded: dict[int, list[int]], errors: dict[int, BaseException], cfg: GenerateConfig,
        rec: MetricsRecorder,
    ) -> None:
        self.encoded, self.errors, self.rec = encoded, errors, rec
        self.recs = {k: MetricsRecorder(start=rec.start) for k in encoded}
        self.finishers = {k: TokenFinisher(cfg, self.recs[k]) for k in encoded}
        self.tokens: dict[int, list[Token]] = {k: [] for k in encoded}
        rec.prefill_duration = rec.decode_duration = 0.0  # summed over the engine's steps

    def results(self, count: int) -> list[BatchResult]:
        """The ``count`` prompts' results, in order (the call's totals go into ``rec``)."""
        rec, finishers, encoded = self.rec, self.finishers, self.encoded
        rec.prompt_tokens = sum(map(len, encoded.values()))
        rec.generated_tokens = sum(f.count for f in finishers.values())
        rec.decoded_tokens = rec.generated_tokens - sum(1 for f in finishers.values() if f.count)
        rec.first_token = min((r.first_token for r in self.recs.values() if r.first_token), default=0.0)
        batch = rec.finish()
        results = []
        for i in range(count):
            if i in self.errors:
                results.append(BatchResult(err=self.errors[i], finish_reason="error", metrics=batch))
                continue
            fin, first = finishers[i], self.recs[i].first_token
            mine = replace(batch, prompt_tokens=len(encoded[i]), generated_tokens=fin.count,
                           time_to_first_token=first - rec.start if first else 0.0)
            results.append(BatchResult(tuple(self.tokens[i]), None, fin.finish_reason or "length", fin.stop,
                                       len(encoded[i]), mine))
        return results


def classify_results(
    count: int, encoded: dict[int, list[int]], errors: dict[int, BaseException],
    done: Mapping[int, tuple[Token, Sequence[float] | None]], rec: MetricsRecorder,
) -> list[ClassifyResult]:
    """A native ``classify`` call's results, in order: each prompt's token (and logits row), or
    its own error; the call's totals go into ``rec`` (its prefill end and memory set first)."""
    rec.prompt_tokens = sum(map(len, encoded.values()))
    rec.generated_tokens = len(done)
    rec.decode_duration, rec.decoded_tokens = 0.0, 0
    batch = rec.finish()
    results = []
    for i in range(count):
        if i in errors:
            results.append(ClassifyResult(Token(-1, ""), None, 0, batch, errors[i]))
            continue
        token, logits = done[i]
        mine = replace(batch, prompt_tokens=len(encoded[i]), generated_tokens=1)
        results.append(ClassifyResult(token, logits, len(encoded[i]), mine))
    return results


def finish_tokens(
    pieces: Iterable[Piece],
    cfg: GenerateConfig,
    ctx: Context,
    rec: MetricsRecorder,
    closed: threading.Event | None = None,
    finisher: TokenFinisher | None = None,
) -> Iterator[Token]:
    """Drive an engine's raw sync stream through a ``TokenFinisher``: the sync path.

    Checks the context and ``closed`` before each piece, and times each pull from the
    engine (the first one is prefill) so that the consumer's own time between tokens
    is never counted as the engine's.
    """
    fin = finisher or TokenFinisher(cfg, rec)
    if fin.finish_reason is not None:  # max_tokens=0: the engine is not pulled at all
        return
    push = fin.push
    check_ctx = None if ctx is Context.background() else ctx.raise_if_done
    is_closed = None if closed is None else closed.is_set
    clock = time.perf_counter
    spent = 0.0
    t = clock()
    for tid, piece in pieces:
        now = clock()
        if fin.count:
            spent += now - t
        else:
            rec.pulled_first = now - t
        if check_ctx is not None:
            check_ctx()
        if is_closed is not None and is_closed():
            raise ModelClosed("model closed during the call")
        out = push(tid, piece)
        if out:
            yield from out
        if fin.finish_reason is not None:
            rec.pulled_rest = spent
            return
        t = clock()
    rec.pulled_rest = spent
    yield from fin.end(rec.finish_reason or "end_of_text")


async def afinish_tokens(
    pieces: AsyncIterator[Piece],
    cfg: GenerateConfig,
    ctx: Context,
    rec: MetricsRecorder,
    closed: threading.Event | None = None,
    finisher: TokenFinisher | None = None,
) -> AsyncIterator[Token]:
    """``finish_tokens`` for an engine's raw async stream: the async path."""
    fin = finisher or TokenFinisher(cfg, rec)
    if fin.finish_reason is not None:
        return
    clock = time.perf_counter
    spent = 0.0
    t = clock()
    async for tid, piece in pieces:
        now = clock()
        if fin.count:
            spent += now - t
        else:
            rec.pulled_first = now - t
        ctx.raise_if_done()
        if closed is not None and closed.is_set():
            raise ModelClosed("model closed during the call")
        for tok in fin.push(tid, piece):
            yield tok
        if fin.finish_reason is not None:
            rec.pulled_rest = spent
            return
        t = clock()
    rec.pulled_rest = spent
    for tok in fin.end(rec.finish_reason or "end_of_text"):
        yield tok


def engine_seed(seed: int, bits: int = 32) -> int:
    """A caller's seed hashed down to an engine's seed width, the same on every backend.

    Engines take 32-bit (or 64-bit) seeds, and llama.cpp reads 0xFFFFFFFF as "pick a
    random seed": passing seeds through would make ``seed=2**32 + 5`` equal ``seed=5``
    and one seed random. Hashing (BLAKE2b of the decimal seed) keeps equal seeds equal,
    makes small and large seeds independent in practice, and the all-ones value is
    never returned; only ``seed=None`` means random.
    """
    import hashlib

    digest = hashlib.blake2b(str(int(seed)).encode(), digest_size=8).digest()
    top = (1 << bits) - 1
    value = int.from_bytes(digest, "little") & top
    return value - 1 if value == top else value


class SlotTicket:
    """Which slot a call holds, written the moment it is taken.

    ``KeyboardInterrupt`` lands in the main thread after whichever C call it arrived in,
    so it can come between taking a slot and returning it to the caller; a slot known
    only from a return value would then be lost for good, and once all were lost every
    later call would wait forever. The caller keeps the ticket and gives back what it shows.
    """

    __slots__ = ("active", "holder")

    def __init__(self) -> None:
        self.holder: int | None = None  # the id ``release`` takes, once a slot is held
        self.active = False  # counted among the model's calls in progress (``BaseModel``)


class SlotQueue:
    """At most ``n`` calls run at once; the rest wait their turn, cancellable by context.

    It knows which thread holds each slot, so a thread that already holds every slot
    (a stream left open while it starts another call) gets an error instead of
    waiting for itself forever. Its lock is a C lock used as ``with self._lock``
    (``threading.Semaphore`` is Python code around a condition, which a Ctrl-C can
    leave locked).
    """

    def __init__(self, n: int) -> None:
        self.size = max(1, n)
        self._free = self.size
        self._holders: dict[int, int] = {}  # thread ident -> slots it holds
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)

    def _try_take(self, holder: int, ticket: SlotTicket | None) -> bool:
        """Take a free slot for ``holder`` if there is one (the lock is held)."""
        if self._free <= 0:
            return False
        self._free -= 1
        if ticket is not None:
            ticket.holder = holder  # no call between the two: nothing can land in between
        self._holders[holder] = self._holders.get(holder, 0) + 1
        return True

    def acquire(self, ctx: Context, closed: threading.Event, ticket: SlotTicket | None = None) -> int:
        """Wait for a free slot, or raise if the context ends or the model closes.

        Returns the holder's id, to give back to ``release`` (also in ``ticket``).
        """
        me = threading.get_ident()
        with self._lock:
            if self._try_take(me, ticket):
                return me
            mine = self._holders.get(me, 0)
        if mine >= self.size:
            raise InferenceError(
                f"this thread already holds all {self.size} of the model's slots with streams it "
                "has not finished: finish or close() them before starting another call here, or "
                "load the model with more parallel_slots"
            )
        while True:
            with self._lock:
                if self._try_take(me, ticket):
                    return me
                self._cond.wait(0.02)
                if self._try_take(me, ticket):
                    return me
            ctx.raise_if_done()
            if closed.is_set():
                raise ModelClosed("model closed while waiting for a slot")

    async def aacquire(self, ctx: Context, closed: threading.Event, ticket: SlotTicket | None = None) -> int:
        """``acquire`` for an event loop: waits without blocking it (tasks may hold many slots)."""
        import asyncio

        while True:
            with self._lock:
                if self._try_take(-1, ticket):
                    return -1
            ctx.raise_if_done()
            if closed.is_set():
                raise ModelClosed("model closed while waiting for a slot")
            await asyncio.sleep(0.01)

    def release(self, holder: int | None = None) -> None:
        """Give a slot back (``holder``: what ``acquire`` returned; default this thread)."""
        holder = threading.get_ident() if holder is None else holder
        with self._lock:
            self._free += 1
            left = self._holders.get(holder, 0) - 1
            if left > 0:
                self._holders[holder] = left
            else:
                self._holders.pop(holder, None)
            self._cond.notify()
