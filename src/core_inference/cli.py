"""The ``core-inference`` command line (also ``python -m core_inference``).

Commands: ``backends``, ``generate``, ``chat``, ``info`` and ``discover``. Every command
that takes a model uses the embedded default model when none is given. Failures are one
``error: ...`` line on stderr and a non-zero exit status, never a traceback (set
``CORE_INFERENCE_DEBUG=1`` to see one). click is imported only when the command runs,
so ``import core_inference`` (and this module) work without it.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import TYPE_CHECKING, Any, TextIO, TypeVar

from . import __version__, registry
from .context import Context
from .errors import Cancelled, InferenceError
from .formats import GGUF, sniff_format
from .options import apply_generate_opts, apply_load_opts
from .protocols import TextModel
from .types import GenerateConfig, GenerateMetrics, LoadConfig, Message, ModelInfo, Token

if TYPE_CHECKING:
    import click

PROG = "core-inference"
INSTALL_HINT = "pip install 'core-inference[cli]'"
DEBUG_ENV = "CORE_INFERENCE_DEBUG"
PROMPT = ">>> "
CHAT_HELP = "/reset clears the conversation, /exit (or Ctrl-D) quits, Ctrl-C stops an answer"

F = TypeVar("F", bound=Callable[..., Any])


# -- entry point ---------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default: ``sys.argv[1:]``); return the exit status."""
    try:
        import click
    except ImportError:
        print(f"error: the command line needs click: {INSTALL_HINT}", file=sys.stderr)
        return 1
    try:
        result = build_cli().main(
            args=list(argv) if argv is not None else None, prog_name=PROG, standalone_mode=False
        )
    except click.exceptions.Abort:  # click's name for a KeyboardInterrupt
        return 130
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except click.UsageError as exc:
        hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
        return fail(exc.format_message() + hint, exc.exit_code)
    except click.ClickException as exc:
        return fail(exc.format_message(), exc.exit_code)
    except (InferenceError, ValueError, TypeError, OSError) as exc:
        if os.environ.get(DEBUG_ENV):
            raise
        return fail(describe_error(exc))
    except SystemExit as exc:  # click exits this way when the reader of stdout went away (| head)
        return exc.code if isinstance(exc.code, int) else 1
    return result if isinstance(result, int) else 0


