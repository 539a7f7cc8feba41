"""Progress on long work: the shared bar and ticker, and what ``convert`` shows while it runs."""

from __future__ import annotations

import io
import time
from pathlib import Path

import pytest

from core_inference.progress import Bar, Ticker, megabytes, reporter


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bar_off_a_terminal_writes_a_line_per_step_of_every_percent() -> None:
    stream = io.StringIO()
    bar = Bar("work", lambda done, total, s: f"{done}/{total}", stream, every=10)
    for done in range(0, 101):
        bar(done, 100)
    lines = stream.getvalue().splitlines()
    assert lines == [f"work: {n}/100" for n in range(0, 101, 10)]


def test_bar_on_a_terminal_redraws_one_line_and_ends_it() -> None:
    stream = FakeTerminal()
    bar = Bar("work", megabytes, stream)
    for done in range(0, 11):
        bar(done * 10_000_000, 100_000_000)
    text = stream.getvalue()
    assert text.count("\r") == 11 and text.count("\n") == 1 and text.endswith("100% 100/100 MB\n")


def test_reporter_keeps_a_callers_own_callable_and_silences_false() -> None:
    seen: list[tuple[int, int]] = []

    def mine(done: int, total: int) -> None:
        seen.append((done, total))

    assert reporter(mine, lambda: pytest.fail("no bar wanted")) is mine
    reporter(False, lambda: pytest.fail("no bar wanted"))(1, 2)
    assert isinstance(reporter(True, lambda: Bar("x", megabytes, io.StringIO())), Bar)


def test_ticker_off_a_terminal_writes_the_start_and_the_elapsed_time() -> None:
    stream = io.StringIO()
    with Ticker("building", stream, interval=0.01):
        time.sleep(0.05)
    assert stream.getvalue().splitlines() == ["building ...", "building: done in 0 s"]


def test_ticker_on_a_terminal_redraws_while_the_step_runs() -> None:
    stream = FakeTerminal()
    with Ticker("building", stream, interval=0.01):
        time.sleep(0.2)
    text = stream.getvalue()
    assert text.count("\r") >= 3 and text.endswith("building done in 0 s\n"), text


def test_ticker_says_when_its_step_failed() -> None:
    stream = io.StringIO()
    with pytest.raises(KeyError), Ticker("building", stream):
        raise KeyError("x")
    assert stream.getvalue().splitlines()[-1] == "building: stopped after 0 s"


def test_convert_shows_each_step(
    default_model_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Hashing the real 250 MB default model draws a bar; the engine's part is faked (minutes)."""
    pytest.importorskip("transformers", reason="needs core-inference[convert]")
    from core_inference import convert as conv

    def fake_engine(source: Path, work: Path, arch: str, template: str | None, progress: bool) -> None:
        with conv._step("convert: building the tokenizer from the GGUF vocabulary", progress):
            (work / "config.json").write_text("{}")

    monkeypatch.setattr(conv, "_convert_into", fake_engine)
    out = conv.convert_gguf(default_model_file, tmp_path / "out")
    lines = capsys.readouterr().err.splitlines()
    hashing = [line for line in lines if line.startswith("convert: hashing ")]
    assert [line.split(": ")[2].split("%")[0] for line in hashing] == ["0", "25", "50", "75", "100"], lines
    assert "convert: building the tokenizer from the GGUF vocabulary: done in 0 s" in lines
    assert lines[-1] == f"convert: done in 0 s: {out}"

    conv.convert_gguf(default_model_file, tmp_path / "quiet", progress=False)
    assert capsys.readouterr().err == ""


def test_a_ticker_beside_an_engines_own_bar_writes_lines_only() -> None:
    """``live=False``: a step that draws its own bar on the terminal gets no redraws of ours."""
    stream = FakeTerminal()
    with Ticker("reading", stream, interval=0.01, live=False):
        time.sleep(0.05)
    assert "\r" not in stream.getvalue()
    assert stream.getvalue().splitlines() == ["reading ...", "reading: done in 0 s"]
