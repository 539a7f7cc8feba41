"""The ``core-inference`` command line (also ``python -m core_inference``).

Commands: ``backends``, ``generate``, ``chat``, ``info``, ``discover`` and ``bench``. Every
command that takes a model uses the embedded default model when none is given. Failures
are one ``error: ...`` line on stderr and a non-zero exit status (2 for usage errors, 130
after Ctrl-C), never a traceback (set ``CORE_INFERENCE_DEBUG=1`` to see one). click is
imported only when the command runs, so ``import core_inference`` (and this package) work
without it.

- ``app``: ``main``, the click application, the shared options and usage errors;
- ``run``: ``generate`` and ``chat`` (``ChatSession``, Ctrl-C, metrics);
- ``info``: ``info`` and ``discover``;
- ``output``: ``backends`` and the table helpers.
"""

from __future__ import annotations

from .app import PROG, build_cli, describe_error, fail, main, split_options, unescape
from .output import print_pairs, print_table
from .run import CHAT_HELP, PROMPT, ChatSession, chat_turn, sigint_cancels, stream_text

__all__ = [
    "CHAT_HELP", "PROG", "PROMPT", "ChatSession", "build_cli", "chat_turn", "describe_error", "fail", "main",
    "print_pairs", "print_table", "sigint_cancels", "split_options", "stream_text", "unescape",
]
