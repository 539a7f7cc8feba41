"""The ``core-inference`` command line, run for real: subprocesses, the default model, a terminal."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import signal
import struct
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

import core_inference
from core_inference import Context, GenerateConfig, Message, TokenStream, registry
from core_inference.cli import PROMPT, ChatSession, chat_turn, describe_error, main, unescape
from core_inference.testing import FakeBackend, FakeModel

ENTRY_POINT = Path(sys.executable).with_name("core-inference")
CLI = [str(ENTRY_POINT)] if ENTRY_POINT.exists() else [sys.executable, "-m", "core_inference"]
QUESTION = "The capital of France is"


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORE_INFERENCE_")}
    env.update(COLUMNS="100", LINES="40", **extra)
    return env


def run(
    *args: str, stdin: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the command line; stdin is empty unless given."""
    return subprocess.run(
        [*CLI, *args],
        input=stdin if stdin is not None else "",
        capture_output=True,
        text=True,
        env=env or cli_env(),
        timeout=120,
    )


def assert_one_error_line(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    """Exit status non-zero, stderr one ``error: ...`` line, no traceback; returns the line."""
    assert result.returncode != 0, result
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def model_env(default_model_file: Path) -> dict[str, str]:
    """Environment for runs on the real default model with llama.cpp (already assembled)."""
    pytest.importorskip("llama_cpp", reason="needs core-inference[llama-cpp]")
    return cli_env(CORE_INFERENCE_CACHE=str(default_model_file.parent))


@pytest.fixture(scope="module")
def france(model_env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return run("generate", "--max-tokens", "8", QUESTION, env=model_env)


# -- no model needed ------------------------------------------------------------------------


def test_help_lists_the_commands() -> None:
    result = run("--help")
    assert result.returncode == 0
    for command in ("backends", "generate", "chat", "info", "discover"):
        assert command in result.stdout


def test_version_through_python_m() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "core_inference", "--version"], capture_output=True, text=True, env=cli_env()
    )
    assert result.returncode == 0
    assert result.stdout.strip() == f"core-inference {core_inference.__version__}"


def test_backends_lists_llama_cpp() -> None:
    result = run("backends")
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line.split()[1] for line in result.stdout.splitlines()[1:-1]}
    expected = "available" if importlib.util.find_spec("llama_cpp") else "unavailable"
    assert rows["llama_cpp"] == expected
    if expected == "available":
        assert result.stdout.splitlines()[-1].startswith("default: llama_cpp")


def test_backends_shows_unavailable_and_broken_plugins(tmp_path: Path) -> None:
    (tmp_path / "ghostplug.py").write_text(
        "from core_inference.testing import FakeBackend\n\n"
        "def make():\n    return FakeBackend('ghost', available=False)\n"
    )
    dist = tmp_path / "ghostplug-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ghostplug\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[core_inference.backends]\nghost = ghostplug:make\nbroken = no_such_module_for_tests:Backend\n"
    )
    result = run("backends", env=cli_env(PYTHONPATH=str(tmp_path)))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    rows = {line.split()[0]: line for line in lines[1:-1]}
    assert list(rows)[-2:] == ["ghost", "broken"]  # after the built-ins, in preference order
    assert {"llama_cpp", "metal", "cuda", "rocm", "torch", "openai"} <= set(rows)
    assert "unavailable  the fake backend was made unavailable" in rows["ghost"]
    assert "broken" in rows["broken"] and "ModuleNotFoundError" in rows["broken"]


@pytest.mark.parametrize(
    ("flag", "value", "needle"),
    [
        ("--temperature", "-1", "temperature"),
        ("--top-p", "1.5", "top_p"),
        ("--max-tokens", "-5", "max_tokens"),
        ("--context-len", "-3", "context_len"),
        ("--max-tokens", "many", "'many' is not a valid integer"),
    ],
)
def test_invalid_option_value_is_one_error_line(flag: str, value: str, needle: str) -> None:
    result = run("generate", flag, value, QUESTION)
    assert_one_error_line(result, needle)
    assert result.returncode == 2  # a usage error, as docs/cli.md says


def test_missing_model_is_one_error_line(tmp_path: Path) -> None:
    missing = str(tmp_path / "nowhere.gguf")
    result = run("generate", "--model", missing, QUESTION)
    assert_one_error_line(result, missing, "no such file")
    assert result.stdout == ""


