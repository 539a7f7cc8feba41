"""``generate`` and ``chat``: loading the model, streaming text, Ctrl-C, the metrics."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import TextIO

from .. import registry
from ..context import Context
from ..errors import Cancelled, InferenceError
from ..formats.validate import check_model_path
from ..protocols import TextModel
from ..types import GenerateConfig, GenerateMetrics, LoadConfig, Message, Token
from .app import describe_error, fail

PROMPT = ">>> "
CHAT_HELP = "/help lists the commands, /reset clears the conversation, /exit (or Ctrl-D) quits"
CHAT_COMMANDS = """\
/help          this list
/reset         forget the conversation (the system message stays)
/system TEXT   set the system message (/system alone shows it)
/save FILE     write the conversation to FILE as JSON
/metrics       the last answer's token counts and speeds
/exit, /quit   leave (Ctrl-D too); Ctrl-C stops the answer being written"""


# -- loading ---------------------------------------------------------------------------------


def resolve_model(path: str | None, chat: bool = False) -> str:
    """``path``, or when none was given the embedded default: the instruct model for ``chat``.

    ``generate`` defaults to Gemma 3 270M (a base model: it continues text, and every
    benchmark is measured on it); a conversation needs an instruction-tuned model, so
    ``chat`` defaults to SmolLM2-135M-Instruct.
    """
    if path is not None:
        return path
    from ..default_model import chat_model_path, default_model_path

    return str(chat_model_path() if chat else default_model_path())


@dataclass
class Loaded:
    """A model and what the user should know about it: its file's name and its backend."""

    model: TextModel
    name: str
    backend: str


def open_model(path: str | None, cfg: LoadConfig, chat: bool = False) -> Loaded:
    """Load the model at ``path`` (default: the embedded one for the command) with ``cfg``."""
    resolved = resolve_model(path, chat)
    check_model_path(resolved)  # as registry.load_model does, before choosing by format
    backend = registry.choose_backend(resolved, cfg.backend, cfg)
    name = os.path.basename(os.path.normpath(resolved)) or resolved
    return Loaded(backend.load_model(resolved, cfg), name, backend.name)


# -- generate --------------------------------------------------------------------------------


