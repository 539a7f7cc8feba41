"""llama.cpp: each call's own result and metrics, checked against a wall clock; the defects
found when the library was tried as a demanding user would, each pinned by a test."""

from __future__ import annotations

import ctypes
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import core_inference as ci
from core_inference.backends.llama_cpp import LlamaCppBackend
from core_inference.backends.llama_cpp.model import LlamaCppModel

PROMPT = "The capital of France is"
LONG = " ".join(f"Paragraph {i} says that the river is long and the valley is green." for i in range(40))


@pytest.fixture(scope="module")
def model(model_path: Path) -> Iterator[LlamaCppModel]:
    m = LlamaCppBackend().load_model(model_path, parallel_slots=4, context_len=2048)
    assert isinstance(m, LlamaCppModel)
    yield m
    m.close()


# -- metrics that are true --------------------------------------------------------------


def test_a_slow_consumer_does_not_slow_the_reported_decode(model: LlamaCppModel) -> None:
    fast = model.generate(PROMPT, max_tokens=16)
    list(fast)
    slow = model.generate(PROMPT, max_tokens=16)
    began = time.perf_counter()
    for _ in slow:
        time.sleep(0.1)
    wall = time.perf_counter() - began
    assert slow.finish_reason == "length"
    assert slow.metrics.total_duration == pytest.approx(wall, rel=0.1)
    assert slow.metrics.decode_duration < wall - 1.2  # 1.5 s of it was the consumer's
    ratio = slow.metrics.decode_tokens_per_sec / fast.metrics.decode_tokens_per_sec
    assert 0.25 < ratio < 4, (slow.metrics, fast.metrics)  # the engine's speed either way


def test_one_streams_prefill_is_not_charged_with_anothers(model: LlamaCppModel) -> None:
    results: dict[str, ci.GenerateMetrics] = {}
    started = threading.Event()

    def run(name: str, prompt: str) -> None:
        stream = model.generate(prompt, max_tokens=4)
        if name == "long":
            started.set()
        list(stream)
        results[name] = stream.metrics

    long = threading.Thread(target=run, args=("long", LONG))
    long.start()
    started.wait(30)
    time.sleep(0.05)  # the long prefill is under way
    run("short", PROMPT)
    long.join(120)
    short_m, long_m = results["short"], results["long"]
    assert short_m.prompt_tokens < 10 < long_m.prompt_tokens
    assert short_m.prefill_duration < long_m.prefill_duration / 4, (short_m, long_m)
    assert short_m.time_to_first_token >= short_m.prefill_duration  # the wait is in the TTFT


def test_batch_generate_past_64_prompts_reports_its_real_decode_time(model: LlamaCppModel) -> None:
    prompts = [f"Item {i}: the colour of the sky is" for i in range(130)]
    began = time.perf_counter()
    results = model.batch_generate(prompts, max_tokens=8)
    wall = time.perf_counter() - began
    m = model.metrics()
    assert m.total_duration == pytest.approx(wall, rel=0.1)
    assert m.prefill_duration + m.decode_duration <= m.total_duration * 1.01
    assert m.decode_duration > wall / 3  # most of the call is decoding, for all 130 prompts
    generated = sum(len(r.tokens) for r in results)
    assert m.generated_tokens == generated
    assert m.decode_tokens_per_sec <= generated / m.decode_duration
    assert 0 < m.time_to_first_token < m.total_duration
    assert m.peak_memory_bytes > 0 and m.active_memory_bytes > 0
    assert all(r.metrics.time_to_first_token > 0 for r in results if r.tokens)


def test_classify_reports_time_to_first_token_and_memory(model: LlamaCppModel) -> None:
    results = model.classify([PROMPT, "Hello there", LONG])
    m = model.metrics()
    assert 0 < m.time_to_first_token <= m.total_duration
    assert m.peak_memory_bytes > 0 and m.prompt_tokens == sum(r.prompt_tokens for r in results)
    assert [r.finish_reason for r in results] == ["length"] * 3


# -- finish reasons on the real engine ----------------------------------------------------


def test_finish_reasons(model_path: Path) -> None:
    with LlamaCppBackend().load_model(model_path, context_len=64) as small:
        stream = small.generate("Once upon a time", max_tokens=500)
        tokens = list(stream)
        assert stream.finish_reason == "context_full"
        assert stream.prompt_tokens + len(tokens) == 64
        [res] = small.batch_generate(["Once upon a time"], max_tokens=500)
        assert res.finish_reason == "context_full" and [t.id for t in res.tokens] == [t.id for t in tokens]


