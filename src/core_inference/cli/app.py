"""The entry point and the click application: commands, shared options, usage errors."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from .. import __version__, registry
from ..errors import InferenceError
from ..options import apply_generate_opts, apply_load_opts
from ..types import GenerateConfig, LoadConfig

if TYPE_CHECKING:
    import click

PROG = "core-inference"
INSTALL_HINT = "pip install 'core-inference[cli]'"
DEBUG_ENV = "CORE_INFERENCE_DEBUG"
USAGE_ERROR = 2  # bad flags or arguments, as click and docs/cli.md say
INTERRUPTED = 130

F = TypeVar("F", bound=Callable[..., Any])


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default: ``sys.argv[1:]``); return the exit status."""
    try:
        return _main(argv)
    except KeyboardInterrupt:  # Ctrl-C anywhere, even while the first imports run: 130, no traceback
        print(file=sys.stderr)
        return INTERRUPTED


def _main(argv: Sequence[str] | None) -> int:
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
        return INTERRUPTED
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return INTERRUPTED
    except click.UsageError as exc:
        if isinstance(exc, getattr(click.exceptions, "NoArgsIsHelpError", ())):  # bare command: its help
            print(exc.format_message(), file=sys.stderr)
            return USAGE_ERROR
        hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
        return fail(exc.format_message() + hint, USAGE_ERROR)
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


def build_cli() -> click.Group:
    """The click command group; built on demand so that click stays an optional dependency."""
    import click

    from .info import run_discover, run_info
    from .output import run_backends
    from .run import run_chat, run_generate

    @click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
    @click.version_option(__version__, "-V", "--version", prog_name=PROG, message="%(prog)s %(version)s")
    def cli() -> None:
        """Text generation with llama.cpp, MLX, torch, vLLM or an OpenAI-compatible server.

        Without --model, generate and info use the embedded Gemma 3 270M (a base model that
        continues text); chat and serve use the embedded SmolLM2-135M-Instruct.
        """

    @cli.command("backends")
    def backends_cmd() -> None:
        """List the backends in preference order, available or not."""
        run_backends()

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
        """Talk with a model (default: SmolLM2-135M-Instruct), one line a turn (stdin may be a pipe).

        /help lists the commands: /reset, /system TEXT, /save FILE, /metrics, /exit
        (or Ctrl-D). Ctrl-C stops the answer being written. When the conversation
        outgrows the context, the oldest turns are left out (the system message stays).
        """
        load_cfg, gen_cfg = split_options(kw)
        run_chat(model, load_cfg, gen_cfg, system, metrics)

    @cli.command("info")
    @click.argument("path", required=False, callback=_not_empty)
    @click.option("--backend", metavar="NAME", callback=_registered, help="Load with this backend.")
    @click.option("--no-load", is_flag=True, help="Only read the GGUF header; do not load the model.")
    @click.option("--metadata", is_flag=True, help="Also print every GGUF metadata key.")
    def info_cmd(path: str | None, backend: str | None, no_load: bool, metadata: bool) -> None:
        """Describe a model (default: the built-in one) and its backend."""
        run_info(path, backend or "", no_load, metadata)

    @cli.command("discover")
    @click.argument("directory", type=click.Path(file_okay=False), callback=_not_empty)
    def discover_cmd(directory: str) -> None:
        """List the GGUF files and Hugging Face folders under DIRECTORY."""
        run_discover(directory)

    @cli.command("convert")
    @click.argument("gguf_file", type=click.Path(dir_okay=False), callback=_not_empty)
    @click.argument("out_dir", type=click.Path(file_okay=False), required=False, callback=_not_empty)
    @click.option("-q", "--quiet", is_flag=True, help="No progress lines.")
    def convert_cmd(gguf_file: str, out_dir: str | None, quiet: bool) -> None:
        """Write a Hugging Face folder from GGUF_FILE (for the metal, torch and vllm backends).

        OUT_DIR defaults to a folder in the cache; a second run for the same file returns at
        once. Prints the folder's path. Needs the 'convert' extra.
        """
        from ..convert import convert_gguf

        print(convert_gguf(gguf_file, out_dir, progress=not quiet))

    from ..bench.command import click_command  # the core only: no engine is imported here

    cli.add_command(click_command())
    from .serve import click_command as serve_command  # starlette and uvicorn load only when it runs

    cli.add_command(serve_command())
    return cli


def _not_empty(ctx: Any, param: Any, value: str | None) -> str | None:
    """An empty path or name is a mistake (an unset shell variable), never "use the default"."""
    import click

    if value is not None and not value.strip():
        raise click.BadParameter("must not be empty (leave it out to use the default)", ctx, param)
    return value


