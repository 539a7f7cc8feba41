"""``convert``: a GGUF file becomes a Hugging Face folder that every other engine loads."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from core_inference import ModelLoadError, load_model
from core_inference import convert as conv
from core_inference.convert import STAMP, convert_gguf

pytest.importorskip("transformers", reason="needs core-inference[convert]")
gguf = pytest.importorskip("gguf", reason="needs core-inference[convert]")

from test_gguf import write_gguf  # noqa: E402  (tests/ is on the path: a hand-made GGUF)

TEXTS = ["Hello world", "The capital of France is", "naïve café, 你好世界 🙂", "  two  spaces\nand a line"]


def test_an_architecture_transformers_cannot_convert_is_refused(tmp_path: Path) -> None:
    source = write_gguf(tmp_path / "odd.gguf", arch="rwkv7")
    refused = r"cannot convert a 'rwkv7' GGUF: transformers converts .*gemma3"
    with pytest.raises(ModelLoadError, match=refused):
        convert_gguf(source, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_a_folder_that_is_not_a_conversion_is_never_overwritten(tmp_path: Path) -> None:
    source = write_gguf(tmp_path / "tiny.gguf", arch="llama")
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(ModelLoadError, match="not empty and is not a conversion"):
        convert_gguf(source, out, progress=False)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_a_file_that_is_not_gguf_is_a_load_error(tmp_path: Path) -> None:
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"not a model at all")
    with pytest.raises(ModelLoadError):
        convert_gguf(bad, tmp_path / "out", progress=False)


# -- the real default model (converted once per machine, kept in the cache) --------------


def test_the_folder_has_config_weights_tokenizer_and_template(converted_default_model: Path) -> None:
    names = {p.name for p in converted_default_model.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", STAMP} <= names
    config = json.loads((converted_default_model / "config.json").read_text())
    assert config["model_type"] == "gemma3_text" and config["num_hidden_layers"] == 18
    stamp = json.loads((converted_default_model / STAMP).read_text())
    assert stamp["architecture"] == "gemma3" and len(stamp["sha256"]) == 64


def test_tokenizer_and_template_match_llama_cpp(
    converted_default_model: Path, default_model_file: Path
) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(converted_default_model, local_files_only=True)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    with load_model(default_model_file, backend="llama_cpp", threads=1) as model:
        for text in TEXTS:
            ids = tok(text)["input_ids"]
            assert ids == model.tokenize(text), text  # both add the same BOS
        rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert rendered == model.chat_prompt(messages)  # the built-in gemma3 format, as Jinja


def test_greedy_tokens_agree_with_llama_cpp(converted_default_model: Path, default_model_file: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    hf = AutoModelForCausalLM.from_pretrained(converted_default_model, local_files_only=True)
    with load_model(default_model_file, backend="llama_cpp", threads=1) as model:
        ids = model.tokenize("The capital of France is")
        ours = [t.id for t in model.generate("The capital of France is", max_tokens=8, temperature=0)]
    out = hf.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)
    theirs = out[0, len(ids):].tolist()
    assert theirs[:4] == ours[:4], (theirs, ours)  # fp32 weights against Q4_K_M arithmetic


def test_a_second_call_is_instant(
    converted_default_model: Path, default_model_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def forbidden(*args: object, **kw: object) -> object:
        raise AssertionError("converted or hashed again")

    monkeypatch.setattr(conv, "_convert_into", forbidden)
    monkeypatch.setattr(hashlib, "sha256", forbidden)
    assert convert_gguf(default_model_file, progress=False) == converted_default_model  # reads one JSON file


def test_the_command_prints_the_folder(converted_default_model: Path, default_model_file: Path) -> None:
    env = {k: v for k, v in os.environ.items()}
    result = subprocess.run(
        [sys.executable, "-m", "core_inference", "convert", str(default_model_file)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(converted_default_model)
    bad = subprocess.run(
        [sys.executable, "-m", "core_inference", "convert", __file__],
        capture_output=True, text=True, timeout=120,
    )
    assert bad.returncode == 1 and bad.stderr.startswith("error:"), bad.stderr


def test_progress_false_draws_no_bar_and_leaves_transformers_bars_as_they_were(
    default_model_file: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """transformers draws its GGUF reader's bar with tqdm directly and a bar while saving:
    ``progress=False`` silences both, and transformers' own setting is restored after."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    out = convert_gguf(default_model_file, tmp_path / "quiet", progress=False)
    err = capfd.readouterr().err
    assert (out / "model.safetensors").is_file()
    assert "it/s]" not in err and "%|" not in err, err[-800:]
    assert hf_logging.is_progress_bar_enabled() == was
