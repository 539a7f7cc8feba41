"""Chat templates: the model's own (Jinja, rendered when jinja2 is installed) or a built-in one.

A built-in template is used only when the model's architecture names it *and* the
vocabulary holds every special token it writes, so a template is never guessed wrong.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .errors import ModelLoadError
from .types import Message


@dataclass(frozen=True, slots=True)
class ChatTemplate:
    """A built-in chat format: how to render a conversation and which tokens end a turn."""

    name: str
    render: Callable[[Sequence[Message]], str]
    special_tokens: tuple[str, ...]
    end_of_turn: tuple[str, ...]


def _gemma3(messages: Sequence[Message]) -> str:
    prefix = ""
    turns = list(messages)
    if turns and turns[0].role == "system":
        prefix = turns[0].content + "\n\n"
        turns = turns[1:]
    out = ["<bos>"]
    for i, m in enumerate(turns):
        if m.role == "system":
            raise ValueError("gemma3: a system message is allowed only first")
        if (m.role == "user") != (i % 2 == 0):
            raise ValueError("gemma3: roles must alternate user/assistant/user/...")
        role = "model" if m.role == "assistant" else "user"
        first = prefix if i == 0 else ""
        out.append(f"<start_of_turn>{role}\n{first}{m.content.strip()}<end_of_turn>\n")
    out.append("<start_of_turn>model\n")
    return "".join(out)


def _chatml(default_system: str | None) -> Callable[[Sequence[Message]], str]:
    def render(messages: Sequence[Message]) -> str:
        out = []
        if default_system is not None and messages[0].role != "system":
            out.append(f"<|im_start|>system\n{default_system}<|im_end|>\n")
        out += [f"<|im_start|>{m.role}\n{m.content}<|im_end|>\n" for m in messages]
        out.append("<|im_start|>assistant\n")
        return "".join(out)

    return render


def _llama3(messages: Sequence[Message]) -> str:
    out = ["<|begin_of_text|>"]
    out += [
        f"<|start_header_id|>{m.role}<|end_header_id|>\n\n{m.content.strip()}<|eot_id|>"
        for m in messages
    ]
    out.append("<|start_header_id|>assistant<|end_header_id|>\n\n")
    return "".join(out)


GEMMA3 = ChatTemplate("gemma3", _gemma3, ("<start_of_turn>", "<end_of_turn>"), ("<end_of_turn>",))
QWEN2 = ChatTemplate(
    "qwen2", _chatml("You are a helpful assistant."), ("<|im_start|>", "<|im_end|>"), ("<|im_end|>",)
)
QWEN3 = ChatTemplate("qwen3", _chatml(None), ("<|im_start|>", "<|im_end|>"), ("<|im_end|>",))
LLAMA3 = ChatTemplate(
    "llama3",
    _llama3,
    ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    ("<|eot_id|>",),
)

# architecture name (GGUF general.architecture or HF model_type) -> template
BUILTIN_TEMPLATES: dict[str, ChatTemplate] = {
    "gemma3": GEMMA3,
    "gemma3_text": GEMMA3,
    "qwen2": QWEN2,
    "qwen2_moe": QWEN2,
    "qwen3": QWEN3,
    "qwen3_moe": QWEN3,
    "llama": LLAMA3,
    "llama3": LLAMA3,
}


def builtin_template(architecture: str, has_token: Callable[[str], bool]) -> ChatTemplate | None:
    """The built-in template for ``architecture`` if the vocabulary holds all its tokens."""
    template = BUILTIN_TEMPLATES.get(architecture)
    if template is None or not all(has_token(t) for t in template.special_tokens):
        return None
    return template


def no_template_error(path: str, architecture: str) -> ModelLoadError:
    """The error for a model with no template of its own and no built-in one."""
    known = ", ".join(sorted({t.name for t in BUILTIN_TEMPLATES.values()}))
    return ModelLoadError(
        f"{path}: the model carries no chat template and architecture {architecture!r} "
        f"has no built-in one (built-in: {known}); use generate() with your own prompt"
    )


def render_jinja(
    source: str,
    messages: Sequence[Message],
    bos_token: str = "",
    eos_token: str = "",
    add_generation_prompt: bool = True,
) -> str:
    """Render a Hugging Face style Jinja chat template in a sandbox (needs jinja2)."""
    try:
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as exc:
        raise ModelLoadError("rendering the model's chat template needs jinja2: pip install jinja2") from exc

    def raise_exception(message: str) -> None:
        raise ValueError(f"chat template: {message}")

    # as transformers renders them: some templates use {% break %} / {% continue %}
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(source).render(
            messages=[m.to_dict() for m in messages],
            bos_token=bos_token,
            eos_token=eos_token,
            add_generation_prompt=add_generation_prompt,
        )
    except TemplateError as exc:
        raise ValueError(f"chat template failed: {exc}") from exc
