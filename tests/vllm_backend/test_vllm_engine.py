"""The ``vllm`` backend beyond the contract suite: aborts inside the engine, seeds, tensor
parallel, refused settings, and a close that leaves no process or socket behind (vLLM's CPU
build)."""

from __future__ import annotations

import multiprocessing.resource_tracker
import os
import re
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from core_inference import Context, ModelLoadError
from core_inference.errors import Cancelled

from .conftest import CONTEXT

PROMPT = "One two three"
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")  # vLLM's socket names


def load(folder: Path, **kw: Any) -> Any:
    """The tiny model in float32: vLLM's CPU build runs bfloat16 (its default here) through
    Intel AMX where the CPU lists it, and in the Xeon VM we test on AMX gave a SIGILL at
    ``tilezero`` or tokens that changed from run to run (tensor parallel and seeds differed)."""
    from core_inference.backends.vllm import VllmBackend

    kw.setdefault("context_len", CONTEXT)
    kw["engine_options"] = {"dtype": "float32", **kw.get("engine_options", {})}
    return VllmBackend().load_model(folder, **kw)


def children() -> set[int]:
    """This process's descendants, less multiprocessing's resource tracker (Python's own
    helper, started by the first spawn, which lives as long as this process)."""
    import psutil

    tracker = getattr(multiprocessing.resource_tracker._resource_tracker, "_pid", None)
    return {p.pid for p in psutil.Process().children(recursive=True) if p.pid != tracker}


def settles(check: Any, seconds: float = 10.0) -> bool:
    """True once ``check()`` is, polling: closing a stream aborts its request on the
    engine's loop without making the caller wait for it."""
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.fixture(scope="module")
def before() -> set[int]:
    return children()


@pytest.fixture(scope="module")
def sockets_before() -> set[str]:
    return temp_sockets()


@pytest.fixture(scope="module")
def model(vllm_tiny: Path, before: set[int], sockets_before: set[str]) -> Iterator[Any]:
    m = load(vllm_tiny, parallel_slots=2)
    try:
        yield m
    finally:
        m.close()


def test_engine_processes_run_beside_us(model: Any, before: set[int]) -> None:
    import psutil

    names = {psutil.Process(pid).name() for pid in children() - before}
    assert any("EngineCore" in n for n in names), names


def test_leaving_a_stream_aborts_the_request_inside_vllm(model: Any) -> None:
    stream = model.generate(PROMPT, max_tokens=10_000)
    got = [next(stream), next(stream)]
    assert len(got) == 2
    assert model.engine_stats()["running"] == 1  # the scheduler runs it
    stream.close()
    assert stream.finish_reason == "cancelled"
    assert settles(lambda: model.engine_stats()["unfinished"] == 0)  # gone from the front end
    # ... and from the engine's scheduler: while another request runs, it runs alone
    model.clear_running_history()
    assert len(list(model.generate(PROMPT, max_tokens=8))) == 8
    history = model.running_history()
    assert history and max(history) == 1, history


def test_cancel_by_context_aborts_too(model: Any) -> None:
    ctx = Context.background().with_cancel()
    stream = model.generate(PROMPT, max_tokens=10_000, ctx=ctx)
    with pytest.raises(Cancelled):
        for i, _tok in enumerate(stream):
            if i == 1:
                ctx.cancel()
    assert settles(lambda: model.engine_stats()["unfinished"] == 0)
    model.clear_running_history()
    list(model.generate(PROMPT, max_tokens=4))
    assert max(model.running_history()) == 1


