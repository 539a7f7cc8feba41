"""``generate`` and ``chat``: loading the model, streaming text, Ctrl-C, the metrics."""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from typing import TextIO

from .. import registry
from ..context import Context
from ..errors import Cancelled, InferenceError
from ..protocols import TextModel
from ..types import GenerateConfig, GenerateMetrics, LoadConfig, Message, Token
from .app import describe_error, fail

PROMPT = ">>> "
CHAT_HELP = "/reset clears the conversation, /exit (or Ctrl-D) quits, Ctrl-C stops an answer"


# -- loading ---------------------------------------------------------------------------------


def resolve_model(path: str | None) -> str:
    """``path``, or (only when none was given) the embedded default model's path."""
    if path is not None:
        return path
    from ..default_model import default_model_path

    return str(default_model_path())


def open_model(path: str | None, cfg: LoadConfig) -> TextModel:
    """Load the model at ``path`` (default: the embedded one) with ``cfg``."""
    return registry.load_model(resolve_model(path), cfg)


# -- generate --------------------------------------------------------------------------------


def run_generate(
    prompt: str, model_path: str | None, load_cfg: LoadConfig, gen_cfg: GenerateConfig, metrics: bool
) -> None:
    """Stream a completion of ``prompt`` to stdout, then the metrics to stderr if asked."""
    with open_model(model_path, load_cfg) as model:
        stream_text(model.generate(prompt, gen_cfg), sys.stdout)
        if metrics:
            print_metrics(model.metrics(), sys.stderr)


def stream_text(tokens: Iterable[Token], out: TextIO, parts: list[str] | None = None) -> str:
    """Write each token's text as it arrives (also into ``parts``); end the line, even on failure."""
    parts = [] if parts is None else parts
    try:
        for token in tokens:
            if token.text:
                out.write(token.text)
                out.flush()
                parts.append(token.text)
    finally:
        if parts and not parts[-1].endswith("\n"):
            out.write("\n")
            out.flush()
    return "".join(parts)


def print_metrics(m: GenerateMetrics, err: TextIO) -> None:
    """The last call's counts and speeds, one per line."""
    rows = [
        ("prompt tokens", f"{m.prompt_tokens}"),
        ("generated tokens", f"{m.generated_tokens}"),
        ("time to first token", f"{m.time_to_first_token * 1000:.1f} ms"),
        ("prefill", f"{m.prefill_tokens_per_sec:.1f} tokens/s"),
        ("decode", f"{m.decode_tokens_per_sec:.1f} tokens/s"),
        ("total time", f"{m.total_duration:.3f} s"),
    ]
    if m.peak_memory_bytes:
        rows.append(("peak memory", f"{m.peak_memory_bytes / 2**20:.0f} MiB"))
    for key, value in rows:
        print(f"{key + ':':<21}{value}", file=err)
    err.flush()


# -- chat ------------------------------------------------------------------------------------


class ChatSession:
    """A conversation with a model: the history, and answers that Ctrl-C can stop.

    A stopped answer stays in the history as far as it was written, so the model
    remembers what the user saw; a turn that failed is dropped.
    """

    def __init__(self, model: TextModel, cfg: GenerateConfig, system: str | None = None) -> None:
        self.model = model
        self.cfg = cfg
        self.opening = [Message("system", system)] if system else []
        self.history: list[Message] = list(self.opening)

    def reset(self) -> None:
        """Forget everything but the system message."""
        self.history = list(self.opening)

    def ask(self, text: str, out: TextIO) -> bool:
        """Stream the answer to ``text`` into ``out``; False if Ctrl-C stopped it."""
        turn = [*self.history, Message("user", text)]
        ctx = Context.background().with_cancel()
        parts: list[str] = []
        stopped = False
        with sigint_cancels(ctx):
            try:
                stream_text(self.model.chat(turn, self.cfg, ctx=ctx), out, parts)
            except (Cancelled, KeyboardInterrupt):
                stopped = True
        answer = "".join(parts)
        if answer or not stopped:
            self.history = [*turn, Message("assistant", answer)]
        return not stopped


@contextmanager
def sigint_cancels(ctx: Context) -> Iterator[None]:
    """While inside, Ctrl-C cancels ``ctx``; a second Ctrl-C raises ``KeyboardInterrupt``."""

    def handler(signum: int, frame: object) -> None:
        if ctx.done():
            raise KeyboardInterrupt
        ctx.cancel()

    try:
        previous = signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread: Ctrl-C arrives as KeyboardInterrupt instead
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def run_chat(
    model_path: str | None, load_cfg: LoadConfig, gen_cfg: GenerateConfig, system: str | None, metrics: bool
) -> None:
    """The chat loop: a prompt and line editing in a terminal, one turn a line from a pipe."""
    interactive = sys.stdin.isatty()
    with open_model(model_path, load_cfg) as model:
        session = ChatSession(model, gen_cfg, system)
        if interactive:
            _enable_line_editing()
            print(f"chatting with {model.model_type or 'the model'}: {CHAT_HELP}", file=sys.stderr)
        for line in user_lines(interactive):
            if not chat_turn(session, line, interactive, metrics):
                break


def chat_turn(session: ChatSession, line: str, interactive: bool, metrics: bool) -> bool:
    """Handle one line of user input; False ends the chat."""
    command = line.strip()
    if command in ("/exit", "/quit", "/bye"):
        return False
    if command == "/reset":
        session.reset()
        _note("(conversation cleared)", interactive)
        return True
    if command == "/help":
        _note(CHAT_HELP, True)
        return True
    try:
        if not session.ask(line, sys.stdout):
            _note("(answer stopped)", interactive)
    except InferenceError as exc:
        if not interactive:
            raise
        fail(describe_error(exc))
    if metrics:
        print_metrics(session.model.metrics(), sys.stderr)
    return True


def user_lines(interactive: bool) -> Iterator[str]:
    """Non-blank user turns: from ``input()`` with a prompt in a terminal, else stdin's lines."""
    if not interactive:
        for line in sys.stdin:
            if line.strip():
                yield line.rstrip("\r\n")
        return
    while True:
        try:
            line = input(PROMPT)
        except (EOFError, KeyboardInterrupt):  # Ctrl-D or Ctrl-C at the prompt: goodbye
            print()
            return
        if line.strip():
            yield line


def _note(text: str, show: bool) -> None:
    if show:
        print(text, file=sys.stderr, flush=True)


def _enable_line_editing() -> None:
    with suppress(ImportError):
        import readline  # noqa: F401  (gives input() history and editing)
