"""The instruct default answers simple questions right: a guard on templates and tokenization.

SmolLM2-135M-Instruct is small, but greedy on these questions it is right, and only
while its ChatML template, its BOS/EOS handling and its tokenizer are right. A
regression in any of them shows up here as a failed test, not as nonsense in a demo.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from core_inference import TextModel, chat_model_path, load_model

pytest.importorskip("llama_cpp", reason="needs core-inference[llama-cpp]")

# (question, a word the right answer contains, whether it ends within 48 tokens), each
# checked greedy on SmolLM2-135M-Instruct Q4_1 (the last two go on to explain themselves)
QUESTIONS = [
    ("What is 2+2?", "4", True),
    ("How many days are in a week?", "7", True),
    ("What is 10 times 3?", "30", True),
    ("Say hello in French.", "Bonjour", True),
    ("What is the opposite of hot?", "cold", False),
    ("What color is the sky on a clear day?", "blue", False),
]


@pytest.fixture(scope="module")
def model() -> Iterator[TextModel]:
    with load_model(chat_model_path(), backend="llama_cpp", threads=1) as m:
        yield m


@pytest.mark.parametrize(("question", "expected", "short"), QUESTIONS, ids=[q[0] for q in QUESTIONS])
def test_answers_right(model: TextModel, question: str, expected: str, short: bool) -> None:
    stream = model.chat([{"role": "user", "content": question}], temperature=0, max_tokens=48)
    answer = stream.text()
    assert expected.lower() in answer.lower(), answer
    if short:  # it stops by itself: the end-of-turn token is recognised
        assert stream.finish_reason == "end_of_text", (stream.finish_reason, answer)


def test_template_is_chatml_with_the_default_system_prompt(model: TextModel) -> None:
    prompt = model.chat_prompt([{"role": "user", "content": "Hi"}])
    assert prompt.startswith("<|im_start|>system\n"), prompt
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"), prompt
    ids = model.tokenize("<|im_start|>user")
    assert len(ids) == 2  # "<|im_start|>" is one special token, not a dozen tokens of text


def test_a_list_answer_stops_by_itself(model: TextModel) -> None:
    stream = model.chat([{"role": "user", "content": "Give me three tips for staying healthy."}],
                        temperature=0, max_tokens=400)
    text = stream.text()
    assert stream.finish_reason == "end_of_text", text
    assert "1." in text and "3." in text, text
