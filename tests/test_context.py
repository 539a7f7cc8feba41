"""Context: the seed's context.Context (cancel, deadline, parent and child)."""

from __future__ import annotations

import threading
import time

import pytest

from core_inference import Cancelled, Context, DeadlineExceeded, InferenceError


def test_background_is_never_done_and_cannot_be_cancelled() -> None:
    bg = Context.background()
    assert bg is Context.background()
    assert not bg.done() and bg.err() is None and bg.deadline is None
    bg.raise_if_done()
    with pytest.raises(TypeError):
        bg.cancel()
    assert not bg.done()
    assert bg.wait(0.01) is False


def test_with_cancel_and_cancel() -> None:
    ctx = Context.background().with_cancel()
    assert not ctx.done() and ctx.err() is None
    ctx.cancel()
    assert ctx.done()
    err = ctx.err()
    assert isinstance(err, Cancelled) and isinstance(err, InferenceError)
    assert ctx.err() is err  # stable once ended
    ctx.cancel()  # idempotent
    assert ctx.err() is err
    assert not Context.background().done()  # the parent is untouched


def test_child_follows_parent_cancel_but_not_the_reverse() -> None:
    parent = Context.background().with_cancel()
    child = parent.with_cancel()
    grandchild = child.with_timeout(60)
    sibling = parent.with_cancel()
    sibling.cancel()
    assert sibling.done() and not parent.done() and not child.done()
    parent.cancel()
    assert child.done() and grandchild.done()
    assert isinstance(child.err(), Cancelled) and isinstance(grandchild.err(), Cancelled)


def test_with_timeout_expires_with_deadline_exceeded() -> None:
    ctx = Context.background().with_timeout(0.05)
    assert ctx.deadline is not None and ctx.deadline > time.monotonic() - 1
    assert not ctx.done()
    assert ctx.wait(5.0) is True  # returns once the deadline passes
    err = ctx.err()
    assert isinstance(err, DeadlineExceeded)
    assert isinstance(err, TimeoutError) and isinstance(err, InferenceError)
    with pytest.raises(DeadlineExceeded):
        ctx.raise_if_done()


def test_child_of_expired_parent_is_done() -> None:
    parent = Context.background().with_timeout(0.05)
    child = parent.with_cancel()
    assert child.wait(5.0)
    assert isinstance(child.err(), DeadlineExceeded)


def test_child_deadline_is_never_later_than_the_parents() -> None:
    parent = Context.background().with_timeout(10)
    assert parent.deadline is not None
    later = parent.with_timeout(3600)
    assert later.deadline == parent.deadline
    earlier = parent.with_timeout(1)
    assert earlier.deadline is not None and earlier.deadline < parent.deadline
    assert parent.with_cancel().deadline == parent.deadline
    far = parent.with_deadline(time.monotonic() + 10_000)
    assert far.deadline == parent.deadline
    # and through a cancel-only middle generation
    assert parent.with_cancel().with_timeout(3600).deadline == parent.deadline


def test_raise_if_done_raises_the_right_kind() -> None:
    ctx = Context.background().with_cancel()
    ctx.raise_if_done()
    ctx.cancel()
    with pytest.raises(Cancelled):
        ctx.raise_if_done()
    past = Context.background().with_deadline(time.monotonic() - 1)
    with pytest.raises(DeadlineExceeded):
        past.raise_if_done()


def test_wait_returns_false_on_timeout_and_true_when_cancelled_from_another_thread() -> None:
    ctx = Context.background().with_cancel()
    assert ctx.wait(0.01) is False
    started = threading.Event()

    def cancel_later() -> None:
        started.wait()
        ctx.cancel()

    t = threading.Thread(target=cancel_later)
    t.start()
    started.set()
    assert ctx.wait(10.0) is True
    t.join()
    assert isinstance(ctx.err(), Cancelled)


def test_wait_sees_parent_cancel() -> None:
    parent = Context.background().with_cancel()
    child = parent.with_cancel()
    t = threading.Timer(0.01, parent.cancel)
    t.start()
    assert child.wait(10.0) is True
    t.join()


def test_repr() -> None:
    assert repr(Context.background()) == "Context.background()"
    ctx = Context.background().with_cancel()
    assert "active" in repr(ctx)
    ctx.cancel()
    assert "done" in repr(ctx)


def test_nan_timeout_is_rejected() -> None:
    with pytest.raises(ValueError, match="deadline"):
        Context.background().with_timeout(float("nan"))
    with pytest.raises(ValueError, match="deadline"):
        Context.background().with_cancel().with_deadline(float("nan"))


def test_negative_timeout_is_already_expired() -> None:
    ctx = Context.background().with_timeout(-1)
    assert ctx.done() and isinstance(ctx.err(), DeadlineExceeded)
