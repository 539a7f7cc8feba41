"""``Context``: the seed's context.Context, for cancelling a call or giving it a deadline."""

from __future__ import annotations

import threading
import time

from .errors import Cancelled, DeadlineExceeded, InferenceError


class Context:
    """Carries cancellation and a deadline into a call; children follow their parent.

    >>> ctx = Context.background().with_timeout(5.0)
    >>> ctx.cancel()
    >>> ctx.done()
    True
    """

    __slots__ = ("_cancellable", "_deadline", "_err", "_event", "_parent")

    _deadline: float | None

    def __init__(
        self,
        parent: Context | None = None,
        deadline: float | None = None,
        cancellable: bool = True,
    ) -> None:
        self._parent = parent
        if deadline is not None and deadline != deadline:  # NaN would never expire
            raise ValueError("deadline: must be a number, got nan")
        if parent is not None and parent._deadline is not None:
            deadline = parent._deadline if deadline is None else min(deadline, parent._deadline)
        self._deadline = deadline
        self._event = threading.Event()
        self._err: InferenceError | None = None
        self._cancellable = cancellable

    @classmethod
    def background(cls) -> Context:
        """A context that is never cancelled and has no deadline."""
        return _BACKGROUND

    def with_cancel(self) -> Context:
        """A child context that ``cancel()`` ends (and that ends with this one)."""
        return Context(self)

    def with_timeout(self, seconds: float) -> Context:
        """A child context whose deadline is ``seconds`` from now."""
        return Context(self, time.monotonic() + seconds)

    def with_deadline(self, deadline: float) -> Context:
        """A child context ending at ``deadline``, a ``time.monotonic()`` value."""
        return Context(self, deadline)

    @property
    def deadline(self) -> float | None:
        """The ``time.monotonic()`` instant this context ends at, or None."""
        return self._deadline

    def cancel(self) -> None:
        """Cancel this context and its children; idempotent."""
        if not self._cancellable:
            raise TypeError("the background context cannot be cancelled")
        if self._err is None:
            self._err = Cancelled("context cancelled")
        self._event.set()

    def err(self) -> InferenceError | None:
        """``Cancelled`` or ``DeadlineExceeded`` once ended, else None."""
        if self._err is not None:
            return self._err
        if self._deadline is not None and time.monotonic() >= self._deadline:
            self._err = DeadlineExceeded("context deadline exceeded")
            self._event.set()
            return self._err
        if self._parent is not None:
            err = self._parent.err()
            if err is not None:
                self._err = err
                self._event.set()
            return err
        return None

    def done(self) -> bool:
        """True once cancelled or past the deadline."""
        return self.err() is not None

    def raise_if_done(self) -> None:
        """Raise ``Cancelled`` or ``DeadlineExceeded`` if the context has ended."""
        err = self.err()
        if err is not None:
            raise type(err)(str(err))

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the context ends or ``timeout`` passes; True if it ended."""
        end = None if timeout is None else time.monotonic() + timeout
        while not self.done():
            limits = [t for t in (end, self._deadline) if t is not None]
            remaining = min(limits) - time.monotonic() if limits else None
            if remaining is not None and remaining <= 0:
                return self.done()
            self._event.wait(0.05 if remaining is None else min(remaining, 0.05))
        return True

    def __repr__(self) -> str:
        if self is _BACKGROUND:
            return "Context.background()"
        state = "done" if self.done() else "active"
        return f"<Context {state} deadline={self._deadline}>"


_BACKGROUND = Context(cancellable=False)
