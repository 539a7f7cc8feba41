"""The ``metal`` backend on the real MLX engine (its CPU device) and tiny random Hugging Face models.

The models are built once per session with transformers' own classes
(``tests/backends/hf_tiny.py``) in a temporary folder that is removed at the end, and
loaded with ``engine_options={"device": "cpu"}``: this machine has no Metal GPU.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest

pytest.importorskip("mlx_lm", reason="needs core-inference[mlx]")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach a model hub

import core_inference as ci
from core_inference.backends.mlx import MlxBackend, metal_problem
from core_inference.backends.mlx.model import MlxModel
from core_inference.context import Context
from core_inference.errors import BackendUnavailable, Cancelled, ModelLoadError
from core_inference.protocols import TextModel
from core_inference.registry import backend_status, list_backends
from core_inference.testing import BackendContract

from .hf_tiny import make_tiny_model

PROMPT = "The capital of France is"
PROMPTS = [PROMPT, "Hello world!", "One two three", "你好\uff0c世界。🙂", "def add(a, b):"]
CPU: dict[str, Any] = {"engine_options": {"device": "cpu"}}

_lock = threading.Lock()
_root: list[str] = []
_built: dict[str, Path] = {}


def tiny(arch: str) -> Path:
    """The session's tiny ``arch`` model folder, built on first use."""
    with _lock:
        if arch not in _built:
            if not _root:
                _root.append(tempfile.mkdtemp(prefix="core-inference-mlx-"))
            folder = make_tiny_model(Path(_root[0]) / arch, arch, seed=0)
            if arch == "gemma3_text":
                _one_global_layer(folder)
            _built[arch] = folder
        return _built[arch]


def _one_global_layer(folder: Path) -> None:
    """Make the 2-layer Gemma 3 sliding then global, as the real one's pattern is (5 + 1).

    hf_tiny's 2 layers are both sliding (transformers' pattern of 6 cut at 2), which
    mlx-lm's Gemma 3 cannot run: it reads the global mask from layer ``pattern - 1``.
    transformers reads ``layer_types``; the backend turns it into mlx-lm's pattern of 2.
    """
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config["layer_types"] = ["sliding_attention", "full_attention"]
    config["_sliding_window_pattern"] = 2
    path.write_text(json.dumps(config, indent=2))


@pytest.fixture(scope="session", autouse=True)
def _remove_tiny_models() -> Iterator[None]:
    yield
    if _root:
        shutil.rmtree(_root[0], ignore_errors=True)


def load(arch: str = "llama", **kw: Any) -> MlxModel:
    options = {"device": "cpu", **kw.pop("engine_options", {})}
    model = MlxBackend().load_model(tiny(arch), engine_options=options, **kw)
    assert isinstance(model, MlxModel)
    return model


# -- the contract suite, on both architectures ----------------------------------------------


class TestMlxLlamaContract(BackendContract):
    arch: ClassVar[str] = "llama"
    threads: ClassVar[int] = 4
    # random weights over a byte-level vocabulary: 32 tokens hold the few words the stop rules need
    max_tokens: ClassVar[int] = 32

    def load_model(self, **kw: Any) -> TextModel:
        return load(self.arch, **kw)


class TestMlxGemma3Contract(TestMlxLlamaContract):
    arch: ClassVar[str] = "gemma3_text"


# -- this backend's own rules --------------------------------------------------------------------


@pytest.fixture(scope="module", params=["llama", "gemma3_text"])
def model(request: pytest.FixtureRequest) -> Iterator[MlxModel]:
    m = load(request.param, parallel_slots=2)
    yield m
    m.close()


def ids(tokens: Any) -> list[int]:
    return [t.id for t in tokens]


