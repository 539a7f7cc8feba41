"""The examples in docs/backends.md run as written (they need no engine)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"


def python_blocks(page: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (DOCS / page).read_text(encoding="utf-8"), re.S)


def test_backend_authors_examples_run(capsys: pytest.CaptureFixture[str]) -> None:
    blocks = python_blocks("backends.md")
    namespace: dict[str, object] = {"__name__": "docs_backends"}
    exec(compile(blocks[0], "backends.md#sync", "exec"), namespace)  # the sync engine
    exec(compile(blocks[1], "backends.md#async", "exec"), namespace)  # the async engine, run
    assert capsys.readouterr().out.split() == ["one", "two", "three", "length"]
    backend = namespace["EchoBackend"]()  # type: ignore[operator]
    with backend.load_model(__file__) as model:  # any existing path: formats are not checked here
        stream = model.generate("a b c", max_tokens=5)
        assert stream.text() == "a b c " and stream.finish_reason == "end_of_text"