def test_unknown_backend_is_one_error_line(default_model_file: Path) -> None:
    result = run("generate", "--backend", "nope", "--model", str(default_model_file), QUESTION)
    assert_one_error_line(result, "'nope' is not registered", "llama_cpp")
    assert result.returncode == 2


def test_discover_on_a_missing_folder_is_one_error_line(tmp_path: Path) -> None:
    assert_one_error_line(run("discover", str(tmp_path / "absent")), "not a folder")


def test_without_click_it_says_what_to_install() -> None:
    code = (
        "import sys; sys.modules['click'] = None\n"
        "from core_inference.cli import main\n"
        "sys.exit(main(['backends']))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env())
    assert_one_error_line(result, "pip install 'core-inference[cli]'")
    assert result.returncode == 1


def test_importing_the_cli_does_not_import_click() -> None:
    code = "import sys, core_inference, core_inference.cli; sys.exit('click' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], env=cli_env()).returncode == 0


# -- the real default model -----------------------------------------------------------------


def test_generate_prints_text(france: subprocess.CompletedProcess[str]) -> None:
    assert france.returncode == 0, france.stderr
    assert france.stdout.strip()
    assert "Traceback" not in france.stderr


def test_generate_reads_the_prompt_from_stdin(
    france: subprocess.CompletedProcess[str], model_env: dict[str, str]
) -> None:
    result = run("generate", "--max-tokens", "8", "-", stdin=QUESTION + "\n", env=model_env)
    assert result.returncode == 0, result.stderr
    assert result.stdout == france.stdout  # greedy: the same prompt gives the same text


def test_generate_metrics(model_env: dict[str, str]) -> None:
    result = run("generate", "--max-tokens", "8", "--metrics", QUESTION, env=model_env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    metrics = dict(line.split(":", 1) for line in result.stderr.splitlines() if ":" in line)
    assert 1 <= int(metrics["generated tokens"]) <= 8
    assert int(metrics["prompt tokens"]) > 0
    assert metrics["decode"].strip().endswith("tokens/s")
    assert metrics["prefill"].strip().endswith("tokens/s")
    assert metrics["time to first token"].strip().endswith("ms")
    assert float(metrics["decode"].split()[0]) > 0


def test_generate_takes_every_option(model_env: dict[str, str]) -> None:
    result = run(
        "generate", "-n", "16", "--temperature", "0.8", "--top-k", "40", "--top-p", "0.9",
        "--repeat-penalty", "1.1", "--seed", "7", "--stop", ".", "--stop", "\n", "--stop-token", "1",
        "--context-len", "512", "--threads", "1", "--gpu-layers", "0", "--parallel-slots", "1",
        "--backend", "llama_cpp", QUESTION,
        env=model_env,
    )
    assert result.returncode == 0, result.stderr
    assert "." not in result.stdout and result.stdout.count("\n") <= 1


def test_engine_options_reach_the_backend(model_env: dict[str, str]) -> None:
    ok = run("generate", "-n", "4", "--engine-option", "batch_invariant=true",
             "--engine-option", "prefill_chunk=64", QUESTION, env=model_env)
    assert ok.returncode == 0 and ok.stdout.strip(), ok.stderr
    bad = run("generate", "-n", "4", "--engine-option", "batch_invariant=maybe", QUESTION, env=model_env)
    assert bad.returncode != 0
    assert_one_error_line(bad, "batch_invariant must be true or false", "'maybe'")


def test_ctrl_c_stops_generate_with_status_130(model_env: dict[str, str]) -> None:
    proc = subprocess.Popen(
        [*CLI, "generate", "--max-tokens", "5000", "Once upon a time"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=model_env, bufsize=0,
    )
    assert proc.stdout is not None
    assert proc.stdout.read(1)  # tokens are flowing
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert b"Traceback" not in err


def test_corrupt_model_is_one_error_line(tmp_path: Path, model_env: dict[str, str]) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + b"\xff" * 64)
    assert_one_error_line(run("generate", "--model", str(bad), QUESTION, env=model_env), str(bad))


def test_info_on_the_default_model(model_env: dict[str, str]) -> None:
    result = run("info", env=model_env)
    assert result.returncode == 0, result.stderr
    fields = dict(line.split(":", 1) for line in result.stdout.splitlines())
    assert fields["backend"].strip() == "llama_cpp"
    assert fields["architecture"].strip() == "gemma3"
    assert fields["file type"].strip().startswith("Q4_K_M")


def test_info_header_only(default_model_file: Path) -> None:
    result = run("info", "--no-load", "--metadata", str(default_model_file))
    assert result.returncode == 0, result.stderr
    assert "backend:" not in result.stdout
    assert "general.architecture:" in result.stdout and "gemma3" in result.stdout


def test_discover_lists_good_and_corrupt_models(tmp_path: Path, default_model_file: Path) -> None:
    (tmp_path / "gemma.gguf").symlink_to(default_model_file)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "corrupt.gguf").write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\x00" * 8)
    result = run("discover", str(tmp_path))
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line for line in result.stdout.splitlines()[1:]}
    assert set(rows) == {"gemma.gguf", "broken/corrupt.gguf"}
    assert "gemma3" in rows["gemma.gguf"] and "Q4_K_M" in rows["gemma.gguf"]
    assert rows["gemma.gguf"].rstrip().endswith("ok")
    assert result.stdout.splitlines()[0].split()[5] == "BACKENDS"
    assert rows["gemma.gguf"].split()[6] == "llama_cpp"  # which available backends can load it
    assert "error:" in rows["broken/corrupt.gguf"]


