"""The contract suite run on the public fake backend."""

from __future__ import annotations

from typing import Any

from core_inference.protocols import TextModel
from core_inference.testing import BackendContract, FakeBackend


class TestFakeContract(BackendContract):
    def load_model(self, **kw: Any) -> TextModel:
        return FakeBackend().load_model(__file__, **kw)