# -- defects found when tried as a demanding user would ----------------------------------


def test_batch_generate_stops_only_on_stop_strings_in_the_text(model: LlamaCppModel) -> None:
    """Found: the early stop check decoded each token alone and dropped split characters,
    so "x𓀏y" read as "xy" and stopped a prompt that never produced "xy"."""
    prompt = "x𓀏y " * 8
    alone = model.generate(prompt, max_tokens=24, stop=["xy"])
    want = list(alone)
    [res] = model.batch_generate([prompt], max_tokens=24, stop=["xy"])
    assert [t.id for t in res.tokens] == [t.id for t in want]
    assert res.finish_reason == alone.finish_reason
    assert "xy" not in res.text


def test_seeds_do_not_alias_and_none_is_random(model: LlamaCppModel) -> None:
    def sample(seed: int) -> list[int]:
        return [t.id for t in model.generate(PROMPT, max_tokens=24, temperature=1.5, seed=seed)]

    assert sample(5) == sample(5)
    assert sample(5) != sample(2**32 + 5)
    assert sample(0xFFFFFFFF) == sample(0xFFFFFFFF)  # llama.cpp's "random" value is just a seed


def test_chat_prompt_through_generate_has_one_bos(model: LlamaCppModel) -> None:
    msgs = [ci.Message("user", "Name a colour.")]
    prompt = model.chat_prompt(msgs)
    bos = model._model.bos
    ids = model.tokenize(prompt)
    assert ids.count(bos) == 1 and ids[0] == bos
    assert model.tokenize("Hello")[0] == bos  # a plain prompt gets its BOS
    via_chat, via_generate = model.chat(msgs, max_tokens=8), model.generate(prompt, max_tokens=8)
    chat_ids = [t.id for t in via_chat]
    assert [t.id for t in via_generate][: len(chat_ids)] == chat_ids
    assert via_chat.prompt_tokens == via_generate.prompt_tokens == len(ids)


def test_role_order_errors_come_at_the_call(model: LlamaCppModel) -> None:
    with pytest.raises(ValueError, match="alternate"):
        model.chat([ci.Message("user", "a"), ci.Message("user", "b")])  # not iterated


def test_chat_prompt_after_close_raises_instead_of_reading_freed_memory(model_path: Path) -> None:
    m = LlamaCppBackend().load_model(model_path)
    m.close()
    for call in (lambda: m.chat_prompt([ci.Message("user", "hi")]), lambda: m.tokenize("x"), m.info):
        with pytest.raises(ci.ModelClosed):
            call()


