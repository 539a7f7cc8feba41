"""The ``openai`` backend: a model served by a remote OpenAI-compatible server.

``load_model("http://host:port/v1", backend="openai", model="name", api_key="...")`` (or
any ``http(s)://`` address, which only this backend loads) talks to vLLM, SGLang,
llama.cpp's server, llama-cpp-python's server or ``core-inference serve`` over
``/v1/completions`` and ``/v1/chat/completions`` with SSE streaming, on httpx2 (the HTTP
stack of the ``openai`` client). This module imports only the core; httpx2 is imported
when a model loads. See docs/openai.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ...backend import BaseBackend
from ...types import LoadConfig
from .errors import RemoteConnectError, RemoteError, RemoteHTTPError, RemoteProtocolError, RemoteTimeout

if TYPE_CHECKING:
    from .model import OpenAIModel


class OpenAIBackend(BaseBackend):
    """Any OpenAI-compatible HTTP server, reached by its ``http(s)://…/v1`` address."""

    name = "openai"
    extra = "openai"
    engine_modules = ("httpx2",)
    formats = ("url",)
    engine_options = frozenset({
        "model", "api_key", "timeout", "connect_timeout", "retries", "headers", "extra_body", "token_ids",
    })

    def _load(self, path: str, cfg: LoadConfig) -> OpenAIModel:
        from .model import OpenAIModel  # imports httpx2

        return OpenAIModel(path, cfg)


__all__ = [
    "OpenAIBackend", "RemoteConnectError", "RemoteError", "RemoteHTTPError", "RemoteProtocolError",
    "RemoteTimeout",
]
