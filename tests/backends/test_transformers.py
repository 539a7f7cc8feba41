"""The transformers/torch backends (``torch`` on CPU here; ``cuda`` and ``rocm`` unavailable)
on tiny random llama and gemma3_text folders built in the test run."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch", reason="needs core-inference[torch]")
pytest.importorskip("transformers", reason="needs core-inference[torch]")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

import core_inference as ci
from core_inference.backends.transformers import CudaBackend, RocmBackend, TorchBackend
from core_inference.backends.transformers.model import TransformersModel, default_threads
from core_inference.memory import cpu_count
from core_inference.protocols import TextModel
from core_inference.testing import BackendContract

from .hf_tiny import make_tiny_model

PROMPTS = ["The capital of France is", "Hello", "One two three", "Grüße aus Köln, 你好 🙂 and more words",
           "The quick brown fox jumps over the lazy dog. " * 4]  # past gemma's 64-token sliding window
_FOLDERS: dict[str, Path] = {}


@pytest.fixture(scope="session", autouse=True)
def tiny_folders() -> Iterator[dict[str, Path]]:
    """Both tiny models, built once per session in a temporary folder removed afterwards."""
    root = Path(tempfile.mkdtemp(prefix="ci-transformers-"))
    try:
        for arch in ("llama", "gemma3_text"):
            _FOLDERS[arch] = make_tiny_model(root / arch, arch)
        yield _FOLDERS
    finally:
        _FOLDERS.clear()
        shutil.rmtree(root, ignore_errors=True)


def load(arch: str = "llama", **kw: Any) -> TransformersModel:
    kw.setdefault("threads", 1)
    m = TorchBackend().load_model(_FOLDERS[arch], **kw)
    assert isinstance(m, TransformersModel)
    return m


@pytest.fixture(scope="module", params=["llama", "gemma3_text"])
def model(request: pytest.FixtureRequest) -> Iterator[TransformersModel]:
    m = load(request.param, parallel_slots=2)
    yield m
    m.close()


# The tiny models' random weights write mostly byte tokens; from this prompt both write the
# three whitespace-separated words that the stop-string rules cut at.
CONTRACT_PROMPT = "The lazy dog"


class TestTorchLlamaContract(BackendContract):
    prompt = CONTRACT_PROMPT

    def load_model(self, **kw: Any) -> TextModel:
        return load("llama", **kw)


class TestTorchGemma3Contract(BackendContract):
    prompt = CONTRACT_PROMPT

    def load_model(self, **kw: Any) -> TextModel:
        return load("gemma3_text", **kw)


def ids(tokens: Any) -> list[int]:
    return [t.id for t in tokens]


# -- classify and batch_generate ------------------------------------------------------------


def test_classify_is_one_padded_pass_and_matches_single_runs(model: TransformersModel) -> None:
    calls: list[tuple[int, ...]] = []
    real = model._forward

    def spy(x: torch.Tensor, *a: Any, **kw: Any) -> torch.Tensor:
        calls.append(tuple(x.shape))
        return real(x, *a, **kw)

    model._forward = spy  # type: ignore[method-assign,assignment]
    try:
        together = model.classify(PROMPTS, return_logits=True)
        assert len(calls) == 1 and calls[0][0] == len(PROMPTS), calls
        alone = [model.classify([p], return_logits=True)[0] for p in PROMPTS]
    finally:
        del model._forward
    for t, a in zip(together, alone, strict=True):
        assert t.token == a.token and t.prompt_tokens == a.prompt_tokens
        assert t.logits is not None and a.logits is not None
        # the same positions and the same mask: equal up to float rounding of the batched matmuls
        assert torch.allclose(torch.as_tensor(t.logits), torch.as_tensor(a.logits), atol=1e-4, rtol=1e-4)
        assert t.metrics.generated_tokens == 1


def test_classify_one_bad_prompt_does_not_sink_the_batch() -> None:
    with load("llama", context_len=16) as m:
        long = " ".join(["words"] * 40)
        results = m.classify(["Hello", long])
        assert results[0].err is None and results[0].token.id >= 0
        assert isinstance(results[1].err, ci.ContextLengthExceeded) and results[1].finish_reason == "error"


def test_batch_generate_equals_generate_and_drops_finished_rows(model: TransformersModel) -> None:
    alone = {p: ids(model.generate(p, max_tokens=8)) for p in PROMPTS}
    stop_id = alone[PROMPTS[0]][2]  # the first prompt stops after two tokens
    sizes: list[int] = []
    real = model._forward

    def spy(x: torch.Tensor, *a: Any, **kw: Any) -> torch.Tensor:
        sizes.append(x.shape[0])
        return real(x, *a, **kw)

    model._forward = spy  # type: ignore[method-assign,assignment]
    try:
        results = model.batch_generate(PROMPTS, max_tokens=8, stop_tokens=[stop_id])
    finally:
        del model._forward
    for p, r in zip(PROMPTS, results, strict=True):
        stream = model.generate(p, max_tokens=8, stop_tokens=[stop_id])
        assert ids(r.tokens) == ids(stream), p
        assert r.text == "".join(t.text for t in model.generate(p, max_tokens=8, stop_tokens=[stop_id]))
        assert r.finish_reason == stream.finish_reason and r.stop == stream.stop
        assert r.prompt_tokens == stream.prompt_tokens
    assert results[0].finish_reason == "stop" and len(results[0].tokens) == 2
    assert sizes[0] == len(PROMPTS) and min(sizes) < len(PROMPTS), sizes  # a finished row left the batch
    assert sizes == sorted(sizes, reverse=True)


def test_batch_generate_with_sampling_and_stop_strings_equals_generate(model: TransformersModel) -> None:
    kw: dict[str, Any] = dict(max_tokens=10, temperature=0.9, top_k=50, top_p=0.95, seed=7,
                              repeat_penalty=1.2)
    full = "".join(t.text for t in model.generate(PROMPTS[1], **kw))
    kw["stop"] = [full[3:5]] if len(full) >= 5 else ["zz"]
    results = model.batch_generate(PROMPTS, **kw)
    for p, r in zip(PROMPTS, results, strict=True):
        stream = model.generate(p, **kw)
        assert ids(r.tokens) == ids(stream), p
        assert r.finish_reason == stream.finish_reason and r.stop == stream.stop


def test_context_full_in_generate_and_batch_generate() -> None:
    with load("llama", context_len=24) as m:
        prompt = PROMPTS[0]
        n = len(m.tokenize(prompt))
        stream = m.generate(prompt, max_tokens=100)
        tokens = list(stream)
        assert stream.finish_reason in ("context_full", "end_of_text")
        if stream.finish_reason == "context_full":
            assert len(tokens) == 24 - n
        [res] = m.batch_generate([prompt], max_tokens=100)
        assert ids(res.tokens) == ids(tokens) and res.finish_reason == stream.finish_reason


# -- sampling ---------------------------------------------------------------------------------


def test_sampling_options(model: TransformersModel) -> None:
    p = PROMPTS[0]
    greedy = ids(model.generate(p, max_tokens=10))
    assert ids(model.generate(p, max_tokens=10, temperature=1.5, top_k=1, seed=1)) == greedy
    assert ids(model.generate(p, max_tokens=10, temperature=1.5, top_p=1e-6, seed=1)) == greedy
    assert ids(model.generate(p, max_tokens=10, repeat_penalty=1.0)) == greedy
    hot: dict[str, Any] = dict(max_tokens=10, temperature=2.0)
    a = ids(model.generate(p, **hot, seed=123))
    assert ids(model.generate(p, **hot, seed=123)) == a  # a seed repeats ...
    others = {tuple(ids(model.generate(p, **hot, seed=s))) for s in (1, 2, 3, 4)}
    assert len(others | {tuple(a)}) > 1  # ... and different seeds differ
    assert len({tuple(ids(model.generate(p, **hot))) for _ in range(4)}) > 1  # seed=None is random
    penalised = ids(model.generate(p, max_tokens=24, repeat_penalty=5.0))
    plain = ids(model.generate(p, max_tokens=24))
    assert penalised != plain or len(set(plain)) == len(plain)


# -- text -------------------------------------------------------------------------------------


def test_text_is_whole_utf8_and_matches_the_tokenizer(model: TransformersModel) -> None:
    for p in PROMPTS:
        tokens = list(model.generate(p, max_tokens=24, temperature=1.0, seed=5))
        for t in tokens:
            t.text.encode("utf-8")
        got = "".join(t.text for t in tokens)
        assert got == model._tok.decode(ids(tokens), skip_special_tokens=True)
        assert model.detokenize(ids(tokens)) == got
    # a character split across byte-level tokens: held back, then whole
    emoji = model.tokenize("🙂")
    assert model.detokenize(emoji) == "🙂"


def test_tokenize_adds_no_second_bos() -> None:
    with load("llama") as m:
        bos = m._tok.bos_token
        assert bos
        plain = m.tokenize("Hello")
        assert m.tokenize(bos + "Hello") == m._tok(bos + "Hello", add_special_tokens=False)["input_ids"]
        assert plain == m._tok("Hello")["input_ids"]


# -- cancellation ----------------------------------------------------------------------------


def test_cancel_between_prefill_chunks() -> None:
    with load("llama", engine_options={"prefill_chunk": 4}) as m:
        ctx = ci.Context.background().with_cancel()
        calls = []
        real = m._forward

        def spy(x: torch.Tensor, *a: Any, **kw: Any) -> torch.Tensor:
            calls.append(x.shape[1])
            ctx.cancel()  # the context ends during the first chunk
            return real(x, *a, **kw)

        m._forward = spy  # type: ignore[method-assign,assignment]
        stream = m.generate(" ".join(["words"] * 20), max_tokens=5, ctx=ctx)
        with pytest.raises(ci.Cancelled):
            list(stream)
        assert calls == [4]  # one chunk ran, the next never started
        assert stream.finish_reason == "cancelled"
        del m._forward
        assert list(m.generate("Hello", max_tokens=2))  # the model still works


def test_cancel_between_tokens_stops_the_engine() -> None:
    with load("llama") as m:
        ctx = ci.Context.background().with_cancel()
        steps = []
        real = m._forward

        def spy(x: torch.Tensor, *a: Any, **kw: Any) -> torch.Tensor:
            steps.append(1)
            return real(x, *a, **kw)

        m._forward = spy  # type: ignore[method-assign,assignment]
        got = []
        with pytest.raises(ci.Cancelled):
            for tok in m.generate("Hello", max_tokens=1000, ctx=ctx):
                got.append(tok)
                if len(got) == 3:
                    ctx.cancel()
        assert len(got) == 3 and len(steps) <= 4  # prefill + two steps (+ the one in flight)


# -- loading, options, errors ----------------------------------------------------------------


def test_options_and_defaults() -> None:
    assert 1 <= default_threads() <= cpu_count()
    with pytest.raises(ValueError, match="prefill_chunk"):
        load("llama", engine_options={"prefill_chunk": 0})
    with pytest.raises(ValueError, match="dtype"):
        load("llama", engine_options={"dtype": "int3"})
    with pytest.raises(TypeError, match="unknown option"):
        load("llama", engine_options={"nope": 1})
    with load("llama", engine_options={"dtype": "bfloat16"}) as m:
        assert m.dtype == torch.bfloat16 and list(m.generate("Hello", max_tokens=3))
    with load("llama") as m:
        assert m.dtype == torch.float32 and m.device.type == "cpu" and m.threads == 1
        info = m.info()
        assert info.architecture == "llama" and info.parameters > 0 and info.vocab_size == 320
        assert m.capabilities.classify == "native" and m.capabilities.batch_generate == "native"


def test_load_errors(tmp_path: Path) -> None:
    src = _FOLDERS["llama"]
    no_tok = tmp_path / "no_tokenizer"
    no_tok.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(src / name, no_tok / name)
    with pytest.raises(ci.ModelLoadError, match="tokenizer"):
        TorchBackend().load_model(no_tok)
    bad = tmp_path / "bad_arch"
    shutil.copytree(src, bad)
    config = json.loads((bad / "config.json").read_text())
    config["model_type"] = "no_such_architecture"
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ci.ModelLoadError) as info:
        TorchBackend().load_model(bad)
    assert info.value.path == str(bad)


def test_engine_errors_are_mapped() -> None:
    with load("llama") as m:
        oom = m._map_engine_error(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
        assert isinstance(oom, ci.EngineError) and "out of GPU memory" in str(oom)
        assert "host memory" in str(m._map_engine_error(MemoryError()))
        other = m._map_engine_error(RuntimeError("boom"))
        assert isinstance(other, ci.EngineError) and "torch (transformers): RuntimeError: boom" in str(other)


def test_gpu_backends_report_unavailable_without_importing_torch() -> None:
    code = textwrap.dedent(
        """
        import sys
        from core_inference.backends.transformers import CudaBackend, RocmBackend, TorchBackend
        print(repr(CudaBackend().why_unavailable()))
        print(repr(RocmBackend().why_unavailable()))
        print(repr(TorchBackend().why_unavailable()))
        print("torch" in sys.modules, "transformers" in sys.modules)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    cuda, rocm, cpu, imported = out.strip().splitlines()
    if torch.version.cuda is None and torch.version.hip is None:  # a CPU build, as here
        assert "no CUDA support" in cuda and "no ROCm (HIP) support" in rocm, out
    else:
        assert cuda != "None" or torch.cuda.is_available()
    assert cpu == "None"
    assert imported == "False False", "judging availability imported the engine"
    assert not CudaBackend().available() or torch.cuda.is_available()
    with pytest.raises(ci.BackendUnavailable, match="core-inference\\[torch\\]"):
        (RocmBackend() if torch.version.hip is None else CudaBackend()).load_model(_FOLDERS["llama"])


