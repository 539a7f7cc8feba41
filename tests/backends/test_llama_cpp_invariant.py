"""``engine_options={"batch_invariant": True}``: every answer is the prompt's alone, with every
kind of sharing on (streams decoded together, packed classify and batch_generate, prefixes
copied between sequences), on the default model. Each check runs in a fresh interpreter
(``invariant_probe.py``): the option switches a llama.cpp kernel off for the whole process,
which must happen before its first decode."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

PROBE = Path(__file__).with_name("invariant_probe.py")


def _probe(model_path: Path, what: str) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k != "GGML_CPU_TILED_MM"}
    done = subprocess.run(
        [sys.executable, str(PROBE), str(model_path), what],
        capture_output=True, text=True, env=env, timeout=900, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


@pytest.fixture(scope="module")
def answers(model_path: Path) -> dict[str, Any]:
    return _probe(model_path, "answers")


def test_packed_and_concurrent_answers_equal_the_prompt_alone(answers: dict[str, Any]) -> None:
    lengths, alone = answers["lengths"], answers["alone"]
    assert min(lengths) == 1 and max(lengths) > 512  # BOS alone, and past the prefill step
    assert answers["batch_generate"] == alone
    assert answers["concurrent"] == alone
    assert answers["classify_tokens"] == [a[0] for a in alone]
    assert all(answers["classify_logits_equal"])  # bit for bit


def test_prefixes_are_reused_and_answers_stay_the_prompt_alone(answers: dict[str, Any]) -> None:
    # the same prompt again: all but its last two tokens come from the cache
    tokens, cached = answers["twice"]
    assert tokens == answers["alone"][-1]
    assert cached == answers["lengths"][-1] - 2
    # three chats behind one system prompt: the second and third copy it from the first
    assert answers["chat"] == answers["chat_alone"]
    assert answers["chat_cached"][0] < 10 and min(answers["chat_cached"][1:]) > 150, answers["chat_cached"]
    # the next turn reuses the previous turn's prompt and its answer: the answer's rows were
    # decoded one at a time, and the one-row attention kernel gives them what a prefill gives
    assert answers["second"] == answers["second_alone"]
    assert answers["second_cached"] > answers["first_turn_prompt"] > 150, answers["second_cached"]
    # the same for prompts of 5 to 600 words continued after their 24-token answers
    assert answers["nexts"] == answers["nexts_alone"]
    cached, firsts = answers["nexts_cached"], answers["firsts_tokens"]
    assert all(c > f for c, f in zip(cached, firsts, strict=True)), (cached, firsts)
    # classify and batch_generate behind one instruction: it is decoded once and copied
    assert answers["behind_batch"] == answers["behind_alone"]
    assert answers["behind_tokens"] == [a[0] for a in answers["behind_alone"]]
    assert all(answers["behind_logits_equal"])
    assert answers["behind_cached"] >= 4 * 100, answers["behind_cached"]  # the 4 copies


def test_chunks_ride_in_the_streams_decode_and_gaps_are_filled_without_changing_answers(
    answers: dict[str, Any],
) -> None:
    # the concurrent section's starting streams: their prefill chunks shared a decode
    assert answers["packed"] > 0
    # short streams ended between two long ones: filler rows kept the long ones' decodes one
    # micro-batch, and every answer is still the prompt's alone
    uneven = answers["uneven"]
    assert uneven["filled"] > 0
    assert uneven["out"] == answers["uneven_alone"]
    # the short ones' sequences kept their prompts through the filler rows: read again, same answer
    assert uneven["again"] == answers["uneven_alone"][1:3]
    assert min(uneven["cached"]) > 0, uneven["cached"]


def test_asked_for_after_a_decode_it_is_refused_naming_the_switch(model_path: Path) -> None:
    error = _probe(model_path, "late")["error"]
    assert error is not None and "GGML_CPU_TILED_MM=0" in error and "batch_invariant" in error