def _registered(ctx: Any, param: Any, value: str | None) -> str | None:
    """--backend names a registered backend (checked before any model is read)."""
    import click

    value = _not_empty(ctx, param, value)
    if value is not None and value not in registry.list_backends():
        known = ", ".join(registry.list_backends()) or "none"
        raise click.BadParameter(f"{value!r} is not registered (known backends: {known})", ctx, param)
    return value


def _stop_strings(ctx: Any, param: Any, value: tuple[str, ...]) -> tuple[str, ...]:
    import click

    try:
        return tuple(unescape(v) for v in value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx, param) from exc


def engine_options(ctx: Any, param: Any, value: tuple[str, ...]) -> dict[str, Any] | None:
    """``--engine-option KEY=VALUE`` flags as a backend's ``engine_options`` (VALUE read as
    JSON where it is JSON: ``true``, ``512``, ``"x"``; else the text as given)."""
    import json

    import click

    if not value:
        return None
    out: dict[str, Any] = {}
    for item in value:
        key, eq, raw = item.partition("=")
        if not eq or not key.strip():
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}", ctx, param)
        try:
            out[key.strip()] = json.loads(raw)
        except ValueError:
            out[key.strip()] = raw
    return out


def engine_option(click: Any) -> Callable[[F], F]:
    """The repeatable --engine-option flag (generate, chat, serve)."""
    deco: Callable[[F], F] = click.option(
        "--engine-option", "engine_options", multiple=True, metavar="KEY=VALUE", callback=engine_options,
        help="A backend's own load option (repeatable), e.g. batch_invariant=true on llama_cpp.",
    )
    return deco


def model_options(click: Any) -> Callable[[F], F]:
    """--model, --backend and the load options, shared by generate and chat."""
    options = [
        click.option("-m", "--model", metavar="PATH", callback=_not_empty,
                     help="Model file, folder or URL (default: built-in)."),
        click.option("-b", "--backend", metavar="NAME", callback=_registered,
                     help="Backend to load with (see 'backends')."),
        click.option("--context-len", type=int, help="Context length in tokens (0: the model's)."),
        click.option("--threads", type=int, help="CPU threads (0: all cores)."),
        click.option("--gpu-layers", type=int, help="Layers offloaded to the GPU (-1: all)."),
        click.option("--parallel-slots", type=int, help="Concurrent calls the model serves."),
        engine_option(click),
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
        click.option("--stop", multiple=True, metavar="TEXT", callback=_stop_strings,
                     help=r"Stop before this text (repeatable; \n, \t, \\, \xNN, \uNNNN are escapes)."),
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


_LOAD_KEYS = ("backend", "context_len", "threads", "gpu_layers", "parallel_slots", "engine_options")
_RENAMED = {"stop_token": "stop_tokens"}


def split_options(kw: dict[str, Any]) -> tuple[LoadConfig, GenerateConfig]:
    """Validated load and generation configs from the flags given (unset flags keep defaults).

    An out-of-range value is a usage error (exit status 2) naming the field.
    """
    import click

    given = {_RENAMED.get(k, k): v for k, v in kw.items() if v is not None and v != ()}
    load = {k: given.pop(k) for k in _LOAD_KEYS if k in given}
    try:
        return apply_load_opts(**load), apply_generate_opts(**given)
    except (ValueError, TypeError) as exc:
        raise click.UsageError(str(exc), click.get_current_context(silent=True)) from exc


_SIMPLE_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}
_HEX = frozenset("0123456789abcdefABCDEF")


def unescape(text: str) -> str:
    r"""``\n``, ``\t``, ``\r``, ``\\``, ``\xNN`` and ``\uNNNN`` as the characters they name.

    A backslash before anything else stays as typed (``C:\models`` is left alone); a
    malformed ``\x`` or ``\u``, or one naming a lone surrogate, is a ``ValueError``.
    """
    out: list[str] = []
    i = 0
    while i < len(text):
        ch, nxt = text[i], text[i + 1 : i + 2]
        if ch != "\\" or not nxt:
            out.append(ch)
            i += 1
        elif nxt in _SIMPLE_ESCAPES:
            out.append(_SIMPLE_ESCAPES[nxt])
            i += 2
        elif nxt in ("x", "u"):
            width = 2 if nxt == "x" else 4
            digits = text[i + 2 : i + 2 + width]
            if len(digits) != width or not _HEX.issuperset(digits):
                raise ValueError(f"\\{nxt} needs {width} hex digits: {text!r}")
            code = int(digits, 16)
            if 0xD800 <= code <= 0xDFFF:
                raise ValueError(f"\\u{digits} is a lone surrogate, not a character: {text!r}")
            out.append(chr(code))
            i += 2 + width
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def read_stdin_prompt() -> str:
    """The whole of stdin, without the one line ending a shell pipeline adds."""
    text = sys.stdin.read()
    if text.endswith("\n"):
        text = text[:-2] if text.endswith("\r\n") else text[:-1]
    return text