def test_metal_unavailable_here_with_a_clear_reason() -> None:
    if sys.platform == "darwin":
        pytest.skip("a Mac may have Metal")
    why = MlxBackend().why_unavailable()
    assert why is not None and metal_problem() == why
    assert "Metal" in why and 'engine_options={"device": "cpu"}' in why
    assert not MlxBackend().available()
    with pytest.raises(BackendUnavailable, match="Metal") as info:
        MlxBackend().load_model(tiny("llama"))  # no device asked for: the GPU, which is not here
    assert "pip install" not in str(info.value)  # the engine is installed; the hardware is missing
    assert "metal" in list_backends()
    status = {name: (state, detail) for name, state, detail in backend_status()}
    assert status["metal"][0] == "unavailable" and "Metal" in status["metal"][1]


def test_bad_engine_options() -> None:
    with pytest.raises(ValueError, match="device"):
        MlxBackend().load_model(tiny("llama"), engine_options={"device": "tpu"})
    with pytest.raises(TypeError, match="unknown option"):
        MlxBackend().load_model(tiny("llama"), engine_options={"threads": 2})
    with pytest.raises(ValueError, match="prefill_step_size"):
        MlxBackend().load_model(tiny("llama"), engine_options={"device": "cpu", "prefill_step_size": 0})


def test_folder_checked_before_the_engine(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=r"config\.json"):
        MlxBackend().load_model(tmp_path, **CPU)


def test_gemma3_without_a_global_layer_is_a_clear_error(tmp_path: Path) -> None:
    folder = tmp_path / "g"
    shutil.copytree(tiny("gemma3_text"), folder)
    config = json.loads((folder / "config.json").read_text())
    config["layer_types"] = ["sliding_attention", "sliding_attention"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="global attention"):
        MlxBackend().load_model(folder, **CPU)


def test_text_is_whole_utf8_from_the_tokenizer_bytes(model: MlxModel) -> None:
    import codecs

    for prompt in PROMPTS:
        tokens = list(model.generate(prompt, max_tokens=24))
        raw = b"".join(model._pieces(t.id) for t in tokens)  # the bytes the engine produced
        # the bytes table says what the tokenizer says (control tokens are nothing in both)
        assert raw.decode("utf-8", "replace") == model.detokenize(ids(tokens))
        # the stream's text is those bytes decoded whole, a split character held back
        # until its last byte (and dropped if the stream ends before it)
        assert "".join(t.text for t in tokens) == codecs.getincrementaldecoder("utf-8")("replace").decode(raw)


def test_tokenize_round_trips(model: MlxModel) -> None:
    for prompt in PROMPTS:
        assert model.detokenize(model.tokenize(prompt)) == prompt
    assert model.tokenize("<s>Hi")[:1] == model.tokenize("<s>")[:1]  # no second BOS


def test_classify_is_exact_against_single_runs(model: MlxModel) -> None:
    # lengths from 3 to past Gemma's 64-token sliding window: the padding differs row by row
    prompts = [*PROMPTS, "word " * 70, "The quick brown fox jumps over the lazy dog. " * 6]
    together = model.classify(prompts, return_logits=True)
    for prompt, res in zip(prompts, together, strict=True):
        alone = model.classify([prompt], return_logits=True)[0]
        first = list(model.generate(prompt, max_tokens=1))
        assert res.err is None and res.token == alone.token
        assert res.token.id == first[0].id
        assert res.prompt_tokens == len(model.tokenize(prompt))
        assert res.logits is not None and alone.logits is not None
        assert max(abs(a - b) for a, b in zip(res.logits, alone.logits, strict=True)) < 1e-4


def test_classify_calls_one_forward_pass_per_batch(model: MlxModel, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, ...]] = []
    inner = model._model

    class Counting:
        def __getattr__(self, name: str) -> Any:
            return getattr(inner, name)

        def __call__(self, inputs: Any, cache: Any = None) -> Any:
            calls.append(tuple(inputs.shape))
            return inner(inputs, cache=cache)

    monkeypatch.setattr(model, "_model", Counting())
    model.classify(PROMPTS * 8)  # 40 prompts: two batches of at most 32
    assert [c[0] for c in calls] == [32, 8]


