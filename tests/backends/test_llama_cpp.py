"""The llama.cpp backend on the real engine and the embedded default model."""

from __future__ import annotations

import gc
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import core_inference as ci
from core_inference.backends.llama_cpp import LlamaCppBackend
from core_inference.backends.llama_cpp.model import LlamaCppModel
from core_inference.formats.gguf import read_gguf
from core_inference.memory import cpu_count, process_memory

from .conftest import ids

PROMPT = "The capital of France is"


def text(tokens: list[ci.Token]) -> str:
    return "".join(t.text for t in tokens)


def test_registry_picks_llama_cpp_for_gguf(model_path: Path) -> None:
    with ci.load_model(model_path) as m:
        assert isinstance(m, LlamaCppModel)
        assert m.model_type == "gemma3"


def test_emoji_split_across_tokens_comes_out_whole(model: LlamaCppModel) -> None:
    # Gemma writes the llama emoji as 4 byte-fallback tokens: the first three carry ""
    tokens = list(model.generate("Emoji: 🦙🦙🦙 🧪🧪", max_tokens=12))
    assert "🦙" in text(tokens)
    assert any(t.text == "" for t in tokens), "expected byte tokens held back"
    assert "\ufffd" not in text(tokens)
    for t in tokens:
        t.text.encode("utf-8")  # every piece is whole UTF-8 on its own


def test_cjk_output(model: LlamaCppModel) -> None:
    out = text(list(model.generate("東京は日本の首都です。大阪は", max_tokens=8)))
    assert any("\u3040" <= ch <= "\u9fff" for ch in out)


def test_greedy_by_default(model: LlamaCppModel) -> None:
    default = list(model.generate(PROMPT, max_tokens=16))
    assert list(model.generate(PROMPT, max_tokens=16, temperature=0.0)) == default


def test_seed_makes_sampling_reproducible(model: LlamaCppModel) -> None:
    a = list(model.generate(PROMPT, max_tokens=24, temperature=1.5, seed=7))
    b = list(model.generate(PROMPT, max_tokens=24, temperature=1.5, seed=7))
    assert a == b
    others = {
        text(list(model.generate(PROMPT, max_tokens=24, temperature=1.5, seed=s))) for s in range(1, 5)
    }
    assert len(others | {text(a)}) > 1, "different seeds never changed the output"


def test_temperature_changes_output(model: LlamaCppModel) -> None:
    greedy = text(list(model.generate(PROMPT, max_tokens=24)))
    hot = {text(list(model.generate(PROMPT, max_tokens=24, temperature=2.0, seed=s))) for s in range(4)}
    assert hot - {greedy}


def test_top_k_one_is_greedy(model: LlamaCppModel) -> None:
    greedy = list(model.generate(PROMPT, max_tokens=16))
    for seed in range(3):
        assert list(model.generate(PROMPT, max_tokens=16, temperature=1.5, top_k=1, seed=seed)) == greedy


def test_tiny_top_p_is_greedy(model: LlamaCppModel) -> None:
    greedy = list(model.generate(PROMPT, max_tokens=16))
    for seed in range(3):
        assert list(model.generate(PROMPT, max_tokens=16, temperature=1.5, top_p=1e-6, seed=seed)) == greedy


def test_repeat_penalty_reduces_repetition(model: LlamaCppModel) -> None:
    # greedy decoding of this prompt loops on the same sentence
    plain = [t.id for t in model.generate(PROMPT, max_tokens=64)]
    penalised = [t.id for t in model.generate(PROMPT, max_tokens=64, repeat_penalty=1.8)]
    assert penalised != plain
    assert len(set(penalised)) > len(set(plain))


def test_stop_strings_and_ids_on_real_text(model: LlamaCppModel) -> None:
    full = text(list(model.generate(PROMPT, max_tokens=32)))
    assert "France." in full
    cut = text(list(model.generate(PROMPT, max_tokens=32, stop=["France."])))
    assert cut == full[: full.index("France.")]
    ids = [t.id for t in model.generate(PROMPT, max_tokens=32)]
    cut_ids = [t.id for t in model.generate(PROMPT, max_tokens=32, stop_tokens=[ids[5]])]
    assert cut_ids == ids[: ids.index(ids[5])]


