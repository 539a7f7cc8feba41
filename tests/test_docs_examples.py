"""Every example in README.md and docs/*.md runs as written, on the default models.

Each page's ```python blocks run in order in one namespace (a page reads like a
notebook), in a fresh interpreter whose working folder is a sandbox. Each ```sh line that
runs ``core-inference`` runs in a shell in that sandbox, where the placeholder names the
pages use (``model.gguf``, ``~/models``) exist as the default model. A block may be left
out only by an HTML comment right above it, ``<!-- docs-test: skip: REASON -->``, and the
reason is required. ``make`` and ``pip`` lines are the set-up that CI itself runs. A shell
line reads "What is 2+2?" on its stdin, so an interactive ``chat`` line has a question.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```\s*$", re.S | re.M)
SKIP = re.compile(r"<!-- docs-test: skip: (?P<reason>[^>]*?) -->\s*$")

# What each page's python examples must print (on the default models, greedy where it matters).
EXPECT = {
    "README.md": ["100 degrees Celsius", "Bonjour"],
    "contract.md": ["True"],
    "reliability.md": ["same as alone: True"],
    "backends.md": ["one two three"],
    "server.md": ["length 32", "24 generated]"],
    "openai.md": ["True True"],
    "vllm.md": ["vllm: extra vllm, available here:"],
    "distributed.md": ["4 results, no errors: True", "same as one process: True", "every prompt once: True"],
}

# Runs a page's blocks in one namespace; each compiled under "page:line" so a traceback names it.
RUNNER = """
import json, sys
namespace = {"__name__": "__main__"}
for name, code in json.load(open(sys.argv[1], encoding="utf-8")):
    exec(compile(code, name, "exec"), namespace)
    sys.stdout.flush()
"""


@dataclass(frozen=True)
class Block:
    page: str
    line: int
    lang: str
    code: str
    skip: str | None  # the reason given for leaving it out


def blocks(page: Path) -> list[Block]:
    text = page.read_text(encoding="utf-8")
    found = []
    for m in FENCE.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        skip = SKIP.search(before)
        found.append(Block(page.name, line, m.group(1), m.group(2), skip.group("reason") if skip else None))
    return found


def python_pages() -> list[Path]:
    return [p for p in PAGES if any(b.lang == "python" for b in blocks(p))]


def shell_lines() -> list[tuple[str, str]]:
    """(page:line, command) for every sh line that runs core-inference."""
    found = []
    for page in PAGES:
        for block in blocks(page):
            if block.lang != "sh" or block.skip:
                continue
            for i, raw in enumerate(block.code.splitlines(), start=block.line + 1):
                command = strip_comment(raw).strip()
                if re.search(r"(^|\|\s*)core-inference\b", command):
                    found.append((f"{page.name}:{i}", command))
    return found


def strip_comment(line: str) -> str:
    """The line without a trailing ``# comment`` (a ``#`` inside quotes is kept)."""
    quote = ""
    for i, ch in enumerate(line):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


@pytest.fixture(scope="module")
def sandbox(
    tmp_path_factory: pytest.TempPathFactory, default_model_file: Path
) -> tuple[Path, dict[str, str]]:
    """A working folder and environment where the pages' placeholder paths exist."""
    pytest.importorskip("llama_cpp", reason="the examples run on the default models with llama.cpp")
    home = tmp_path_factory.mktemp("docs-home")
    (home / "model.gguf").symlink_to(default_model_file)
    (home / "models").mkdir()
    (home / "models" / "gemma-3-270m.gguf").symlink_to(default_model_file)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORE_INFERENCE_")}
    bindir = str(Path(sys.executable).parent)  # `core-inference` of this interpreter's environment
    env.update(
        HOME=str(home), CORE_INFERENCE_CACHE=str(default_model_file.parent),
        PATH=bindir + os.pathsep + env.get("PATH", ""), PYTHONPATH=str(ROOT / "src"),
    )
    return home, env


@pytest.mark.parametrize("page", python_pages(), ids=lambda p: p.name)
def test_python_examples_run(page: Path, sandbox: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    home, env = sandbox
    todo = [b for b in blocks(page) if b.lang == "python" and not b.skip]
    script = tmp_path / "blocks.json"
    script.write_text(json.dumps([[f"{b.page}:{b.line}", b.code] for b in todo]), encoding="utf-8")
    result = subprocess.run(
        [sys.executable, "-c", RUNNER, str(script)], cwd=home, env=env,
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    assert result.stdout.strip(), "the examples printed nothing"
    for needle in EXPECT.get(page.name, []):
        assert needle in result.stdout, result.stdout


@pytest.mark.parametrize(("where", "command"), shell_lines(), ids=[w for w, _ in shell_lines()])
def test_shell_examples_run(where: str, command: str, sandbox: tuple[Path, dict[str, str]]) -> None:
    home, env = sandbox
    result = subprocess.run(
        ["bash", "-c", command], cwd=home, env=env, input="What is 2+2?\n",  # what `chat` is asked
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, f"{where}: {command}\n{result.stdout}\n{result.stderr}"
    assert (result.stdout + result.stderr).strip(), f"{where}: printed nothing"
    assert "Traceback" not in result.stderr, result.stderr


def test_every_skip_gives_a_reason() -> None:
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for m in re.finditer(r"<!-- docs-test: skip:?(.*?)-->", text):
            assert len(m.group(1).strip()) >= 10, f"{page.name}: a skip needs its reason: {m.group(0)}"


def test_every_python_page_has_expectations() -> None:
    """A page whose examples print nothing checked would pass on nonsense."""
    for page in python_pages():
        if page.name not in EXPECT:
            pytest.fail(f"{page.name} has python examples: add what they must print to EXPECT")


def test_backend_authors_examples_run(capsys: pytest.CaptureFixture[str]) -> None:
    """The backend-author page's engine examples, in-process, checked token by token."""
    code = [b.code for b in blocks(DOCS / "backends.md") if b.lang == "python"]
    namespace: dict[str, object] = {"__name__": "docs_backends"}
    exec(compile(code[0], "backends.md#sync", "exec"), namespace)  # the sync engine
    exec(compile(code[1], "backends.md#async", "exec"), namespace)  # the async engine, run
    assert capsys.readouterr().out.split() == ["one", "two", "three", "length"]
    backend = namespace["EchoBackend"]()  # type: ignore[operator]
    with backend.load_model(__file__) as model:  # any existing path: formats are not checked here
        stream = model.generate("a b c", max_tokens=5)
        assert stream.text() == "a b c " and stream.finish_reason == "end_of_text"