def test_registry_lists_the_three_backends() -> None:
    names = ci.list_backends()
    if "torch" not in names:
        pytest.skip("the registry does not declare the transformers backends yet")
    assert {"cuda", "rocm", "torch"} <= set(names)
    with ci.load_model(_FOLDERS["llama"], backend="torch", threads=1) as m:
        assert isinstance(m, TransformersModel)


# -- memory ------------------------------------------------------------------------------


CLOSE_SCRIPT = """
import gc, json, sys
from core_inference.backends.transformers import TorchBackend
from core_inference.memory import process_memory

def rss():
    gc.collect()
    return process_memory()[0]

import torch, transformers  # imported before the baseline: their own memory is not the model's
before = rss()
m = TorchBackend().load_model(sys.argv[1], threads=1)
list(m.generate("Hello", max_tokens=4))
m.classify(["Hello", "The capital of France is"])
loaded = rss()
m.close()
after = rss()
print(json.dumps({"before": before, "loaded": loaded, "after": after}))
"""


def _bigger_model(folder: Path, src: Path) -> Path:
    """A llama of about 40M parameters (160 MB in fp32) with the tiny model's tokenizer."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    folder.mkdir()
    for f in src.iterdir():
        if f.name not in ("model.safetensors", "config.json"):
            shutil.copy(f, folder / f.name)
    config = LlamaConfig(vocab_size=320, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512,
                         tie_word_embeddings=False)
    model: Any = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # type: ignore[no-untyped-call]
    model.save_pretrained(folder)
    return folder


def test_close_frees_host_memory(tmp_path: Path) -> None:
    folder = _bigger_model(tmp_path / "bigger", _FOLDERS["llama"])
    weights = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", CLOSE_SCRIPT, str(folder)], capture_output=True, text=True,
                         env=env, check=True, cwd=Path(__file__).resolve().parents[2])
    got = json.loads(run.stdout.strip().splitlines()[-1])
    grown = got["loaded"] - got["before"]
    freed = got["loaded"] - got["after"]
    print(f"weights {weights / 1e6:.0f} MB; RSS grew {grown / 1e6:.0f} MB at load, close() gave back "
          f"{freed / 1e6:.0f} MB")
    assert grown >= 0.8 * weights, got  # the model really was in memory ...
    assert freed >= 0.8 * weights, got  # ... and close() gave (nearly) all of it back


# -- continuous batching -----------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_concurrent_streams_share_forward_passes(arch: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from core_inference.backends.transformers import batcher

    monkeypatch.setattr(batcher, "GATHER_SECONDS", 5.0)  # the leader waits for every decoding stream
    n = 4
    with load(arch, parallel_slots=n) as m:
        assert m._batcher is not None
        # past the tiny gemma's 64-token sliding window, so its sliding caches are batched too
        alone = {p: ids(m.generate(p, max_tokens=60)) for p in PROMPTS}
        sizes: list[int] = []
        real = m._forward

        def spy(x: torch.Tensor, *a: Any, **kw: Any) -> torch.Tensor:
            sizes.append(x.shape[0])
            return real(x, *a, **kw)

        m._forward = spy  # type: ignore[method-assign,assignment]
        gate = threading.Barrier(n, timeout=120)
        got: dict[int, list[int]] = {}
        errors: list[BaseException] = []
        cancel_me = ci.Context.background().with_cancel()

        def work(i: int) -> None:
            try:
                out = []
                ctx = cancel_me if i == 3 else None
                with contextlib.suppress(ci.Cancelled):
                    for tok in m.generate(PROMPTS[i], max_tokens=60, ctx=ctx):
                        out.append(tok.id)
                        if len(out) == 1:
                            gate.wait()  # every stream is past its prefill: the next steps are shared
                        if i == 3 and len(out) == 10:
                            cancel_me.cancel()  # one stream leaves mid-way; the others go on
                got[i] = out
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        del m._forward
        assert not errors, errors
        for i in range(3):
            assert got[i] == alone[PROMPTS[i]], i
        assert got[3] == alone[PROMPTS[3]][:10]
        assert max(sizes) == n and m._batcher.shared_steps > 0, sizes


def test_continuous_batching_can_be_turned_off() -> None:
    with load("llama", parallel_slots=2, engine_options={"continuous_batching": False}) as m:
        assert m._batcher is None and list(m.generate("Hello", max_tokens=2))
    with load("llama") as m:
        assert m._batcher is None  # one slot: nothing to share


def test_sentencepiece_byte_fallback_pieces() -> None:
    """Gemma/Llama-2 style tokens ("▁" for a space, <0xAB> byte tokens) give the tokenizer's own bytes."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    from core_inference.backends.transformers.sampling import TokenPieces

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"<0x{b:02X}>": 3 + b for b in range(256)}
    for w in ("\u2581", "a", "b", "\u2581a", "é", "h", "e", "t"):
        vocab[w] = len(vocab)
    raw = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    raw.normalizer = normalizers.Replace(" ", "\u2581")
    raw.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    tok: Any = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    pieces = TokenPieces(tok)
    assert pieces.kind == "sentencepiece" and pieces.exact
    text = " the a é 🙂 bé"
    token_ids = tok(text, add_special_tokens=False)["input_ids"]
    assert [pieces(i) for i in token_ids].count(b"\xf0") == 1  # the emoji comes as byte tokens
    assert b"".join(pieces(i) for i in token_ids).decode() == tok.decode(token_ids) == text
    assert pieces(tok.eos_token_id) == b""


def test_chat_prompt_is_the_folders_template_as_transformers_renders_it(model: TransformersModel) -> None:
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 🙂"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
    want = model._tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert model.chat_prompt(msgs) == want
    stream = model.chat(msgs, max_tokens=4)
    list(stream)
    assert stream.prompt_tokens == len(model._tok(want)["input_ids"])


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_batch_generate_prefills_in_chunks_and_stops_between_them(arch: str) -> None:
    with load(arch, engine_options={"prefill_chunk": 8}) as m:
        want = [ids(m.generate(p, max_tokens=6)) for p in PROMPTS]
        assert [ids(r.tokens) for r in m.batch_generate(PROMPTS, max_tokens=6)] == want
        ctx = ci.Context.background().with_cancel()
        widths: list[int] = []
        real = m._forward

        def spy(x: torch.Tensor, *a: Any, **kw: Any) -> torch.Tensor:
            widths.append(x.shape[1])
            ctx.cancel()
            return real(x, *a, **kw)

        m._forward = spy  # type: ignore[method-assign,assignment]
        with pytest.raises(ci.Cancelled):
            m.batch_generate(PROMPTS, max_tokens=6, ctx=ctx)
        assert widths == [8]  # the first chunk of columns ran, then the call ended