def test_seeded_sampling_repeats_and_options_reach_vllm(model: Any) -> None:
    opts = dict(max_tokens=16, temperature=1.5, top_k=50, top_p=0.95, repeat_penalty=1.1)
    first = [t.id for t in model.generate(PROMPT, seed=7, **opts)]
    assert [t.id for t in model.generate(PROMPT, seed=7, **opts)] == first
    others = {tuple(t.id for t in model.generate(PROMPT, seed=s, **opts)) for s in (8, 9, 10)}
    assert others - {tuple(first)}, "different seeds gave the same tokens every time"
    greedy = [t.id for t in model.generate(PROMPT, max_tokens=16)]
    assert [t.id for t in model.generate(PROMPT, max_tokens=16, top_k=1, temperature=1.0, seed=3)] == greedy


def test_a_slow_reader_gets_the_same_tokens(model: Any) -> None:
    """A reader slower than the engine gets several ids per vLLM delta: each still comes as
    its own token with its own text, the same as a fast reader's."""
    fast = list(model.generate(PROMPT, max_tokens=24))
    slow = []
    for tok in model.generate(PROMPT, max_tokens=24):
        slow.append(tok)
        time.sleep(0.05)
    assert slow == fast


def test_metrics_come_from_vllm_request_stats(model: Any) -> None:
    stream = model.generate(PROMPT, max_tokens=8)
    list(stream)
    m = stream.metrics
    assert m.generated_tokens == 8 and m.prompt_tokens == len(model.tokenize(PROMPT))
    assert 0 < m.prefill_duration < m.total_duration and 0 < m.decode_duration < m.total_duration
    assert m.decode_tokens_per_sec > 0


def test_context_full(model: Any) -> None:
    prompt_len = len(model.tokenize(PROMPT))
    stream = model.generate(PROMPT, max_tokens=10_000)
    tokens = list(stream)
    assert stream.finish_reason in ("context_full", "end_of_text")
    if stream.finish_reason == "context_full":
        assert len(tokens) == CONTEXT - prompt_len


def test_batch_is_one_submission(model: Any) -> None:
    prompts = [PROMPT, "Hello", "Bonjour le monde", "Numbers: 0 1 2"]
    model.clear_running_history()
    results = model.batch_generate(prompts, max_tokens=24)
    assert all(r.err is None and len(r.tokens) > 0 for r in results)
    assert max(model.running_history()) == 2  # max_num_seqs=2: vLLM ran them side by side


@pytest.mark.parametrize(
    ("options", "words"),
    [
        # Ray is installed beside vLLM (the Makefile): the refusal is vLLM's own, for this platform
        ({"distributed_executor_backend": "ray"}, "does not support ray"),
        # more ranks than this machine's one NUMA node can bind
        ({"tensor_parallel_size": 4, "cpu_threads_bind": "auto"}, "NUMA"),
        ({"engine_args": {"no_such_argument": 1}}, "no_such_argument"),
    ],
)
def test_refused_settings_are_load_errors_with_vllm_reason(
    vllm_tiny: Path, before: set[int], options: dict[str, Any], words: str
) -> None:
    running = children()
    began = time.monotonic()
    with pytest.raises(ModelLoadError) as err:
        load(vllm_tiny, engine_options=options)
    took = time.monotonic() - began
    print(f"\n{options}: refused in {took:.1f} s: {str(err.value)[-160:]}")
    assert words.lower() in str(err.value).lower(), str(err.value)
    assert took < 120  # refused at start-up, not a hang (a load that works takes 50 to 60 s here)
    assert err.value.path == str(vllm_tiny)
    assert settles(lambda: not children() - running), "a refused load left a process behind"


def test_our_own_option_errors(vllm_tiny: Path) -> None:
    with pytest.raises(TypeError, match="unknown option"):
        load(vllm_tiny, engine_options={"tensor_parallel": 2})
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        load(vllm_tiny, engine_options={"tensor_parallel_size": 0})