def test_discover_names_the_backends_of_a_hugging_face_folder(
    tmp_path: Path, default_model_file: Path
) -> None:
    """A safetensors folder is for the HF engines: here (no GPU, no Mac, vLLM in its own
    environment) that is ``torch``; the GGUF beside it is llama.cpp's."""
    pytest.importorskip("torch", reason="needs core-inference[torch]")
    from backends.hf_tiny import make_tiny_model

    make_tiny_model(tmp_path / "tiny-llama")
    (tmp_path / "gemma.gguf").symlink_to(default_model_file)
    result = run("discover", str(tmp_path))
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines()[1:]}
    assert rows["tiny-llama"][1] == "safetensors" and rows["tiny-llama"][6] == "torch", result.stdout
    assert rows["gemma.gguf"][6] == "llama_cpp", result.stdout


def test_chat_from_a_pipe_answers_each_line(model_env: dict[str, str]) -> None:
    turns = "What is the capital of France?\n\nAnd of Italy?\n/exit\nNever asked.\n"
    result = run("chat", "--max-tokens", "8", "--metrics", stdin=turns, env=model_env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    assert PROMPT not in result.stdout
    assert result.stderr.count("generated tokens:") == 2  # blank line skipped, /exit ended it


def test_chat_defaults_to_the_instruct_model(model_env: dict[str, str]) -> None:
    result = run("chat", "--max-tokens", "24", stdin="What is 2+2?\n", env=model_env)
    assert result.returncode == 0, result.stderr
    assert "4" in result.stdout, result.stdout


def test_chat_in_a_terminal_survives_ctrl_c(model_env: dict[str, str]) -> None:
    pexpect = pytest.importorskip("pexpect")
    log = io.StringIO()
    child = pexpect.spawn(
        CLI[0], [*CLI[1:], "chat", "--max-tokens", "200"],
        env=model_env, encoding="utf-8", timeout=60, dimensions=(40, 100),
    )
    child.logfile_read = log
    try:
        child.expect_exact("Chatting with SmolLM2-135M-Instruct.Q4_1.gguf on llama_cpp")  # the default
        child.expect_exact("/exit")  # the greeting says how to leave
        child.expect_exact(PROMPT)
        child.sendline("Write a long story about a dragon.")
        child.expect_exact("dragon.\r\n")  # the terminal echoes the line
        child.expect(r"\w")  # the answer has begun
        child.sendintr()
        child.expect_exact("(answer stopped)")
        child.expect_exact(PROMPT)
        child.sendline("What is the capital of France?")
        child.expect_exact("France?\r\n")
        child.expect(r"\w\w")  # the conversation goes on: an answer is being written
        child.sendintr()  # stop it too, so the test does not wait for 200 tokens on a busy machine
        child.expect_exact("(answer stopped)")
        child.expect_exact(PROMPT)
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0, log.getvalue()
    assert "Traceback" not in log.getvalue()


# -- the chat session, in-process on the fake model -----------------------------------------


class RecordingModel(FakeModel):
    """A fake model that remembers every conversation it was asked to continue."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.conversations: list[list[Message]] = []

    def chat(self, messages: Sequence[Any], *opts: Any, ctx: Context | None = None, **kw: Any) -> TokenStream:
        self.conversations.append(list(messages))
        return super().chat(messages, *opts, ctx=ctx, **kw)


def test_chat_session_keeps_the_history() -> None:
    with RecordingModel() as model:
        session = ChatSession(model, GenerateConfig(max_tokens=3), system="Be brief.")
        out = io.StringIO()
        assert session.ask("Hello", out)
        first = out.getvalue()
        assert first.endswith("\n")
        assert session.ask("Again", out)
        roles = [m.role for m in model.conversations[1]]
        assert roles == ["system", "user", "assistant", "user"]
        assert model.conversations[1][2].content == first[:-1]
        assert chat_turn(session, "/reset", False, False)
        session.ask("Third", out)
        assert [m.role for m in model.conversations[2]] == ["system", "user"]
        assert not chat_turn(session, "/exit", False, False)


def test_ctrl_c_stops_an_answer_and_keeps_what_was_said() -> None:
    with RecordingModel(delay=0.01) as model:
        session = ChatSession(model, GenerateConfig(max_tokens=100_000))
        out = io.StringIO()
        timer = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT))
        timer.start()
        try:
            assert session.ask("Tell me everything", out) is False
        finally:
            timer.cancel()
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        said = out.getvalue()
        assert said.strip() and said.endswith("\n")
        assert [m.role for m in session.history] == ["user", "assistant"]
        assert session.history[1].content == said[:-1]
        session.cfg = GenerateConfig(max_tokens=2)
        assert session.ask("And then?", out)
        assert len(session.history) == 4


def test_chat_leaves_out_the_oldest_turns_to_fit_the_context() -> None:
    with RecordingModel() as model:
        model.context_len = 40
        session = ChatSession(model, GenerateConfig(max_tokens=3), system="Be brief and kind.")
        out = io.StringIO()
        for i in range(8):
            assert session.ask(f"question {i} with several more words", out)
            sent = model.conversations[-1]
            assert sent[0] == Message("system", "Be brief and kind.")  # the system message stays
            assert sent[-1] == Message("user", f"question {i} with several more words")
            assert len(model.tokenize(model.chat_prompt(sent))) + 3 <= 40
            assert [m.role for m in sent[1:]] == ["user", "assistant"] * ((len(sent) - 2) // 2) + ["user"]
        assert session.dropped > 0
        assert len(session.history) < 2 * 8 + 1  # the kept history is the trimmed one


def test_chat_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with RecordingModel() as model:
        session = ChatSession(model, GenerateConfig(max_tokens=3))
        assert chat_turn(session, "/help", False, False)
        assert "/save FILE" in capsys.readouterr().err
        assert chat_turn(session, "/system Answer in French.", False, False)
        assert chat_turn(session, "Hello", False, False)
        assert model.conversations[-1][0] == Message("system", "Answer in French.")
        assert chat_turn(session, "/system Answer in German.", False, False)  # replaces, keeps the turn
        assert [m.role for m in session.history] == ["system", "user", "assistant"]
        assert session.history[0].content == "Answer in German."
        capsys.readouterr()
        assert chat_turn(session, "/metrics", False, False)
        assert "generated tokens:    3" in capsys.readouterr().err
        saved = tmp_path / "chat.json"
        assert chat_turn(session, f"/save {saved}", False, False)
        data = json.loads(saved.read_text(encoding="utf-8"))
        assert [m["role"] for m in data["messages"]] == ["system", "user", "assistant"]
        assert data["messages"][1]["content"] == "Hello"
        assert chat_turn(session, f"/save {tmp_path / 'missing' / 'x.json'}", False, False)
        assert "error:" in capsys.readouterr().err  # a failed save is reported; the chat goes on
        assert chat_turn(session, "/nonsense", False, False)
        assert "unknown command /nonsense" in capsys.readouterr().err
        assert len(model.conversations) == 1  # no command reached the model
        assert not chat_turn(session, "/quit", False, False)


def test_errors_read_as_one_line() -> None:
    assert describe_error(FileNotFoundError(2, "No such file or directory", "x.gguf")) == (
        "x.gguf: No such file or directory"
    )
    assert describe_error(ValueError("no backend for 'm':\n  a: gone\n  b: missing")) == (
        "no backend for 'm': a: gone; b: missing"
    )
    assert describe_error(KeyError()) == "KeyError"


# -- defects fixed: the environment variable, usage errors, --stop escapes, info's template --


def test_backends_reports_an_unknown_backend_in_the_environment() -> None:
    result = run("backends", env=cli_env(CORE_INFERENCE_BACKEND="junk"))
    line = assert_one_error_line(
        result, "$CORE_INFERENCE_BACKEND=junk", "'junk' is not registered", "llama_cpp"
    )
    assert result.returncode == 1, line
    assert "default: junk" not in result.stdout
    assert result.stdout.splitlines()[0].split() == ["BACKEND", "STATUS", "DETAIL"]  # the table, still


def _in_process(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    status = main(list(args))
    out, err = capsys.readouterr()
    return status, out, err


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("generate", "-m", "", QUESTION), "must not be empty"),
        (("generate", "--model", "", QUESTION), "must not be empty"),
        (("chat", "--model", " "), "must not be empty"),
        (("generate", "--backend", "", QUESTION), "must not be empty"),
        (("info", ""), "must not be empty"),
        (("info", "--backend", "nope"), "'nope' is not registered"),
        (("generate", "--temperature", "-1", QUESTION), "temperature"),
        (("generate", "--parallel-slots", "-2", QUESTION), "parallel_slots"),
        (("generate", "--stop", "", QUESTION), "stop"),
        (("generate", "--stop", "\\x4", QUESTION), "\\x needs 2 hex digits"),
        (("generate", "--stop", "\\ud800", QUESTION), "lone surrogate"),
        (("generate", "--engine-option", "batch_invariant", QUESTION), "expected KEY=VALUE"),
        (("generate", "--engine-option", "=1", QUESTION), "expected KEY=VALUE"),
        (("bench", "--out", ""), "must not be empty"),
        (("no-such-command",), "No such command"),
    ],
)
def test_usage_errors_exit_with_status_2(
    capsys: pytest.CaptureFixture[str], args: tuple[str, ...], needle: str
) -> None:
    status, out, err = _in_process(capsys, *args)
    assert status == 2, err
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err


def test_empty_model_from_the_installed_command_is_a_usage_error() -> None:
    result = run("generate", "--model", "", QUESTION)
    assert_one_error_line(result, "--model", "must not be empty")
    assert result.returncode == 2 and result.stdout == ""


def test_info_no_load_on_a_file_that_is_not_gguf(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("not a model\n")
    status, _, err = _in_process(capsys, "info", "--no-load", str(text))
    assert status == 2 and "--no-load needs a GGUF file" in err
    status, _, err = _in_process(capsys, "info", "--no-load", str(tmp_path / "absent.gguf"))
    assert status == 1 and "no such file" in err


@pytest.mark.parametrize(
    ("typed", "meant"),
    [
        ("\\n\\n", "\n\n"),
        ("a\\tb", "a\tb"),
        ("\\\\n", "\\n"),
        ("\\x41\\u00e9\\u4f60", "Aé你"),
        ("C:\\models", "C:\\models"),  # not an escape: left as typed
        ("end\\", "end\\"),
        ("\n", "\n"),  # a real newline passes through
    ],
)
def test_unescape(typed: str, meant: str) -> None:
    assert unescape(typed) == meant


def test_stop_is_taken_with_escapes(
    capsys: pytest.CaptureFixture[str], empty_registry: None, tmp_path: Path
) -> None:
    model = write_gguf(tmp_path / "tiny.gguf", {"general.architecture": "gemma3"})
    registry.register(FakeBackend("fake", tokens=("one", "two\n\nthree", "four")))
    args = ["generate", "-m", str(model), "-b", "fake", "-n", "6"]
    status, out, err = _in_process(capsys, *args, "x")  # "x": the fake model starts at "one"
    assert status == 0, err
    assert "three" in out
    status, out, err = _in_process(capsys, *args, "--stop", "\\n\\n", "x")  # as typed in a shell
    assert status == 0, err
    assert out == "one two\n"


def write_gguf(path: Path, metadata: dict[str, Any]) -> Path:
    """A GGUF file with no tensors and ``metadata`` (str, int as u32, lists of str or int)."""

    def string(text: str) -> bytes:
        raw = text.encode()
        return struct.pack("<Q", len(raw)) + raw

    def value(v: Any) -> bytes:
        if isinstance(v, str):
            return struct.pack("<I", 8) + string(v)
        if isinstance(v, int):
            return struct.pack("<II", 4, v)
        if v and isinstance(v[0], str):
            return struct.pack("<IIQ", 9, 8, len(v)) + b"".join(string(x) for x in v)
        return struct.pack("<IIQ", 9, 4, len(v)) + b"".join(struct.pack("<I", x) for x in v)

    body = b"".join(string(k) + value(v) for k, v in metadata.items())
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, len(metadata)) + body)
    return path


FILLER = [f"tok{i}" for i in range(200)]  # longer than the header reader keeps
GEMMA_SPECIALS = ["<start_of_turn>", "<end_of_turn>"]


@pytest.mark.parametrize(
    ("arch", "tokens", "template", "expected"),
    [
        ("gemma3", [*FILLER, *GEMMA_SPECIALS], None, "built-in gemma3 (none in the file; the vocabulary"),
        ("gemma3", FILLER, None, "vocabulary lacks <start_of_turn>, <end_of_turn> of the built-in gemma3"),
        ("gemma3", [*FILLER, "<start_of_turn>", "<end_of_turn>x"], None, "vocabulary lacks <end_of_turn> "),
        ("gpt2", [*FILLER, *GEMMA_SPECIALS], None, "no built-in one for 'gpt2'"),
        ("gemma3", FILLER, "{{ messages }}", "in file"),
        ("gemma3", None, None, "cannot be told without loading"),
    ],
)
def test_info_no_load_tells_which_chat_template_chat_would_use(
    capsys: pytest.CaptureFixture[str], tmp_path: Path,
    arch: str, tokens: list[str] | None, template: str | None, expected: str,
) -> None:
    meta: dict[str, Any] = {"general.architecture": arch, "general.name": "t", "x.ints": list(range(100))}
    if tokens is not None:
        meta["tokenizer.ggml.tokens"] = tokens
        meta["tokenizer.ggml.token_type"] = [1] * len(tokens)
    if template is not None:
        meta["tokenizer.chat_template"] = template
    path = write_gguf(tmp_path / "m.gguf", meta)
    status, out, err = _in_process(capsys, "info", "--no-load", str(path))
    assert status == 0, err
    fields = dict(line.split(":", 1) for line in out.splitlines())
    note = fields["chat template"].strip()
    assert expected in note, note
    if expected != "in file" and "built-in gemma3 (" not in expected:
        assert "built-in used" not in note and not note.startswith("built-in")


def test_info_no_load_on_the_default_model_uses_the_builtin_template(default_model_file: Path) -> None:
    result = run("info", "--no-load", str(default_model_file))
    assert result.returncode == 0, result.stderr
    fields = dict(line.split(":", 1) for line in result.stdout.splitlines())
    assert fields["chat template"].strip().startswith("built-in gemma3")


RAISING_PLUGIN = """\
from core_inference.testing import FakeBackend


class Shaky(FakeBackend):
    def why_unavailable(self):
        raise RuntimeError("probing the GPU crashed")


def shaky():
    return Shaky("shaky")


def steady():
    return FakeBackend("steady")
"""


def test_a_plugin_whose_check_raises_does_not_break_the_others(tmp_path: Path) -> None:
    (tmp_path / "shakyplug.py").write_text(RAISING_PLUGIN)
    dist = tmp_path / "shakyplug-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: shakyplug\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[core_inference.backends]\nshaky = shakyplug:shaky\nsteady = shakyplug:steady\n"
    )
    env = cli_env(PYTHONPATH=str(tmp_path))
    model = write_gguf(tmp_path / "tiny.gguf", {"general.architecture": "gemma3"})
    info = run("info", str(model), "--backend", "steady", env=env)
    assert info.returncode == 0, info.stderr
    assert "Traceback" not in info.stderr
    fields = dict(line.split(":", 1) for line in info.stdout.splitlines())
    assert fields["backend"].strip() == "steady"  # the other plugin's raising check broke nothing
    table = run("backends", env=env)
    assert table.returncode == 0, table.stderr
    rows = {line.split()[0]: line for line in table.stdout.splitlines()[1:-1]}
    assert rows["shaky"].split()[1] == "broken"
    assert "why_unavailable() raised RuntimeError: probing the GPU crashed" in rows["shaky"]
    assert rows["steady"].split()[1] == "available"
