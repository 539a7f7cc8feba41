"""The ``vllm`` backend on the converted default model (Gemma 3 270M, float32): the whole
contract suite, the main calls, greedy tokens equal to transformers' on the same folder, and
classify's logits equal to the ``torch`` backend's.

The functions here and the contract class share one engine (the class's shared model, loaded
once with two slots): a vLLM engine takes a minute to start on this CPU build.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest

from core_inference.protocols import TextModel
from core_inference.testing import BackendContract

PROMPTS = ["The capital of France is", "Water boils at a temperature of"]
N = 16


@pytest.fixture(scope="module", autouse=True)
def _close_the_shared_engine() -> Iterator[None]:
    """Whatever ran of this module, its engine and workers stop with it."""
    yield
    TestVllmDefaultModelContract.teardown_class()


@pytest.fixture
def model(converted_default_folder: Path) -> TextModel:
    """The contract class's shared engine."""
    TestVllmDefaultModelContract.folder = converted_default_folder
    return TestVllmDefaultModelContract._shared()


def test_generate_chat_batch_and_metrics(model: Any) -> None:
    stream = model.generate(PROMPTS[0], max_tokens=N)
    text = stream.text()
    assert stream.finish_reason in ("length", "end_of_text") and stream.err is None
    m = stream.metrics
    print(f"\n{PROMPTS[0]!r} -> {text!r}: {m.decode_tokens_per_sec:.1f} tokens/s decode, "
          f"{m.prefill_tokens_per_sec:.1f} tokens/s prefill (vLLM's own timestamps)")
    assert "France" in text, text  # greedy: " the capital of the country of France. It is ..."
    assert m.prompt_tokens == len(model.tokenize(PROMPTS[0])) and m.generated_tokens > 0
    assert model.info().architecture == "gemma3_text"
    batch = model.batch_generate(PROMPTS, max_tokens=N)
    assert [r.text for r in batch] == [model.generate(p, max_tokens=N).text() for p in PROMPTS]
    assert model.chat([{"role": "user", "content": "Say hello."}], max_tokens=8).text()


def test_greedy_tokens_equal_transformers(model: Any, converted_default_folder: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    ours = [[t.id for t in model.generate(p, max_tokens=N)] for p in PROMPTS]
    hf = AutoModelForCausalLM.from_pretrained(converted_default_folder, dtype=torch.float32)
    for prompt, got in zip(PROMPTS, ours, strict=True):
        ids = torch.tensor([model.tokenize(prompt)])
        with torch.no_grad():
            out = hf.generate(ids, max_new_tokens=len(got), do_sample=False)
        want = out[0, ids.shape[1]:].tolist()
        agree = next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), len(got))
        print(f"\n{prompt!r}: vllm and transformers agree on {agree} of {len(got)} greedy tokens")
        assert agree >= 8, (got, want)


# vLLM's raw logits against the torch backend's, both float32 on the same folder: measured here
# at most 9e-5 apart over 8 prompts (logits of about 20; relative 3e-6, the two engines' own
# kernels), so 1e-3 leaves room for other CPUs without hiding a wrong row (wrong ones are ~1 apart)
LOGITS_ATOL = 1e-3
CLASSIFY = [*PROMPTS, "My favourite colour is", "The opposite of hot is", "import numpy as"]


def test_classify_logits_equal_torch(model: Any, converted_default_folder: Path) -> None:
    import numpy as np

    from core_inference.backends.transformers import TorchBackend

    assert model.capabilities.logits
    plain = model.classify(CLASSIFY)
    ours = model.classify(CLASSIFY, return_logits=True)
    torch_model = TorchBackend().load_model(converted_default_folder, context_len=1024, threads=1,
                                            engine_options={"dtype": "float32"})
    try:
        theirs = torch_model.classify(CLASSIFY, return_logits=True)
    finally:
        torch_model.close()
    worst = 0.0
    for prompt, got, bare, want in zip(CLASSIFY, ours, plain, theirs, strict=True):
        assert got.err is None and want.err is None, (got.err, want.err)
        row = got.logits
        assert isinstance(row, np.ndarray) and row.dtype == np.float32, type(row)
        assert row.shape == (model.info().vocab_size,) and np.isfinite(row).all()
        # the greedy id is the logits' argmax, and asking for logits changes no token
        assert int(np.argmax(row)) == got.token.id == bare.token.id, prompt
        assert got.token == bare.token and got.prompt_tokens == bare.prompt_tokens
        diff = float(np.abs(row - np.asarray(want.logits, dtype=np.float32)).max())
        worst = max(worst, diff)
        assert diff <= LOGITS_ATOL, (prompt, diff)
        assert got.token.id == want.token.id, prompt
    print(f"\nvllm and torch classify logits: at most {worst:.2e} apart over {len(CLASSIFY)} prompts")


# After the functions above, so they and the rules share the engine the class then closes.
class TestVllmDefaultModelContract(BackendContract):
    """Every rule of the contract, on vLLM's CPU build and the converted default model."""

    folder: ClassVar[Path]

    @pytest.fixture(autouse=True)
    def _folder(self, converted_default_folder: Path) -> None:
        type(self).folder = converted_default_folder

    def load_model(self, **kw: Any) -> TextModel:
        from core_inference.backends.vllm import VllmBackend

        kw.setdefault("context_len", 1024)
        kw.setdefault("engine_options", {"dtype": "float32"})
        began = time.monotonic()
        model = VllmBackend().load_model(type(self).folder, **kw)
        print(f"\nvllm loaded the converted default model in {time.monotonic() - began:.1f} s")
        return model