def test_more_ranks_than_cores_named_by_hand_is_refused_before_vllm_starts(vllm_tiny: Path) -> None:
    """vLLM binds a rank to a CPU that does not exist without a word (4 ranks then share this
    machine's cores): a CPU the process cannot run on is refused first, by name."""
    cpus = len(os.sched_getaffinity(0))
    bind = "|".join(str(i) for i in range(cpus + 2))
    running = children()
    refused = f"names CPUs {cpus}, {cpus + 1} that this process cannot run on"
    with pytest.raises(ModelLoadError, match=refused):
        load(vllm_tiny, engine_options={"tensor_parallel_size": cpus + 2, "cpu_threads_bind": bind})
    with pytest.raises(ModelLoadError, match="expected CPU numbers"):
        load(vllm_tiny, engine_options={"cpu_threads_bind": "zero|one"})
    assert children() == running


def test_tensor_parallel_2_gives_the_same_greedy_tokens(
    model: Any, vllm_tiny: Path, before: set[int]
) -> None:
    prompts = [PROMPT, "Hello", "Bonjour le monde"]
    alone = [[t.id for t in model.generate(p, max_tokens=16)] for p in prompts]
    tp = load(vllm_tiny, engine_options={"tensor_parallel_size": 2, "cpu_threads_bind": "0|1"})
    try:
        import psutil

        workers = [p for p in children() - before if "Worker" in psutil.Process(p).name()]
        assert len(workers) >= 3, workers  # the shared model's worker and two ranks
        assert [[t.id for t in tp.generate(p, max_tokens=16)] for p in prompts] == alone
    finally:
        tp.close()


def temp_sockets() -> set[str]:
    """Unix sockets in the system temp folder (where vLLM puts its ZeroMQ ones unless told)."""
    with os.scandir(tempfile.gettempdir()) as entries:
        return {e.name for e in entries if stat.S_ISSOCK(e.stat(follow_symlinks=False).st_mode)}


def test_close_leaves_no_process_or_socket_behind(
    model: Any, before: set[int], sockets_before: set[str]
) -> None:
    assert children() - before
    folder = Path(model._rpc_dir)
    assert any(p.is_socket() for p in folder.iterdir())  # vLLM's sockets are in the model's folder
    model.close()
    assert children() - before == set()
    assert not folder.exists()
    assert not {s for s in temp_sockets() - sockets_before if _UUID.fullmatch(s)}


def test_a_process_that_never_closes_its_model_exits_cleanly(vllm_tiny: Path) -> None:
    """Left to the interpreter's teardown, vLLM's ``AsyncLLM.__del__`` raised TypeError (its
    modules half gone); the core's exit hook closes the model first."""
    import subprocess
    import sys

    code = (
        "from core_inference.backends.vllm import VllmBackend\n"
        f"m = VllmBackend().load_model({str(vllm_tiny)!r}, context_len={CONTEXT}, "
        "engine_options={'dtype': 'float32'})\n"
        "print(len(list(m.generate('Hello', max_tokens=3))), flush=True)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "3" in result.stdout.splitlines(), result.stdout[-3000:]  # vLLM logs to stdout too
    assert "Exception ignored" not in result.stderr, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]


def test_engine_args_ask_for_raw_logits_unless_told_otherwise() -> None:
    """classify's logits need logprobs_mode="raw_logits" and max_logprobs=-1 (engine-wide);
    engine_args may override them, and vLLM's batch-sharded sampling refuses max_logprobs=-1."""
    from core_inference.backends.vllm.model import LOGITS_MODE, engine_args
    from core_inference.types import LoadConfig

    def args(**extra: Any) -> dict[str, Any]:
        return engine_args("/m", LoadConfig(engine_options={"engine_args": extra}), CONTEXT, True)

    assert (args()["logprobs_mode"], args()["max_logprobs"]) == (LOGITS_MODE, -1) == ("raw_logits", -1)
    assert args(logprobs_mode="raw_logprobs")["logprobs_mode"] == "raw_logprobs"
    assert args(max_logprobs=20)["max_logprobs"] == 20
    sharded = args(enable_batch_sharded_sampling=True)
    assert "logprobs_mode" not in sharded and "max_logprobs" not in sharded