def run_generate(
    prompt: str, model_path: str | None, load_cfg: LoadConfig, gen_cfg: GenerateConfig, metrics: bool
) -> None:
    """Stream a completion of ``prompt`` to stdout, then the metrics to stderr if asked.

    Ctrl-C cancels the call's context, so the stream ends between two tokens and the
    model closes as after any call; the status is still 130.
    """
    ctx = Context.background().with_cancel()
    with open_model(model_path, load_cfg).model as model:
        try:
            with sigint_cancels(ctx):
                stream_text(model.generate(prompt, gen_cfg, ctx=ctx), sys.stdout)
        except Cancelled:
            if not ctx.done():
                raise
        if metrics:
            print_metrics(model.metrics(), sys.stderr)
    if ctx.done():
        raise KeyboardInterrupt  # reported as Ctrl-C anywhere else is: status 130


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
    remembers what the user saw; a turn that failed is dropped. When the next turn
    would not fit the model's context (with room for the answer), the oldest turns are
    dropped, the system message kept, so a long chat goes on instead of failing.
    """

    def __init__(self, model: TextModel, cfg: GenerateConfig, system: str | None = None) -> None:
        self.model = model
        self.cfg = cfg
        self.opening = [Message("system", system)] if system else []
        self.history: list[Message] = list(self.opening)
        self.dropped = 0  # turns (a user message and its answer) dropped by the last ask

    @property
    def system(self) -> str | None:
        """The system message's text, if there is one."""
        return self.opening[0].content if self.opening else None

    def set_system(self, text: str) -> None:
        """Replace (or add) the system message; the conversation is kept."""
        self.opening = [Message("system", text)]
        rest = self.history[1:] if self.history and self.history[0].role == "system" else self.history
        self.history = [*self.opening, *rest]

    def reset(self) -> None:
        """Forget everything but the system message."""
        self.history = list(self.opening)

    def ask(self, text: str, out: TextIO) -> bool:
        """Stream the answer to ``text`` into ``out``; False if Ctrl-C stopped it."""
        turn = self._fit([*self.history, Message("user", text)])
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

    def save(self, path: str) -> None:
        """Write the conversation to ``path`` as JSON (``{"messages": [{role, content}...]}``)."""
        data = {"messages": [{"role": m.role, "content": m.content} for m in self.history]}
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(data, fh, ensure_ascii=False, indent=2)
            fh.write("\n")

    def _fit(self, turn: list[Message]) -> list[Message]:
        """``turn`` without its oldest exchanges, as few as needed to leave room for the answer."""
        self.dropped = 0
        limit = self.model.context_len
        if limit <= 0:
            return turn
        # Room for the answer: all of max_tokens when it is small, else a quarter of the
        # context (a 256-token answer in a 512-token window would leave no history at all).
        room = min(self.cfg.max_tokens or limit // 4, limit // 4)
        start = 1 if turn[0].role == "system" else 0
        while len(turn) - start > 1 and self._tokens(turn) + room > limit:
            # drop the oldest user message and everything up to the next user message
            end = start + 1
            while end < len(turn) - 1 and turn[end].role != "user":
                end += 1
            turn = [*turn[:start], *turn[end:]]
            self.dropped += 1
        return turn

    def _tokens(self, messages: list[Message]) -> int:
        try:
            return len(self.model.tokenize(self.model.chat_prompt(messages)))
        except (NotImplementedError, InferenceError):  # no local tokenizer: let the engine judge
            return 0


@contextmanager
def sigint_cancels(ctx: Context) -> Iterator[None]:
    """While inside, Ctrl-C cancels ``ctx``; a second Ctrl-C raises ``KeyboardInterrupt``."""

    def handler(signum: int, frame: object) -> None:
        if ctx.done():
            raise KeyboardInterrupt
        # from another thread: the handler runs between two bytecodes of the main thread,
        # which may hold the lock inside the context's event that cancel() takes
        threading.Thread(target=ctx.cancel, name="core-inference ctrl-c", daemon=True).start()

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
    loaded = open_model(model_path, load_cfg, chat=True)
    with loaded.model as model:
        session = ChatSession(model, gen_cfg, system)
        if interactive:
            _enable_line_editing()
            print(
                f"Chatting with {loaded.name} on {loaded.backend} ({model.context_len} tokens of context).\n"
                f"{CHAT_HELP}; Ctrl-C stops an answer.",
                file=sys.stderr,
            )
        for line in user_lines(interactive):
            if not chat_turn(session, line, interactive, metrics):
                break


def chat_turn(session: ChatSession, line: str, interactive: bool, metrics: bool) -> bool:
    """Handle one line of user input; False ends the chat."""
    if line.startswith("/"):
        return chat_command(session, line.strip(), interactive)
    try:
        if not session.ask(line, sys.stdout):
            _note("(answer stopped)", interactive)
    except InferenceError as exc:
        if not interactive:
            raise
        fail(describe_error(exc))
    if session.dropped:
        _note(f"(the {session.dropped} oldest turn(s) were left out to fit the context)", interactive)
    if metrics:
        print_metrics(session.model.metrics(), sys.stderr)
    return True


def chat_command(session: ChatSession, command: str, interactive: bool) -> bool:
    """Run a /command; False ends the chat. Their notes go to stderr, never into the answer stream."""
    name, _, arg = command.partition(" ")
    arg = arg.strip()
    if name in ("/exit", "/quit", "/bye"):
        return False
    if name == "/reset":
        session.reset()
        _note("(conversation cleared)", interactive)
    elif name == "/help":
        _note(CHAT_COMMANDS, True)
    elif name == "/system":
        if arg:
            session.set_system(arg)
            _note("(system message set)", interactive)
        else:
            _note(f"system message: {session.system!r}" if session.system else "(no system message)", True)
    elif name == "/save":
        if not arg:
            fail("/save needs a file name: /save chat.json")
            return True
        try:
            session.save(arg)
        except OSError as exc:
            fail(describe_error(exc))
        else:
            _note(f"(conversation saved to {arg})", True)
    elif name == "/metrics":
        print_metrics(session.model.metrics(), sys.stderr)
    else:
        fail(f"unknown command {name}; /help lists them")
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
