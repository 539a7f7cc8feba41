"""Built-in chat templates (exact text) and rendering a model's own Jinja template."""

from __future__ import annotations

import pytest

from core_inference import Message, ModelLoadError
from core_inference.templates import (
    BUILTIN_TEMPLATES,
    GEMMA3,
    LLAMA3,
    QWEN2,
    QWEN3,
    ChatTemplate,
    builtin_template,
    no_template_error,
    render_jinja,
)

CONVO = [
    Message("system", "You are terse."),
    Message("user", "Hi"),
    Message("assistant", "Hello!"),
    Message("user", "Bye"),
]
NO_SYSTEM = CONVO[1:]

# Gemma 3's own template, as its tokenizer_config.json ships it (text-only parts).
GEMMA3_HF_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {{- message['content'] | trim }}
    {{- '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""

# The ChatML template Qwen models ship (without the default system turn).
CHATML_HF_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)


def test_gemma3_exact_text() -> None:
    assert GEMMA3.render(CONVO) == (
        "<bos><start_of_turn>user\nYou are terse.\n\nHi<end_of_turn>\n"
        "<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\nBye<end_of_turn>\n"
        "<start_of_turn>model\n"
    )


def test_gemma3_without_system_and_with_stripped_content() -> None:
    assert GEMMA3.render([Message("user", "  Hi there \n")]) == (
        "<bos><start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n"
    )


def test_gemma3_matches_its_own_jinja_template() -> None:
    for convo in (CONVO, NO_SYSTEM, [Message("user", " padded ")]):
        assert render_jinja(GEMMA3_HF_TEMPLATE, convo, bos_token="<bos>") == GEMMA3.render(convo)


@pytest.mark.parametrize(
    "convo",
    [
        [Message("assistant", "I start")],
        [Message("user", "a"), Message("user", "b")],
        [Message("user", "a"), Message("system", "late system")],
    ],
)
def test_gemma3_rejects_what_its_template_rejects(convo: list[Message]) -> None:
    with pytest.raises(ValueError):
        GEMMA3.render(convo)


def test_qwen2_adds_the_default_system_prompt() -> None:
    assert QWEN2.render([Message("user", "Hi")]) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert QWEN2.render(CONVO) == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\nBye<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_qwen3_has_no_default_system_prompt() -> None:
    assert QWEN3.render(NO_SYSTEM) == (
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\nBye<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    for convo in (CONVO, NO_SYSTEM):
        assert render_jinja(CHATML_HF_TEMPLATE, convo) == QWEN3.render(convo)


def test_llama3_format() -> None:
    assert LLAMA3.render(CONVO) == (
        "<|begin_of_text|>"
        "<|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_end_of_turn_tokens() -> None:
    assert GEMMA3.end_of_turn == ("<end_of_turn>",)
    assert QWEN2.end_of_turn == QWEN3.end_of_turn == ("<|im_end|>",)
    assert LLAMA3.end_of_turn == ("<|eot_id|>",)


@pytest.mark.parametrize(
    ("arch", "template"),
    [("gemma3", GEMMA3), ("gemma3_text", GEMMA3), ("qwen2", QWEN2), ("qwen3", QWEN3), ("llama", LLAMA3)],
)
def test_builtin_template_when_the_vocabulary_has_every_special_token(
    arch: str, template: ChatTemplate
) -> None:
    vocab = set(template.special_tokens)
    assert builtin_template(arch, vocab.__contains__) is template


@pytest.mark.parametrize("template", [GEMMA3, QWEN2, QWEN3, LLAMA3])
def test_builtin_template_is_none_when_a_special_token_is_missing(template: ChatTemplate) -> None:
    arch = next(a for a, t in BUILTIN_TEMPLATES.items() if t is template)
    for missing in template.special_tokens:
        vocab = set(template.special_tokens) - {missing}
        assert builtin_template(arch, vocab.__contains__) is None


def test_builtin_template_is_none_for_an_unknown_architecture() -> None:
    assert builtin_template("phi3", lambda tok: True) is None
    assert builtin_template("", lambda tok: True) is None


def test_no_template_error() -> None:
    err = no_template_error("/models/x.gguf", "phi3")
    assert isinstance(err, ModelLoadError)
    text = str(err)
    assert "/models/x.gguf" in text and "'phi3'" in text
    for name in ("gemma3", "qwen2", "qwen3", "llama3"):
        assert name in text


def test_render_jinja_small_template_with_tokens() -> None:
    source = (
        "{{ bos_token }}{% for m in messages %}[{{ m.role | upper }}] {{ m.content }}{{ eos_token }}\n"
        "{% endfor %}{% if add_generation_prompt %}[ASSISTANT] {% endif %}"
    )
    msgs = [Message("user", "Hi"), Message("assistant", "Yo")]
    assert render_jinja(source, msgs, bos_token="<s>", eos_token="</s>") == (
        "<s>[USER] Hi</s>\n[ASSISTANT] Yo</s>\n[ASSISTANT] "
    )
    assert render_jinja(source, msgs, add_generation_prompt=False).endswith("Yo\n")


def test_render_jinja_loop_controls() -> None:
    source = (
        "{% for m in messages %}{% if m.role == 'assistant' %}{% break %}{% endif %}"
        "{{ m.content }};{% endfor %}"
    )
    assert render_jinja(source, NO_SYSTEM) == "Hi;"


def test_render_jinja_raise_exception_is_value_error() -> None:
    with pytest.raises(ValueError, match="roles must alternate"):
        render_jinja(GEMMA3_HF_TEMPLATE, [Message("assistant", "first")])


@pytest.mark.parametrize(
    "source",
    [
        "{% for m in messages %}{{ m.content }",  # syntax error
        "{{ messages.__class__.__mro__ }}",  # the sandbox refuses
        "{% set x = messages.append(1) %}",  # immutable sandbox
    ],
)
def test_render_jinja_bad_templates_are_value_errors(source: str) -> None:
    with pytest.raises(ValueError):
        render_jinja(source, NO_SYSTEM)
