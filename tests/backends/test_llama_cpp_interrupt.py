"""Ctrl-C at any moment: the llama.cpp model stays whole and its other streams go on.

Python raises ``KeyboardInterrupt`` in the main thread at whichever bytecode follows the
signal, including just after a lock was taken or a decode was handed over. These tests
send it at random moments (``_thread.interrupt_main`` from a timer, as a terminal's
Ctrl-C would) many times over, then check that nothing hangs, the model answers as
before, and streams of other threads never see it. A hang ends the run with every
thread's traceback (``faulthandler``) instead of holding CI until its limit.
"""

from __future__ import annotations

import _thread
import contextlib
import faulthandler
import os
import random
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from core_inference import GenerateConfig
from core_inference.backends.llama_cpp.model import LlamaCppModel

from .conftest import ids

STORY = "Once upon a time"
QUESTION = "The capital of France is"


@pytest.fixture(autouse=True)
def watchdog(request: pytest.FixtureRequest) -> Iterator[None]:
    """After 300 s, every thread's traceback on the real stderr, and the run ends (status 1)."""
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        stderr = os.fdopen(os.dup(2), "w")  # pytest's capture would swallow a dump on fd 2
    faulthandler.dump_traceback_later(300, exit=True, file=stderr)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()
        stderr.close()


def ctrl_c_at_random(rounds: int, within: float, body: Callable[[], object], seed: int = 0) -> int:
    """Run ``body`` ``rounds`` times, each with a Ctrl-C due at a random moment; how many it hit."""
    rng = random.Random(seed)
    hits = 0
    for _ in range(rounds):
        timer = threading.Timer(rng.uniform(0.0, within), _thread.interrupt_main)
        timer.start()
        try:
            body()
            timer.join()  # a Ctrl-C that comes after the call lands here, inside the try
            time.sleep(0.002)
        except KeyboardInterrupt:
            hits += 1
        finally:  # whatever ended the round, its Ctrl-C must not reach pytest itself
            timer.cancel()
            try:
                timer.join()
                time.sleep(0.002)
            except KeyboardInterrupt:
                pass
    return hits


def interrupt_main_beside(
    other: Callable[[], object], body: Callable[[], object], seed: int
) -> tuple[int, list[BaseException]]:
    """``other`` over and over in a thread of its own while the main thread runs ``body`` 30
    times under random Ctrl-Cs: how many Ctrl-Cs hit, and what ``other`` raised."""
    stop = threading.Event()
    errors: list[BaseException] = []

    def loop() -> None:
        while not stop.is_set():
            try:
                other()
            except Exception as exc:
                errors.append(exc)

    worker = threading.Thread(target=loop)
    worker.start()
    try:
        hits = ctrl_c_at_random(30, 0.3, body, seed=seed)
    finally:
        stop.set()
        worker.join()
    return hits, errors


def test_ctrl_c_at_any_moment_of_a_stream_leaves_the_model_whole(model: LlamaCppModel) -> None:
    cfg = GenerateConfig(max_tokens=12)
    before = ids(model.generate(QUESTION, cfg))
    hits = ctrl_c_at_random(40, 0.4, lambda: ids(model.generate(STORY, max_tokens=48)))
    assert hits > 0
    assert ids(model.generate(QUESTION, cfg)) == before


def test_ctrl_c_during_classify_and_batch_generate_leaves_the_model_whole(model: LlamaCppModel) -> None:
    prompts = [STORY * 40, "Hi", "Hello there " * 30]
    cfg = GenerateConfig(max_tokens=6)
    scores = model.classify(prompts)
    answers = [ids(r.tokens) for r in model.batch_generate(prompts, cfg)]
    hits = ctrl_c_at_random(20, 0.3, lambda: model.classify(prompts), seed=1)
    hits += ctrl_c_at_random(20, 0.3, lambda: model.batch_generate(prompts, cfg), seed=2)
    assert hits > 0
    assert model.classify(prompts) == scores
    assert [ids(r.tokens) for r in model.batch_generate(prompts, cfg)] == answers


def test_ctrl_c_in_the_main_thread_leaves_another_threads_classify_and_batch_generate_alone(
    model: LlamaCppModel,
) -> None:
    """Their decodes are jobs of the step a main-thread stream may lead: the leader gives
    the other thread its turn and waits, so a Ctrl-C meant for the stream never lands in them."""
    prompts = [STORY * 20, "Hi", "Hello there " * 30]
    cfg = GenerateConfig(max_tokens=6)
    scores = model.classify(prompts)
    answers = [ids(r.tokens) for r in model.batch_generate(prompts, cfg)]
    same: list[bool] = []

    def other() -> None:
        same.append(model.classify(prompts) == scores)
        same.append([ids(r.tokens) for r in model.batch_generate(prompts, cfg)] == answers)

    hits, errors = interrupt_main_beside(other, lambda: ids(model.generate(STORY, max_tokens=48)), seed=4)
    assert hits > 0
    assert errors == []
    assert same and all(same)


@pytest.mark.parametrize("which", ["model", "exact"])
def test_ctrl_c_in_the_main_thread_leaves_other_threads_streams_alone(
    which: str, request: pytest.FixtureRequest
) -> None:
    m: LlamaCppModel = request.getfixturevalue(which)
    cfg = GenerateConfig(max_tokens=16)
    alone = ids(m.generate(QUESTION, cfg))
    answers: list[list[int]] = []
    hits, errors = interrupt_main_beside(lambda: answers.append(ids(m.generate(QUESTION, cfg))),
                                         lambda: ids(m.generate(STORY, max_tokens=48)), seed=3)
    assert hits > 0
    assert errors == []
    assert answers
    if which == "exact":  # nothing shared: each answer is the prompt's alone
        assert all(a == alone for a in answers)
