"""``core_inference.distributed`` on a real local Ray cluster with llama.cpp replicas of the default model.

One cluster for the module, on 127.0.0.1, its session files in a folder of its own that
is removed afterwards; Ray's auth token is given in the environment, so nothing is written
to the home folder. Never ``ray stop``: it would kill every Ray process on the machine.
"""

from __future__ import annotations

import os
import pickle
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from core_inference import (
    BackendUnavailable,
    BatchResult,
    Cancelled,
    ContextLengthExceeded,
    ModelLoadError,
    TextModel,
    load_model,
)

pytest.importorskip("ray", reason="needs core-inference[ray]")
pytest.importorskip("llama_cpp", reason="the replicas run llama.cpp")

from core_inference import distributed

PROMPTS = ["The capital of France is", "Once upon a time", "def fib(n):", "Water boils at", "1, 2, 3,"]
TOKENS = 6


@pytest.fixture(scope="module")
def cluster(default_model_file: Path) -> Iterator[Any]:
    """A local cluster of 4 logical CPUs: the module's pool holds 2, one-call pools take the other 2."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("RAY_AUTH_MODE", raising=False)  # ray.init sets it to "token"; undone afterwards
        mp.setenv("RAY_AUTH_TOKEN", secrets.token_hex(16))  # no ~/.ray/auth_token written
        mp.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback addresses for every process
        import ray._private.ray_constants as constants

        mp.setattr(constants, "ENABLE_RAY_CLUSTER", False)  # read at import; ray may be imported already
        with distributed.local_cluster(num_cpus=4) as ray:
            session = Path(ray._private.worker._global_node.get_session_dir_path())
            assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")
            yield ray
        assert not session.parent.exists(), "the cluster's session folder was left behind"
    _no_ray_children()


def _no_ray_children() -> None:
    import psutil

    deadline = time.monotonic() + 20
    while True:
        left = [p for p in psutil.Process().children(recursive=True)
                if any(k in _name(p) for k in ("ray", "gcs_server"))]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert not left, f"Ray processes left running: {[_name(p) for p in left]}"


def _name(p: Any) -> str:
    try:
        return str(p.name())
    except Exception:
        return ""


@pytest.fixture(scope="module")
def pool(cluster: Any) -> Iterator[distributed.Pool]:
    with distributed.Pool(replicas=2, threads=1) as p:
        yield p


@pytest.fixture(scope="module")
def local(default_model_file: Path) -> Iterator[TextModel]:
    """The same model in this process: what the replicas must agree with."""
    with load_model(default_model_file, backend="llama_cpp", threads=1) as m:
        yield m


def _one_process(model: TextModel, prompts: list[str], chunk_size: int, **kw: Any) -> list[BatchResult]:
    """``batch_generate`` in this process on the same chunks the replicas get.

    llama.cpp's batched decoding is not bit-identical across batch shapes (greedy text can
    part at a near tie when other prompts share the batch), so each chunk is compared with
    the same chunk decoded here.
    """
    out: list[BatchResult] = []
    for start in range(0, len(prompts), chunk_size):
        out.extend(model.batch_generate(prompts[start : start + chunk_size], **kw))
    return out


def _same(a: list[BatchResult], b: list[BatchResult]) -> None:
    assert [[t.id for t in r.tokens] for r in a] == [[t.id for t in r.tokens] for r in b]
    assert [r.text for r in a] == [r.text for r in b]
    assert [r.finish_reason for r in a] == [r.finish_reason for r in b]
    assert all(r.err is None for r in a)


def test_batch_generate_matches_one_process(pool: distributed.Pool, local: TextModel) -> None:
    want = _one_process(local, PROMPTS, 2, max_tokens=TOKENS)
    got = pool.batch_generate(PROMPTS, max_tokens=TOKENS, chunk_size=2, progress=False)
    _same(got, want)
    assert all(len(r.tokens) == TOKENS for r in got)


def test_classify_matches_one_process(pool: distributed.Pool, local: TextModel) -> None:
    want = local.classify(PROMPTS)
    got = pool.classify(PROMPTS, chunk_size=2, progress=False)
    assert [r.token for r in got] == [r.token for r in want]
    assert [r.prompt_tokens for r in got] == [r.prompt_tokens for r in want]


def test_one_call_form_on_the_running_cluster(cluster: Any, local: TextModel) -> None:
    """The module function: a pool of its own on the cluster this process is connected to."""
    from core_inference import with_max_tokens

    got = distributed.batch_generate(
        PROMPTS[:3], with_max_tokens(TOKENS), replicas=2, chunk_size=1, progress=False
    )
    _same(got, _one_process(local, PROMPTS[:3], 1, max_tokens=TOKENS))
    assert cluster.is_initialized()  # a cluster it did not start is left running


def test_a_replica_killed_mid_run_costs_no_prompt(
    pool: distributed.Pool, local: TextModel, cluster: Any, caplog: pytest.LogCaptureFixture
) -> None:
    prompts = [f"{p} ({i})" for i, p in enumerate(PROMPTS + PROMPTS[:3])]
    want = _one_process(local, prompts, 1, max_tokens=16)
    victim = pool.actors[0]
    before = cluster.get(victim.ready.remote())[2]  # "host pid N"
    stream = pool.batch_generate_unordered(prompts, max_tokens=16, chunk_size=1, progress=False)
    got = [next(stream)]  # both replicas now run a chunk (the next one is sent before a result is given)
    cluster.kill(victim, no_restart=False)  # Ray restarts it; its chunk is lost
    got.extend(stream)
    assert sorted(i for i, _ in got) == list(range(len(prompts)))
    _same([r for _, r in sorted(got, key=lambda x: x[0])], want)
    assert "died running a chunk" in caplog.text
    # the killed replica came back (restarted, model loaded again) and serves the next call
    assert pool.classify(PROMPTS, chunk_size=1, progress=False)[0].err is None
    assert len(pool.actors) == 2 and _ready(cluster, victim) != before  # a new process, same replica


def _ready(ray: Any, actor: Any) -> str:
    """Where a replica runs, once Ray has it up again (it may still be restarting)."""
    for _ in range(300):
        try:
            status, _, where = ray.get(actor.ready.remote())
            assert status == "ok"
            return str(where)
        except ray.exceptions.ActorUnavailableError:
            time.sleep(0.2)
    raise AssertionError("the replica did not come back")


def test_a_replica_gone_for_good_leaves_the_pool(cluster: Any, caplog: pytest.LogCaptureFixture) -> None:
    with distributed.Pool(replicas=2, threads=1) as two:
        stream = two.batch_generate_unordered(PROMPTS * 2, max_tokens=8, chunk_size=1, progress=False)
        got = [next(stream)]
        cluster.kill(two.actors[1], no_restart=True)  # a node lost for good
        got.extend(stream)
        assert sorted(i for i, _ in got) == list(range(len(PROMPTS) * 2))
        assert all(r.err is None for _, r in got)
        assert len(two.actors) == 1 and "gone for good" in caplog.text


def test_unordered_yields_every_index_once(cluster: Any) -> None:
    seen = [i for i, r in distributed.classify_unordered(
        PROMPTS * 2, replicas=2, chunk_size=1, progress=False) if r.err is None]
    assert sorted(seen) == list(range(len(PROMPTS) * 2))


def test_progress_goes_to_stderr(pool: distributed.Pool, capsys: pytest.CaptureFixture[str]) -> None:
    pool.classify(PROMPTS, chunk_size=2)
    out, err = capsys.readouterr()
    assert f"{len(PROMPTS)}/{len(PROMPTS)} prompts" in err and not out
    pool.classify(PROMPTS, progress=False)
    assert capsys.readouterr() == ("", "")
    seen: list[tuple[int, int]] = []
    pool.classify(PROMPTS, chunk_size=2, progress=lambda done, total: seen.append((done, total)))
    assert seen[0] == (0, 5) and seen[-1] == (5, 5)


def test_cancel_stops_the_run_and_the_pool_goes_on(pool: distributed.Pool) -> None:
    from core_inference import Context

    ctx = Context.background().with_cancel()
    stream = pool.batch_generate_unordered(PROMPTS * 4, max_tokens=64, chunk_size=1, progress=False, ctx=ctx)
    next(stream)
    ctx.cancel()
    with pytest.raises(Cancelled):
        list(stream)
    assert pool.classify(PROMPTS[:2], progress=False)[1].err is None


def test_a_deadline_ends_the_run_on_the_replicas_too(pool: distributed.Pool, cluster: Any) -> None:
    from core_inference import Context, DeadlineExceeded, GenerateConfig

    ctx = Context.background().with_timeout(1.0)  # far less than 20 prompts x 200 tokens take
    with pytest.raises(DeadlineExceeded):
        pool.batch_generate(PROMPTS * 4, max_tokens=200, chunk_size=2, progress=False, ctx=ctx)
    # a replica is sent the seconds left, not the Context: none left ends its call at once
    status, err, _ = cluster.get(pool.actors[1].run.remote(0, "batch_generate", ["x"], GenerateConfig(), 0.0))
    assert status == "error" and isinstance(err, DeadlineExceeded)
    assert pool.classify(PROMPTS[:2], progress=False)[0].err is None


CONNECT = """
import sys, psutil, ray
from core_inference import distributed
prompt = ["Water boils at"]
there = distributed.classify(prompt, address=sys.argv[1], replicas=1, progress=False)
print("address", there[0].err is None, ray.is_initialized())
here = distributed.classify(prompt, replicas=1, progress=False)   # a local cluster of its own
print("local", here[0].token == there[0].token, ray.is_initialized())
"""


def test_by_address_and_on_a_cluster_of_its_own(cluster: Any, pool: distributed.Pool) -> None:
    """In a fresh process: connect to the module's cluster by address (left running), then start,
    use and stop a local cluster (its session folder removed)."""
    address = cluster.get_runtime_context().gcs_address
    root = tempfile.mkdtemp(prefix="cit-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    try:
        env = {**os.environ, "RAY_TMPDIR": root,
               "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
        out = subprocess.run([sys.executable, "-c", CONNECT, address], capture_output=True, text=True,
                             env=env, timeout=300)
        assert out.returncode == 0, out.stderr
        assert out.stdout.split("\n")[:2] == ["address True False", "local True False"], out.stdout
        assert os.listdir(root) == [], "the local cluster's session folder was left behind"
    finally:
        shutil.rmtree(root, ignore_errors=True)
    assert pool.classify(PROMPTS[:1], progress=False)[0].err is None  # the module's cluster still runs


def test_a_model_that_fails_to_load_is_a_model_load_error(cluster: Any, tmp_path: Path) -> None:
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)  # a header and nothing after it
    with pytest.raises(ModelLoadError) as caught:
        distributed.classify(["x"], model=bad, replicas=1, progress=False)
    assert "replica 0 of 1" in str(caught.value) and str(bad) in str(caught.value)
    assert isinstance(caught.value.__cause__, ModelLoadError)


def test_a_prompt_too_long_fails_alone_and_its_error_crosses_over(cluster: Any) -> None:
    """A load option reaches the replica; a per-prompt error comes back with its attributes."""
    from core_inference import with_context_len

    out = distributed.batch_generate(["Hello", "word " * 200], with_context_len(64), replicas=1,
                                     max_tokens=2, progress=False)
    assert out[0].err is None and len(out[0].tokens) == 2
    err = out[1].err
    assert isinstance(err, ContextLengthExceeded) and err.requested > err.limit > 0, repr(err)


def test_ray_missing_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    with pytest.raises(BackendUnavailable) as caught:
        distributed.batch_generate(["x"], max_tokens=1)
    assert "pip install 'core-inference[ray]'" in str(caught.value)
    assert isinstance(caught.value.__cause__, ImportError)


def test_importing_does_not_import_ray() -> None:
    code = "import sys, core_inference, core_inference.distributed; print('ray' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "False"


def test_results_with_errors_cross_processes() -> None:
    """An error whose __init__ takes more than a message survives the trip (pickle alone fails)."""
    result = BatchResult(err=ContextLengthExceeded(100, 32), finish_reason="error")
    back = pickle.loads(pickle.dumps(distributed._portable_result(result)))
    assert isinstance(back.err, ContextLengthExceeded)
    assert (back.err.requested, back.err.limit, str(back.err)) == (100, 32, str(result.err))


def test_the_one_call_forms_share_one_signature() -> None:
    """The four module calls take the same parameters (written once, ``_one_call``), as
    ``help()`` and ``inspect`` show them; a wrong option fails before any cluster starts."""
    import inspect

    calls = (distributed.batch_generate, distributed.classify, distributed.batch_generate_unordered,
             distributed.classify_unordered)
    shapes = {tuple(inspect.signature(f).parameters.values()) for f in calls}
    assert len(shapes) == 1
    names = list(inspect.signature(distributed.classify).parameters)
    assert names[:3] == ["prompts", "opts", "model"] and names[-1] == "generate_options"
    assert {"replicas", "threads", "backend", "address", "chunk_size", "progress", "ctx"} <= set(names)
    assert inspect.signature(distributed.classify).return_annotation == "list[ClassifyResult]"
    import ray

    was = ray.is_initialized()
    for call in calls:
        with pytest.raises(ValueError, match="max_tokens"):
            call(["x"], max_tokens=-1)
        with pytest.raises(TypeError):
            call(["x"], 3)  # not an option
    assert ray.is_initialized() == was  # checked here: no cluster was started for them