def fail(message: str, status: int = 1) -> int:
    """Print ``error: message`` as one line on stderr and return ``status``."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    return status


def describe_error(exc: BaseException) -> str:
    """An exception as one readable line (multi-line messages are folded)."""
    if isinstance(exc, OSError) and exc.strerror and exc.filename:
        return f"{exc.filename}: {exc.strerror}"
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    text = lines[0]
    for line in lines[1:]:
        text += (" " if text.endswith(":") else "; ") + line
    return text


# -- the click application -----------------------------------------------------------------


def build_cli() -> click.Group:
    """The click command group; built on demand so that click stays an optional dependency."""
    import click

    @click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
    @click.version_option(__version__, "-V", "--version", prog_name=PROG, message="%(prog)s %(version)s")
    def cli() -> None:
        """Text generation with llama.cpp, MLX, torch, vLLM or an OpenAI-compatible server.

        Without --model, commands use the embedded default model (Gemma 3 270M).
        """

    @cli.command("backends")
    def backends_cmd() -> None:
        """List the backends in preference order, available or not."""
        print_table(("BACKEND", "STATUS", "DETAIL"), backend_rows())
        print(default_backend_line())

    @cli.command("generate")
    @click.argument("prompt")
    @model_options(click)
    @generation_options(click)
    def generate_cmd(prompt: str, model: str | None, metrics: bool, **kw: Any) -> None:
        """Stream a completion of PROMPT ('-' reads it from stdin)."""
        load_cfg, gen_cfg = split_options(kw)
        text = read_stdin_prompt() if prompt == "-" else prompt
        run_generate(text, model, load_cfg, gen_cfg, metrics)

    @cli.command("chat")
    @click.option("--system", metavar="TEXT", help="A system message that opens the conversation.")
    @model_options(click)
    @generation_options(click)
    def chat_cmd(system: str | None, model: str | None, metrics: bool, **kw: Any) -> None:
        """Talk with a model, one line a turn (stdin may be a pipe).

        In a terminal: /reset clears the conversation, /exit or Ctrl-D quits,
        Ctrl-C stops the answer being written.
        """
        load_cfg, gen_cfg = split_options(kw)
        run_chat(model, load_cfg, gen_cfg, system, metrics)

    @cli.command("info")
    @click.argument("path", required=False)
    @click.option("--backend", metavar="NAME", default="", help="Load with this backend.")
    @click.option("--no-load", is_flag=True, help="Only read the GGUF header; do not load the model.")
    @click.option("--metadata", is_flag=True, help="Also print every GGUF metadata key.")
    def info_cmd(path: str | None, backend: str, no_load: bool, metadata: bool) -> None:
        """Describe a model (default: the built-in one) and its backend."""
        run_info(path, backend, no_load, metadata)

    @cli.command("discover")
    @click.argument("directory", type=click.Path(file_okay=False))
    def discover_cmd(directory: str) -> None:
        """List the GGUF files and Hugging Face folders under DIRECTORY."""
        run_discover(directory)

    from .bench.command import click_command  # the core only: no engine is imported here

    cli.add_command(click_command())

    return cli


def model_options(click: Any) -> Callable[[F], F]:
    """--model, --backend and the load options, shared by generate and chat."""
    options = [
        click.option("-m", "--model", metavar="PATH", help="Model file, folder or URL (default: built-in)."),
        click.option("-b", "--backend", metavar="NAME", help="Backend to load with (see 'backends')."),
        click.option("--context-len", type=int, help="Context length in tokens (0: the model's)."),
        click.option("--threads", type=int, help="CPU threads (0: all cores)."),
        click.option("--gpu-layers", type=int, help="Layers offloaded to the GPU (-1: all)."),
        click.option("--parallel-slots", type=int, help="Concurrent calls the model serves."),
    ]
    return _stack(options)


def generation_options(click: Any) -> Callable[[F], F]:
    """The sampling options and --metrics, shared by generate and chat."""
    most = GenerateConfig().max_tokens
    options = [
        click.option("-n", "--max-tokens", type=int, help=f"Most tokens to generate [{most}]."),
        click.option("-t", "--temperature", type=float, help="Sampling temperature (0: greedy) [0]."),
        click.option("--top-k", type=int, help="Sample from the k likeliest tokens (0: off)."),
        click.option("--top-p", type=float, help="Nucleus sampling threshold (0: off)."),
        click.option("--repeat-penalty", type=float, help="Repetition penalty (1: none, 0: off)."),
        click.option("--seed", type=int, help="Seed for reproducible sampling."),
        click.option("--stop", multiple=True, metavar="TEXT", help="Stop before this text (repeatable)."),
        click.option("--stop-token", multiple=True, type=int, metavar="ID", help="Stop at this token id."),
        click.option("--metrics", is_flag=True, help="Print token counts and speeds on stderr."),
    ]
    return _stack(options)


def _stack(decorators: Sequence[Callable[[F], F]]) -> Callable[[F], F]:
    def apply(func: F) -> F:
        for deco in reversed(decorators):
            func = deco(func)
        return func

    return apply


_LOAD_KEYS = ("backend", "context_len", "threads", "gpu_layers", "parallel_slots")
_RENAMED = {"stop_token": "stop_tokens"}


def split_options(kw: dict[str, Any]) -> tuple[LoadConfig, GenerateConfig]:
    """Validated load and generation configs from the flags given (unset flags keep defaults)."""
    given = {_RENAMED.get(k, k): v for k, v in kw.items() if v is not None and v != ()}
    load = {k: given.pop(k) for k in _LOAD_KEYS if k in given}
    return apply_load_opts(**load), apply_generate_opts(**given)


def read_stdin_prompt() -> str:
    """The whole of stdin, without the one line ending a shell pipeline adds."""
    text = sys.stdin.read()
    if text.endswith("\n"):
        text = text[:-2] if text.endswith("\r\n") else text[:-1]
    return text


# -- loading ---------------------------------------------------------------------------------


def resolve_model(path: str | None) -> str:
    """``path``, or the embedded default model's path (assembled on first use)."""
    if path:
        return path
    from .default_model import default_model_path

    return str(default_model_path())


def open_model(path: str | None, cfg: LoadConfig) -> TextModel:
    """Load the model at ``path`` (default: the embedded one) with ``cfg``."""
    return registry.load_model(resolve_model(path), cfg)


# -- backends --------------------------------------------------------------------------------


def backend_rows() -> list[tuple[str, str, str]]:
    """(name, status, detail) for every backend in preference order, then broken plugins."""
    rows = []
    for name in registry.preference_order():
        try:
            reason = registry.get(name).why_unavailable()
        except InferenceError:
            rows.append((name, "broken", registry.broken_backends().get(name, "failed to import")))
            continue
        except Exception as exc:  # a plugin that fails its own availability check
            rows.append((name, "broken", f"{type(exc).__name__}: {exc}"))
            continue
        rows.append((name, "available", "") if reason is None else (name, "unavailable", reason))
    listed = {row[0] for row in rows}
    rows += [(name, "broken", why) for name, why in registry.broken_backends().items() if name not in listed]
    return rows


def default_backend_line() -> str:
    """Which backend a load without --backend would try first."""
    forced = os.environ.get(registry.ENV_BACKEND)
    if forced:
        return f"default: {forced} (from ${registry.ENV_BACKEND})"
    try:
        return f"default: {registry.default_backend().name} (first available in preference order)"
    except InferenceError:
        return "default: none available"


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


