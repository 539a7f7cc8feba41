"""Helpers every backend shares: whole-UTF-8 text, stop strings, metrics timing, slots."""

from __future__ import annotations

import codecs
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from .context import Context
from .errors import ModelClosed
from .types import GenerateConfig, GenerateMetrics, Token


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
    """Finds stop strings across token boundaries, holding back a possible stop prefix."""

    __slots__ = ("_buf", "_stops")

    def __init__(self, stops: Iterable[str]) -> None:
        self._stops = tuple(stops)
        self._buf = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Return (text safe to emit, whether a stop string was hit).

        A match is final only when no other stop could still begin earlier: for stops
        "\n" and "a\na", the text "aa\n" is held until the next piece decides.
        """
        buf = self._buf + text
        cut = self._earliest_match(buf)
        pending = self._earliest_partial(buf, len(buf) if cut == -1 else cut)
        if pending != -1:
            self._buf = buf[pending:]
            return buf[:pending], False
        self._buf = ""
        return (buf, False) if cut == -1 else (buf[:cut], True)

    def flush(self) -> str:
        """Text held back at the end of the stream, cut at a stop string if one is there."""
        buf, self._buf = self._buf, ""
        cut = self._earliest_match(buf)
        return buf if cut == -1 else buf[:cut]

    def _earliest_match(self, buf: str) -> int:
        cut = -1
        for stop in self._stops:
            i = buf.find(stop)
            if i != -1 and (cut == -1 or i < cut):
                cut = i
        return cut

    def _earliest_partial(self, buf: str, before: int) -> int:
        """First index before ``before`` where the rest of ``buf`` is a proper prefix of a stop."""
        longest = max(len(stop) for stop in self._stops)
        for j in range(max(0, len(buf) - longest + 1), before):
            tail = buf[j:]
            if any(len(tail) < len(stop) and stop.startswith(tail) for stop in self._stops):
                return j
        return -1


@dataclass
class MetricsRecorder:
    """Collects one call's counts and times; backends may fill in engine timings."""

    start: float = field(default_factory=time.perf_counter)
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_end: float = 0.0
    first_token: float = 0.0
    end: float = 0.0
    prefill_duration: float | None = None
    decode_duration: float | None = None
    peak_memory_bytes: int = 0
    active_memory_bytes: int = 0

    def prefill_done(self, prompt_tokens: int) -> None:
        """Mark the end of prefill."""
        self.prompt_tokens = prompt_tokens
        self.prefill_end = time.perf_counter()

    def finish(self) -> GenerateMetrics:
        """Freeze into a ``GenerateMetrics``."""
        end = self.end or time.perf_counter()
        prefill_end = self.prefill_end or self.first_token or end
        prefill = self.prefill_duration if self.prefill_duration is not None else prefill_end - self.start
        decode = self.decode_duration if self.decode_duration is not None else end - prefill_end
        ttft = (self.first_token - self.start) if self.first_token else 0.0
        return GenerateMetrics(
            prompt_tokens=self.prompt_tokens,
            generated_tokens=self.generated_tokens,
            prefill_duration=prefill,
            decode_duration=decode,
            total_duration=end - self.start,
            time_to_first_token=ttft,
            prefill_tokens_per_sec=self.prompt_tokens / prefill if prefill > 0 else 0.0,
            decode_tokens_per_sec=self.generated_tokens / decode if decode > 0 else 0.0,
            peak_memory_bytes=self.peak_memory_bytes,
            active_memory_bytes=self.active_memory_bytes,
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


def finish_tokens(
    pieces: Iterator[Piece],
    cfg: GenerateConfig,
    ctx: Context,
    rec: MetricsRecorder,
    closed: threading.Event | None = None,
) -> Iterator[Token]:
    """Turn an engine's raw (id, bytes) stream into contract ``Token``s.

    Applies max_tokens, stop token ids (not yielded), whole-UTF-8 text, stop strings
    (the text before the stop is yielded) and the context/closed checks between tokens.
    A token whose bytes end mid-character carries "" and the next one the whole
    character; text held back as a possible stop prefix that no stop followed comes
    as a last token with the id of the token before it (at ``max_tokens`` it is joined
    to the last token instead, so at most ``max_tokens`` tokens are yielded).
    """
    max_tokens = cfg.max_tokens
    if max_tokens == 0:
        return
    # This loop runs once per token: everything it calls is bound to a local first.
    stop_ids = frozenset(cfg.stop_tokens)
    utf8 = Utf8Holdback()._decode  # the decoder's own C method: one call per piece
    matcher = StopMatcher(cfg.stop) if cfg.stop else None
    check_ctx = None if ctx is Context.background() else ctx.raise_if_done
    is_closed = None if closed is None else closed.is_set
    token = _make_token
    last_id = -1
    count = 0
    for tid, piece in pieces:
        if check_ctx is not None:
            check_ctx()
        if is_closed is not None and is_closed():
            raise ModelClosed("model closed during the call")
        if stop_ids and tid in stop_ids:
            break
        count += 1  # noqa: SIM113 (stop ids are not counted)
        if count == 1:
            rec.first_token = time.perf_counter()
        rec.generated_tokens = count
        text = piece if isinstance(piece, str) else utf8(piece)
        last_id = tid
        last = count >= max_tokens
        if matcher is not None:
            text, stopped = matcher.feed(text)
            if stopped:
                if text:
                    yield token(tid, text)
                return
            if last:  # no stop can follow: release the held-back text with this token
                text += matcher.flush()
        yield token(tid, text)
        if last:
            break
    # Bytes of a character the stream never completed are dropped; text held back
    # as a possible stop-string prefix is not: it comes as one last token.
    if matcher is not None:
        tail = matcher.flush()
        if tail:
            yield Token(last_id, tail)


class SlotQueue:
    """At most ``n`` calls run at once; the rest wait their turn, cancellable by context."""

    def __init__(self, n: int) -> None:
        self.size = max(1, n)
        self._sem = threading.Semaphore(self.size)

    def acquire(self, ctx: Context, closed: threading.Event) -> None:
        """Wait for a free slot, or raise if the context ends or the model closes."""
        if self._sem.acquire(blocking=False):
            return
        while not self._sem.acquire(timeout=0.02):
            ctx.raise_if_done()
            if closed.is_set():
                raise ModelClosed("model closed while waiting for a slot")

    def release(self) -> None:
        """Give a slot back."""
        self._sem.release()