def test_a_sequence_id_is_returned_when_the_sampler_fails(model: LlamaCppModel,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    free = sorted(model._free_seqs)

    def broken(*_: Any) -> Any:
        raise MemoryError("no room for a sampler")

    monkeypatch.setattr(model._engine, "Sampler", broken)
    with pytest.raises(ci.EngineError, match="out of memory"):
        list(model.generate(PROMPT, max_tokens=2))
    assert sorted(model._free_seqs) == free


def test_engine_exceptions_are_mapped_to_engine_error(model: LlamaCppModel,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    def bad_piece(_: int) -> bytes:
        raise ctypes.ArgumentError("argument 2: wrong type")

    monkeypatch.setattr(model._model, "piece", bad_piece)
    stream = model.generate(PROMPT, max_tokens=2)
    with pytest.raises(ci.EngineError) as info:
        list(stream)
    assert isinstance(info.value.__cause__, ctypes.ArgumentError)
    assert stream.finish_reason == "error" and stream.err is info.value


def test_unknown_engine_options_are_a_type_error(model_path: Path) -> None:
    with pytest.raises(TypeError, match=r"prefil_chunk.*known: batch_invariant, prefill_chunk"):
        LlamaCppBackend().load_model(model_path, engine_options={"prefil_chunk": 64})


def test_an_engine_too_old_names_the_version_needed(model_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from llama_cpp import llama_cpp as L

    monkeypatch.delattr(L, "llama_get_memory")
    with pytest.raises(ci.BackendUnavailable, match=r"0\.3\.15"):
        LlamaCppBackend().load_model(model_path)


def test_one_thread_holding_the_only_slot_gets_an_error_not_a_hang(model_path: Path) -> None:
    with LlamaCppBackend().load_model(model_path, parallel_slots=1) as m:
        stream = m.generate(PROMPT, max_tokens=100)
        next(iter(stream))
        with pytest.raises(ci.InferenceError, match="already holds all 1"):
            list(m.generate(PROMPT, max_tokens=2))
        stream.close()
        assert len(list(m.generate(PROMPT, max_tokens=2))) == 2


_INTERRUPT_LOAD = """
import signal, sys
import core_inference as ci
from core_inference.formats.validate import gguf_header
path = sys.argv[1]
gguf_header(path)  # read the header first: the interrupt lands inside llama.cpp's load
signal.signal(signal.SIGALRM, signal.default_int_handler)  # as Ctrl-C does: KeyboardInterrupt
signal.setitimer(signal.ITIMER_REAL, float(sys.argv[2]))
try:
    m = ci.load_model(path)
except KeyboardInterrupt:
    print("interrupted")
    sys.exit(130)
print("loaded")
for t in m.generate("The capital of France is", max_tokens=4):
    pass
"""


@pytest.mark.parametrize("delay", [0.02, 0.08])
def test_ctrl_c_during_a_load_stops_it(model_path: Path, delay: float) -> None:
    out = subprocess.run([sys.executable, "-c", _INTERRUPT_LOAD, str(model_path), str(delay)],
                         capture_output=True, text=True, timeout=120)
    assert "Exception ignored" not in out.stderr, out.stderr
    assert (out.returncode, out.stdout.strip()) == (130, "interrupted"), (out.stdout, out.stderr)


def test_ctrl_c_during_a_load_exits_the_cli_with_130(model_path: Path) -> None:
    code = (
        "import signal, sys\n"
        "from core_inference.cli import main\n"
        "signal.signal(signal.SIGALRM, signal.default_int_handler)\n"
        "signal.setitimer(signal.ITIMER_REAL, 0.05)\n"
        f"sys.exit(main(['generate', '-m', {str(model_path)!r}, '--max-tokens', '500', 'Hello']))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 130, (out.stdout, out.stderr)
    assert "Traceback" not in out.stderr and "Exception ignored" not in out.stderr, out.stderr


def _script(code: str, model_path: Path) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter with the model's path as its argument; it must exit 0."""
    out = subprocess.run([sys.executable, "-c", code, str(model_path)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return out


def test_a_stream_left_open_at_exit_prints_nothing(model_path: Path) -> None:
    """Found: the stream's cleanup ran at interpreter exit and read /proc with a text codec
    that was already gone ("LookupError: unknown encoding: ascii")."""
    code = (
        "import sys, core_inference as ci\n"
        "m = ci.load_model(sys.argv[1])\n"
        "s = m.generate('The capital of France is', max_tokens=100)\n"
        "next(iter(s))\n"
    )
    out = _script(code, model_path)
    assert "LookupError" not in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_a_stream_still_running_at_exit_is_told_the_process_is_exiting(model_path: Path) -> None:
    """A daemon thread's stream outlives the exit hook that stops llama.cpp's decode thread;
    its next decode said "KV cache full or bad batch" (code -1), which it was not."""
    code = (
        "import sys, core_inference as ci\n"
        "from core_inference.backends.llama_cpp import engine\n"
        "m = ci.load_model(sys.argv[1])\n"
        "s = iter(m.generate('The capital of France is', max_tokens=100))\n"
        "next(s)\n"
        "engine._DECODER._stop()  # what the exit hook does\n"
        "try:\n"
        "    next(s)\n"
        "except ci.EngineError as exc:\n"
        "    print(exc)\n"
    )
    out = _script(code, model_path)
    assert "the process is exiting" in out.stdout and "KV cache" not in out.stdout, out.stdout


def test_registering_a_backend_instance_type_checks() -> None:
    """``register(LlamaCppBackend())`` passes mypy --strict (this file is type-checked)."""
    from core_inference import registry

    backend: ci.Backend = LlamaCppBackend()
    try:
        ci.register(backend)
        ci.register(LlamaCppBackend())
        assert ci.get("llama_cpp").name == "llama_cpp"
    finally:  # the built-in, lazy again, for the tests after this one
        ci.register(registry.BUILTINS["llama_cpp"].spec, name="llama_cpp")