def test_classify_keeps_a_bad_prompt_to_itself(model: MlxModel) -> None:
    long = "word " * (model.context_len + 10)
    results = model.classify([PROMPT, long])
    assert results[0].err is None and results[1].err is not None
    assert isinstance(results[1].err, ci.ContextLengthExceeded)


def test_batch_generate_equals_generate_per_prompt(model: MlxModel) -> None:
    results = model.batch_generate(PROMPTS, max_tokens=10)
    for prompt, res in zip(PROMPTS, results, strict=True):
        alone = model.generate(prompt, max_tokens=10)
        tokens = list(alone)
        assert ids(res.tokens) == ids(tokens), prompt
        assert res.text == "".join(t.text for t in tokens)
        assert res.finish_reason == alone.finish_reason and res.prompt_tokens == alone.prompt_tokens


def test_batch_generate_stops_each_prompt_on_its_own(model: MlxModel) -> None:
    full = {p: list(model.generate(p, max_tokens=10)) for p in PROMPTS}
    stop_id = full[PROMPTS[0]][3].id
    results = model.batch_generate(PROMPTS, max_tokens=10, stop_tokens=[stop_id])
    for prompt, res in zip(PROMPTS, results, strict=True):
        alone = model.generate(prompt, max_tokens=10, stop_tokens=[stop_id])
        assert ids(res.tokens) == ids(alone)
        assert res.finish_reason == alone.finish_reason and res.stop == alone.stop
    assert results[0].finish_reason == "stop" and results[0].stop == stop_id and len(results[0].tokens) == 3
    text = "".join(t.text for t in full[PROMPTS[1]])
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    results = model.batch_generate(PROMPTS, max_tokens=10, stop=[stop])
    for prompt, res in zip(PROMPTS, results, strict=True):
        alone = model.generate(prompt, max_tokens=10, stop=[stop])
        assert [(t.id, t.text) for t in res.tokens] == [(t.id, t.text) for t in alone], prompt
        assert res.finish_reason == alone.finish_reason and res.stop == alone.stop
    assert results[1].finish_reason == "stop" and results[1].stop == stop


def test_batch_generate_cancelled_between_steps(model: MlxModel) -> None:
    ctx = Context.background().with_cancel()
    seen = 0
    pieces = model._pieces

    def counting(tid: int) -> bytes:
        nonlocal seen
        seen += 1
        if seen == 6:
            ctx.cancel()
        return pieces(tid)

    model._pieces = counting
    try:
        with pytest.raises(Cancelled):
            model.batch_generate(PROMPTS, max_tokens=50, ctx=ctx)
    finally:
        model._pieces = pieces
    assert seen < 6 + len(PROMPTS)  # it stopped at the next step, not at the end
    assert model.batch_generate([PROMPT], max_tokens=2)[0].err is None


def test_sampling_options_and_seeds(model: MlxModel) -> None:
    kw: dict[str, Any] = dict(max_tokens=16, temperature=1.5, top_k=50, top_p=0.95)
    a = ids(model.generate(PROMPT, seed=7, **kw))
    assert ids(model.generate(PROMPT, seed=7, **kw)) == a
    others = {tuple(ids(model.generate(PROMPT, seed=s, **kw))) for s in range(8, 12)}
    assert len(others | {tuple(a)}) > 1, "different seeds all gave the same tokens"
    assert ids(model.batch_generate([PROMPT], seed=7, **kw)[0].tokens) == a
    # a seeded stream repeats even while another stream samples beside it
    out: list[list[int]] = []
    beside = lambda: out.append(ids(model.generate(PROMPT, max_tokens=16, temperature=1.0)))  # noqa: E731
    t = threading.Thread(target=beside)
    t.start()
    again = ids(model.generate(PROMPT, seed=7, **kw))
    t.join()
    assert again == a
    greedy = ids(model.generate(PROMPT, max_tokens=16))
    penalised = ids(model.generate(PROMPT, max_tokens=16, repeat_penalty=3.0))
    assert len(set(penalised)) >= len(set(greedy))
    assert ids(model.generate(PROMPT, max_tokens=16, repeat_penalty=1.0)) == greedy
    top1 = ids(model.generate(PROMPT, max_tokens=16, temperature=1.0, top_k=1, seed=1))
    assert top1 == greedy  # top_k=1 is greedy whatever the temperature


