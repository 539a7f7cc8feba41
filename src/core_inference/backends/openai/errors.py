"""Errors of the ``openai`` backend: a remote server's failures, typed, with its own message.

All are ``EngineError`` (the contract's "failure inside an engine"), so code that catches
the contract's errors needs nothing new; code that wants to decide on the HTTP status, or
tell a refused connection from a timeout, reads these. Standard library only.
"""

from __future__ import annotations

from ...errors import EngineError


class RemoteError(EngineError):
    """A failure talking to an OpenAI-compatible server.

    ``url`` is the address asked; ``status`` the HTTP status (None when there was no
    answer); ``server_message`` what the server said (its error object's ``message``,
    else its body's text), "" when it said nothing.
    """

    def __init__(self, message: str, *, url: str = "", status: int | None = None,
                 server_message: str = "") -> None:
        self.url = url
        self.status = status
        self.server_message = server_message
        super().__init__(message)


class RemoteConnectError(RemoteError):
    """The server could not be reached (connection refused, unknown host, reset before an answer)."""


class RemoteTimeout(RemoteError, TimeoutError):
    """The server did not answer (or send the next chunk) within the backend's timeout."""


class RemoteHTTPError(RemoteError):
    """The server answered with a 4xx or 5xx status; ``error_type``, ``code`` and ``param``
    are the fields of its OpenAI-style error object where it sent one, ``retry_after`` its
    ``Retry-After`` header in seconds."""

    def __init__(self, message: str, *, url: str = "", status: int | None = None,
                 server_message: str = "", error_type: str = "", code: str = "",
                 param: str = "", retry_after: float | None = None) -> None:
        super().__init__(message, url=url, status=status, server_message=server_message)
        self.retry_after = retry_after  # seconds, from the answer's Retry-After header
        self.error_type = error_type
        self.code = code
        self.param = param


class RemoteProtocolError(RemoteError):
    """The server's answer broke the protocol: a malformed SSE line or JSON chunk, or a
    stream cut off before its end."""


__all__ = ["RemoteConnectError", "RemoteError", "RemoteHTTPError", "RemoteProtocolError", "RemoteTimeout"]