# -- info ------------------------------------------------------------------------------------


def run_info(path: str | None, backend: str, no_load: bool, metadata: bool) -> None:
    """Print what a model is: its file, the backend and ModelInfo, and its GGUF header."""
    target = resolve_model(path)
    cfg = apply_load_opts(backend=backend)
    is_gguf = os.path.isfile(target) and sniff_format(target) == GGUF
    if no_load and not is_gguf:
        raise ValueError(f"{target}: --no-load needs a GGUF file")
    rows: list[tuple[str, str]] = [("path", target)]
    if not no_load:
        with registry.load_model(target, cfg) as model:
            rows.append(("backend", registry.choose_backend(target, cfg.backend).name))
            rows.append(("model type", model.model_type))
            rows += info_rows(model.info())
    if is_gguf:
        rows += gguf_rows(target, metadata)
    print_pairs(rows)


def info_rows(info: ModelInfo) -> list[tuple[str, str]]:
    """The known fields of a ``ModelInfo`` (zeros and blanks are unknown and left out)."""
    quant = info.quant_type or (f"{info.quant_bits}-bit" if info.quant_bits else "")
    if quant and info.quant_group:
        quant += f", group {info.quant_group}"
    rows = [
        ("architecture", info.architecture),
        ("parameters", _human_count(info.parameters) if info.parameters else ""),
        ("layers", _nonzero(info.num_layers)),
        ("hidden size", _nonzero(info.hidden_size)),
        ("vocabulary", _nonzero(info.vocab_size)),
        ("context length", _nonzero(info.context_length)),
        ("quantisation", quant),
    ]
    return [(k, v) for k, v in rows if v]


def gguf_rows(path: str, all_metadata: bool) -> list[tuple[str, str]]:
    """Facts from a GGUF header, read without loading the model."""
    from .gguf import read_gguf

    header = read_gguf(path)
    quant, bits = header.file_type
    meta = header.metadata
    rows = [
        ("gguf version", str(header.version)),
        ("name", str(meta.get("general.name", ""))),
        ("gguf architecture", header.architecture),
        ("file type", f"{quant} ({bits} bits)" if bits else quant),
        ("tensors", str(header.tensor_count)),
        ("file size", _human_bytes(header.file_size)),
        ("chat template", "in file" if header.chat_template else "none in file (built-in used)"),
    ]
    rows = [(k, v) for k, v in rows if v]
    if all_metadata:
        rows += [(key, _short(value)) for key, value in sorted(meta.items())]
    return rows


# -- discover --------------------------------------------------------------------------------


def run_discover(directory: str) -> None:
    """Print a table of the models under ``directory``; unreadable ones say why."""
    from .discover import discover

    rows = []
    for found in discover(directory):
        shown = os.path.relpath(found.path, directory)
        if found.error:
            rows.append((shown, found.format, "", "", _human_bytes(found.size_bytes), _error_of(found)))
        else:
            kind = found.model_type or "?"
            rows.append((shown, found.format, kind, found.quantisation, _human_bytes(found.size_bytes), "ok"))
    if not rows:
        print(f"no models found under {directory}", file=sys.stderr)
        return
    print_table(("PATH", "FORMAT", "TYPE", "QUANT", "SIZE", "STATUS"), rows)


def _error_of(found: Any) -> str:
    """A row's error without the path the message repeats."""
    message: str = found.error
    prefix = f"{found.path}: "
    return "error: " + (message[len(prefix) :] if message.startswith(prefix) else message)


# -- output helpers --------------------------------------------------------------------------


def print_table(headers: Sequence[str], rows: Sequence[Sequence[str]], out: TextIO | None = None) -> None:
    """Columns padded to their widest cell; the last column is left ragged."""
    stream = out or sys.stdout
    table = [list(headers), *[list(r) for r in rows]]
    widths = [max(len(row[i]) for row in table) for i in range(len(headers) - 1)]
    for row in table:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)] + [row[-1]]
        print("  ".join(cells).rstrip(), file=stream)


def print_pairs(rows: Sequence[tuple[str, str]], out: TextIO | None = None) -> None:
    """``key: value`` lines with the values aligned."""
    width = max((len(k) for k, _ in rows), default=0) + 2
    for key, value in rows:
        print(f"{key + ':':<{width}}{value}", file=out or sys.stdout)


def _nonzero(n: int) -> str:
    return str(n) if n else ""


def _human_count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def _human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def _short(value: object, limit: int = 100) -> str:
    text = repr(value) if not isinstance(value, str) else value.replace("\n", "\\n")
    return text if len(text) <= limit else text[: limit - 3] + "..."


if __name__ == "__main__":
    raise SystemExit(main())
