"""The contract suite run on the public fake backend, with a sync and an async engine."""

from __future__ import annotations

from typing import Any

from core_inference.protocols import TextModel
from core_inference.testing import BackendContract, FakeBackend


class TestFakeContract(BackendContract):
    def load_model(self, **kw: Any) -> TextModel:
        return FakeBackend().load_model(__file__, **kw)


class TestAsyncFakeContract(BackendContract):
    """The same rules when the engine's raw stream is an async generator."""

    def load_model(self, **kw: Any) -> TextModel:
        return FakeBackend(async_engine=True).load_model(__file__, **kw)