def test_gemma3_chat_prompt_is_exact(model: LlamaCppModel) -> None:
    messages = [
        ci.Message("system", "You are a pirate."),
        ci.Message("user", "Hello"),
        ci.Message("assistant", "Arr!"),
        ci.Message("user", "Where is the treasure?"),
    ]
    assert model.chat_prompt(messages) == (
        "<bos><start_of_turn>user\nYou are a pirate.\n\nHello<end_of_turn>\n"
        "<start_of_turn>model\nArr!<end_of_turn>\n"
        "<start_of_turn>user\nWhere is the treasure?<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    # and the special tokens are real single tokens, not text
    ids = model._model.tokenize(model.chat_prompt(messages[1:2]), add_special=False)
    assert ids[:2] == [model._model.bos, model._model.single_token("<start_of_turn>")]


def test_llama_cpp_python_guesses_wrong_for_gemma3(model_path: Path) -> None:
    """llama-cpp-python, left alone, formats this model's chat as llama-2: our reason to do it ourselves."""
    from llama_cpp import Llama

    llm = Llama(str(model_path), n_ctx=256, verbose=False)
    try:
        assert llm.chat_format != "gemma"
    finally:
        llm.close()


def _with_chat_template(src: Path, dst: Path, template: str) -> None:
    """Copy a GGUF file, adding ``tokenizer.chat_template`` to its metadata."""
    header = read_gguf(src)
    raw = src.read_bytes()
    # find where the key-value section ends: re-walk it with the header's own count
    from core_inference.formats.gguf import _Reader

    r = _Reader(raw, len(raw), str(src))
    r.pos = 24
    for _ in range(len(header.metadata)):
        key = r.string("key")
        r.value(r.scalar("I", "type"), key)
    kv_end = r.pos
    for _ in range(header.tensor_count):  # walk the tensor table to find where it ends
        r.string("name")
        dims = r.scalar("I", "dims")
        for _ in range(dims):
            r.scalar("Q", "dim")
        r.scalar("I", "type")
        r.scalar("Q", "offset")
    tensors_end = r.pos
    new_key = b"tokenizer.chat_template"
    value = template.encode()
    kv = (
        struct.pack("<Q", len(new_key)) + new_key + struct.pack("<I", 8)
        + struct.pack("<Q", len(value)) + value
    )
    count = struct.pack("<Q", len(header.metadata) + 1)
    head = raw[:16] + count + raw[24:kv_end] + kv + raw[kv_end:tensors_end]
    pad = (-len(head)) % 32
    dst.write_bytes(head + b"\0" * pad + raw[header.data_offset :])


def test_chat_template_from_gguf_metadata_wins(model_path: Path, tmp_path: Path) -> None:
    template = (
        "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% endif %}"
    )
    path = tmp_path / "templated.gguf"
    _with_chat_template(model_path, path, template)
    assert read_gguf(path).chat_template == template
    with ci.load_model(path) as m:
        prompt = m.chat_prompt([ci.Message("user", "Hi")])
        assert prompt == "<bos>[user]Hi\n[assistant]"
        assert list(m.chat([ci.Message("user", "Hi")], max_tokens=4))


LONG_PROMPT = "The quick brown fox jumps over the lazy dog. " * 200  # about 2,000 tokens


def _cancel_when_decoding(model: LlamaCppModel, ctx: ci.Context, calls: int = 1) -> threading.Thread:
    """Cancel ``ctx`` as soon as the model has started ``calls`` more llama_decode calls."""
    target = model.decode_calls + calls

    def run() -> None:
        while model.decode_calls < target:
            time.sleep(0.001)
        ctx.cancel()

    t = threading.Thread(target=run)
    t.start()
    return t


def test_long_prefill_is_cancelled_inside_a_chunk(model: LlamaCppModel) -> None:
    n_prompt = len(model._model.tokenize(LONG_PROMPT, add_special=True))
    assert n_prompt > 1800 and model.prefill_chunk == 512
    expected = text(list(model.generate(PROMPT, max_tokens=8)))
    ctx = ci.Context.background().with_cancel()
    before = model.decode_calls
    canceller = _cancel_when_decoding(model, ctx)
    with pytest.raises(ci.Cancelled):
        list(model.generate(LONG_PROMPT, max_tokens=4, ctx=ctx))
    canceller.join()
    # cancelled while llama.cpp ran the first chunk of 512 tokens: that decode stopped part-way
    assert model.decode_calls - before == 1
    assert model.metrics().prompt_tokens == 0
    assert isinstance(model.err(), ci.Cancelled)
    # and a deadline stops it too; the model is fine afterwards
    with pytest.raises(ci.DeadlineExceeded):
        list(model.generate(LONG_PROMPT, max_tokens=4, ctx=ci.Context.background().with_timeout(0.1)))
    assert 0 <= model.metrics().prompt_tokens < n_prompt
    assert text(list(model.generate(PROMPT, max_tokens=8))) == expected


def test_prefill_abort_stops_only_its_own_call(model_path: Path) -> None:
    """Both slots prefill long prompts; cancelling one leaves the other's answer as it is alone."""
    other = "A long story about a lighthouse keeper and the sea. " * 40
    with LlamaCppBackend().load_model(model_path, parallel_slots=2, threads=1) as m:
        alone = text(list(m.generate(other, max_tokens=8)))
        got: list[str] = []
        for _ in range(3):
            ctx = ci.Context.background().with_cancel()
            t = threading.Thread(target=lambda: got.append(text(list(m.generate(other, max_tokens=8)))))
            t.start()
            canceller = _cancel_when_decoding(m, ctx, calls=2)  # both prefills under way
            with pytest.raises(ci.Cancelled):
                list(m.generate(LONG_PROMPT, max_tokens=4, ctx=ctx))
            canceller.join()
            t.join()
        assert got == [alone] * 3


def test_long_prompt_beside_a_stream_keeps_its_chunks_and_gives_turns(model_path: Path) -> None:
    """A long prompt prefilled while another stream decodes: its chunks stay 512 tokens (so
    its answer is what it is alone), and the other stream gets a token between its chunks."""
    opts = {"prefix_cache": False}
    with LlamaCppBackend().load_model(model_path, parallel_slots=2, threads=1, engine_options=opts) as m:
        n_prompt = len(m._model.tokenize(LONG_PROMPT, add_special=True))
        before = m.decode_calls
        alone = [t.id for t in m.generate(LONG_PROMPT, max_tokens=1)]
        assert m.decode_calls - before == -(-n_prompt // 512)  # alone: n_batch at a time
        arrivals: list[float] = []
        stream = m.generate(PROMPT, max_tokens=400)
        next(stream)  # the other stream holds a slot while the long prompt is prefilled
        stop = threading.Event()

        def consume() -> None:
            for _ in stream:
                arrivals.append(time.monotonic())
                if stop.is_set():
                    break

        reader = threading.Thread(target=consume)
        reader.start()
        began = time.monotonic()
        beside = [t.id for t in m.generate(LONG_PROMPT, max_tokens=1)]
        ended = time.monotonic()
        stop.set()
        reader.join()
        stream.close()
        assert beside == alone
        during = [t for t in arrivals if began <= t <= ended]
        assert len(during) >= -(-n_prompt // 512) - 1, "the stream waited for the whole prefill"


def test_prompt_longer_than_context(model_path: Path) -> None:
    with LlamaCppBackend().load_model(model_path, context_len=64) as m:
        with pytest.raises(ci.ContextLengthExceeded):
            list(m.generate("word " * 200))
        assert isinstance(m.err(), ci.ContextLengthExceeded)


def test_classify_packs_prompts_into_one_batch(model: LlamaCppModel) -> None:
    prompts = [PROMPT, "One plus one is", "The sky is", "Hello, my name"]
    prompts += ["Paris is in", "Dogs are", "I like", "2, 4, 6,"]
    before = model.decode_calls
    results = model.classify(prompts)
    assert model.decode_calls - before <= 2  # one batch for the bodies, one for the last positions
    for prompt, res in zip(prompts, results, strict=True):
        assert res.logits is None
        assert res.token.id == next(iter(model.generate(prompt, max_tokens=1))).id
    with_logits = model.classify(prompts[:2], return_logits=True)
    assert with_logits[0].logits is not None
    assert len(with_logits[0].logits) == model.info().vocab_size
    logits = with_logits[0].logits
    assert max(range(len(logits)), key=logits.__getitem__) == results[0].token.id


def test_batch_generate_decodes_together(model: LlamaCppModel) -> None:
    prompts = [PROMPT, "One plus one is", "The sky is", "Hello, my name"]
    before = model.decode_calls
    results = model.batch_generate(prompts, max_tokens=8)
    steps = model.decode_calls - before
    assert steps <= 2 + 8, f"{steps} decodes for 4 prompts x 8 tokens: not batched"
    for prompt, res in zip(prompts, results, strict=True):
        assert res.err is None and len(res.tokens) == 8
        alone = list(model.generate(prompt, max_tokens=8))
        assert res.tokens[0] == alone[0]


def test_batch_generate_per_prompt_errors_and_stops(model_path: Path) -> None:
    with LlamaCppBackend().load_model(model_path, context_len=128) as m:
        prompts = [PROMPT, "word " * 300, "One plus one is"]
        results = m.batch_generate(prompts, max_tokens=24, stop=["."])
        assert isinstance(results[1].err, ci.ContextLengthExceeded)
        for i in (0, 2):
            assert results[i].err is None and results[i].tokens
            assert "." not in results[i].text
            alone = text(list(m.generate(prompts[i], max_tokens=24, stop=["."])))
            assert results[i].text == alone


def _eight_threads(model: LlamaCppModel, prompts: list[str], n: int) -> dict[int, list[ci.Token]]:
    out: dict[int, list[ci.Token]] = {}

    def run(i: int) -> None:
        out[i] = list(model.generate(prompts[i % len(prompts)], max_tokens=n))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def test_parallel_slots_decode_streams_together(model: LlamaCppModel) -> None:
    """Concurrent streams share decodes (continuous batching); each gets its own answer."""
    prompts = [PROMPT, "One plus one is", "The sky is", "Hello, my name"]
    stats = model._steps.stats
    shared_before, packed_before = stats.shared, stats.packed
    out = _eight_threads(model, prompts, 16)
    assert stats.shared > shared_before, "no decode carried two streams"
    assert stats.widest >= 2
    # a starting stream's prefill rode in the decode of the others' tokens (continuous batching)
    assert stats.packed > packed_before
    # a shared decode may move greedy picks (docs/reliability.md): batch_invariant keeps them
    # the prompt's alone (test_llama_cpp_invariant.py); here each stream gets its own answer
    assert all(len(out[i]) == 16 for i in range(8))


def test_unshared_decode_gives_answers_equal_to_alone(model_path: Path) -> None:
    """shared_decode=False, prefix_cache=False: answers do not depend on the neighbours."""
    prompts = [PROMPT, "A long story about a lighthouse keeper and the sea. " * 8,
               "Write a poem about the river. " * 5, "Q: What is the tallest mountain?\nA:"]
    opts = {"shared_decode": False, "prefix_cache": False}
    with LlamaCppBackend().load_model(model_path, parallel_slots=4, engine_options=opts) as m:
        alone = {p: list(m.generate(p, max_tokens=16)) for p in prompts}
        out = _eight_threads(m, prompts, 16)
        assert all(out[i] == alone[prompts[i % 4]] for i in range(8))
        assert m._steps.stats.widest >= 2  # they still went through shared steps


def test_unshared_classify_and_batch_generate_give_each_prompt_its_answer_alone(exact: LlamaCppModel) -> None:
    """shared_decode=False: classify and batch_generate decode each prompt as generate would.

    Packed into shared decodes, prompts of 14 tokens and up changed answers (classify 88.5%,
    batch_generate 68% of 200 in stress/independence.py); here every one must equal alone,
    with a stream running beside the calls.
    """
    words = ["river", "valley", "green", "stone", "house", "light", "morning", "quiet", "market", "bread"]
    prompts = [" ".join(words[: 3 + i % 9] * (1 + i * 3)) for i in range(8)] + [PROMPT]
    alone = [ids(exact.generate(p, max_tokens=6)) for p in prompts]
    one = [exact.classify([p], return_logits=True)[0] for p in prompts]
    stop = threading.Event()

    def neighbour() -> None:
        while not stop.is_set():
            list(exact.generate("Tell me about the sea.", max_tokens=8))

    t = threading.Thread(target=neighbour)
    t.start()
    try:
        cls = exact.classify(prompts, return_logits=True)
        batch = exact.batch_generate(prompts, max_tokens=6)
    finally:
        stop.set()
        t.join()
    assert [r.token.id for r in cls] == [a[0] for a in alone]
    for r, o in zip(cls, one, strict=True):
        assert r.logits is not None and o.logits is not None
        assert list(r.logits) == list(o.logits)
    assert [ids(r.tokens) for r in batch] == alone
    assert all(r.finish_reason == "length" and r.metrics.generated_tokens == 6 for r in batch)
    # per-prompt stops end a prompt where generate would end it
    text = exact.detokenize(alone[-1])
    word = text.split()[1] if len(text.split()) > 1 else text.strip()
    stopped = exact.batch_generate([PROMPT, prompts[0]], max_tokens=6, stop=[word])
    assert stopped[0].finish_reason == "stop"
    assert "".join(t.text for t in stopped[0].tokens) == "".join(
        t.text for t in exact.generate(PROMPT, max_tokens=6, stop=[word])
    )


def test_batch_invariant_is_refused_where_layers_would_go_to_a_gpu(
    model_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its kernels are the CPU's: a build that offloads must be asked for gpu_layers=0."""
    from core_inference.backends.llama_cpp import engine

    monkeypatch.setattr(engine, "gpu_offload", lambda: True)
    with pytest.raises(ValueError, match="gpu_layers=0"):
        LlamaCppBackend().load_model(model_path, engine_options={"batch_invariant": True})


def test_engine_options_must_be_bools(model_path: Path) -> None:
    for name in ("prefix_cache", "shared_decode", "batch_invariant"):
        with pytest.raises(ValueError, match=name):
            LlamaCppBackend().load_model(model_path, engine_options={name: "yes"})


def test_metrics_come_from_the_engine(model: LlamaCppModel) -> None:
    tokens = list(model.generate(PROMPT, max_tokens=16))
    m = model.metrics()
    assert m.generated_tokens == len(tokens)
    assert m.prompt_tokens == len(model._model.tokenize(PROMPT, add_special=True))
    assert m.decode_tokens_per_sec > 0 and m.prefill_tokens_per_sec > 0
    assert m.time_to_first_token > 0 and m.peak_memory_bytes >= m.active_memory_bytes > 0


def test_info_from_gguf_metadata(model: LlamaCppModel) -> None:
    info = model.info()
    assert info.architecture == "gemma3"
    assert info.vocab_size == 262144
    assert info.num_layers == 18 and info.hidden_size == 640
    assert info.context_length == 32768
    assert info.quant_type == "Q4_K_M" and info.quant_bits == 4


def test_threads_default_to_every_core(model_path: Path) -> None:
    with LlamaCppBackend().load_model(model_path) as m:
        assert m.threads == cpu_count()
    with LlamaCppBackend().load_model(model_path, threads=1) as m:
        assert m.threads == 1
        assert list(m.generate(PROMPT, max_tokens=2))


def test_close_frees_memory(model_path: Path) -> None:
    gc.collect()
    m = LlamaCppBackend().load_model(model_path)
    list(m.generate(PROMPT, max_tokens=4))
    loaded, _ = process_memory()
    m.close()
    gc.collect()
    after, _ = process_memory()
    assert loaded - after > 150 * 1024 * 1024, f"RSS only fell from {loaded} to {after}"


def test_available_does_not_import_the_engine() -> None:
    code = (
        "import sys, core_inference as ci\n"
        "b = ci.get('llama_cpp')\n"
        "assert b.available(), b.why_unavailable()\n"
        "assert 'llama_cpp' not in sys.modules, 'engine imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_engine_names_the_extra(model_path: Path) -> None:
    code = (
        "import sys\n"
        "sys.modules['llama_cpp'] = None  # as if it were not installed\n"
        "import core_inference as ci\n"
        "try:\n"
        f"    ci.load_model({str(model_path)!r}, backend='llama_cpp')\n"
        "except ci.BackendUnavailable as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "pip install 'core-inference[llama-cpp]'" in out