def test_cancel_between_prefill_chunks() -> None:
    m = load("llama", engine_options={"device": "cpu", "prefill_step_size": 8})
    try:
        ctx = Context.background().with_cancel()
        chunks = 0
        inner = m._model

        class Watch:
            def __getattr__(self, name: str) -> Any:
                return getattr(inner, name)

            def __call__(self, inputs: Any, cache: Any = None, **kw: Any) -> Any:
                nonlocal chunks
                chunks += 1
                if chunks == 2:
                    ctx.cancel()  # during the second chunk: the check after it stops prefill
                return inner(inputs, cache=cache, **kw)

        m._model = Watch()
        prompt = "The quick brown fox jumps over the lazy dog. " * 8
        assert len(m.tokenize(prompt)) > 8 * 5
        stream = m.generate(prompt, max_tokens=5, ctx=ctx)
        with pytest.raises(Cancelled):
            list(stream)
        assert chunks == 2 and stream.finish_reason == "cancelled"
        assert 0 < stream.metrics.prompt_tokens < len(m.tokenize(prompt))
        m._model = inner
        assert list(m.generate(PROMPT, max_tokens=2))
    finally:
        m.close()


def test_context_full() -> None:
    m = load("llama", context_len=24)
    try:
        prompt_len = len(m.tokenize(PROMPT))
        stream = m.generate(PROMPT, max_tokens=100)
        tokens = list(stream)
        assert stream.finish_reason in ("context_full", "end_of_text")
        if stream.finish_reason == "context_full":
            assert len(tokens) == 24 - prompt_len
        with pytest.raises(ci.ContextLengthExceeded):
            list(m.generate("word " * 40))
    finally:
        m.close()


def test_chat_uses_the_folder_template(model: MlxModel) -> None:
    msgs = [ci.Message("user", "Say hello.")]
    assert model.chat_prompt(msgs) == "<|im_start|>user\nSay hello.<|im_end|>\n<|im_start|>assistant\n"
    end_of_turn = model.tokenize("<|im_end|>")
    assert len(end_of_turn) == 1 and end_of_turn[0] in model._chat_stops  # a reply ends at its turn's end


def test_engine_errors_are_mapped(model: MlxModel) -> None:
    oom = model._map_engine_error(RuntimeError("[malloc_or_wait] Unable to allocate 1099511627776 bytes"))
    assert isinstance(oom, ci.EngineError) and "out of memory" in str(oom)
    other = model._map_engine_error(RuntimeError("[eval] something broke"))
    assert isinstance(other, ci.EngineError) and "something broke" in str(other)
    # a failure inside the engine mid-stream reaches the caller mapped, with its cause chained
    inner = model._model

    class Broken:
        def __getattr__(self, name: str) -> Any:
            return getattr(inner, name)

        def __call__(self, *args: Any, **kw: Any) -> Any:
            raise RuntimeError("[metal::Device] command buffer failed")

    model._model = Broken()
    try:
        stream = model.generate(PROMPT, max_tokens=4)
        with pytest.raises(ci.EngineError, match="command buffer") as info:
            list(stream)
        assert isinstance(info.value.__cause__, RuntimeError) and stream.finish_reason == "error"
    finally:
        model._model = inner
    assert list(model.generate(PROMPT, max_tokens=2))


def test_metrics_carry_mlx_memory(model: MlxModel) -> None:
    stream = model.generate(PROMPT, max_tokens=4)
    list(stream)
    m = stream.metrics
    assert m.peak_memory_bytes >= m.active_memory_bytes > 0
    assert m.prompt_tokens == len(model.tokenize(PROMPT)) and m.generated_tokens == 4


def test_info(model: MlxModel) -> None:
    info = model.info()
    assert info.architecture == model.model_type and info.vocab_size > 0
    assert info.num_layers == 2 and info.hidden_size == 64 and info.parameters > 0


def test_close_frees_mlx_memory() -> None:
    import mlx.core as mx

    gc.collect()
    mx.clear_cache()
    before = mx.get_active_memory()
    m = load("llama")
    list(m.generate(PROMPT, max_tokens=4))
    loaded = mx.get_active_memory()
    assert loaded > before
    m.close()
    after = mx.get_active_memory()
    assert after < loaded
    assert loaded - after >= 0.9 * (loaded - before)  # the weights (and any cache) are gone


def _os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads through /proc")
def test_calls_from_many_threads_start_no_mlx_threads(model: MlxModel) -> None:
    import asyncio

    list(model.generate(PROMPT, max_tokens=2))
    before = _os_threads()

    def work() -> None:
        list(model.generate(PROMPT, max_tokens=3, temperature=0.7, seed=1, repeat_penalty=1.2))
        model.classify([PROMPT, "Hello"])
        model.batch_generate([PROMPT, "Hello"], max_tokens=3)

    for _ in range(2):
        threads = [threading.Thread(target=work) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    async def streams() -> None:
        for _ in range(8):  # each async stream of a sync engine runs on a thread of its own
            async for _tok in model.agenerate(PROMPT, max_tokens=2):
                pass

    asyncio.run(streams())
    # MLX work all runs on the one engine thread: no stream or worker thread per caller
    assert _os_threads() <= before + 2


def test_process_with_an_unclosed_model_exits_cleanly() -> None:
    import subprocess

    code = (
        "import threading\n"
        "from core_inference.backends.mlx import MlxBackend\n"
        f"m = MlxBackend().load_model({str(tiny('llama'))!r}, engine_options={{'device': 'cpu'}})\n"
        "t = threading.Thread(target=lambda: list(m.generate('Hello', max_tokens=3)))\n"
        "t.start(); t.join()\n"
        "m.classify(['Hello', 'a b c'])\n"
        "print('done')\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "done" in result.stdout and "terminate called" not in result.stderr


def test_a_folder_without_a_template_says_so(tmp_path: Path) -> None:
    folder = tmp_path / "no-template"
    shutil.copytree(tiny("llama"), folder)
    (folder / "chat_template.jinja").unlink()
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    m = MlxBackend().load_model(folder, **CPU)
    try:
        # llama's built-in template needs <|begin_of_text|> and friends, which this vocabulary lacks
        assert not m.capabilities.chat_template
        with pytest.raises(ModelLoadError, match="no chat template"):
            list(m.chat([ci.Message("user", "hi")]))
        assert list(m.generate(PROMPT, max_tokens=2))
    finally:
        m.close()


def test_named_with_the_cpu_device_it_loads_through_the_registry() -> None:
    """``load_model(..., backend="metal", engine_options={"device": "cpu"})`` needs no Metal GPU."""
    from core_inference import load_model

    tiny_llama_for_registry = tiny("llama")
    with load_model(tiny_llama_for_registry, backend="metal", engine_options={"device": "cpu"}) as model:
        assert model.generate("Hello", max_tokens=2, temperature=0).text() is not None
    if sys.platform != "darwin":
        with pytest.raises(BackendUnavailable, match="no Metal GPU") as info:
            load_model(tiny_llama_for_registry, backend="metal")
        assert "pip install" not in str(info.value)  # more pip will not add a GPU
