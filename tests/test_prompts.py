"""Prompt templates: built-ins, template files, rendering, chat prompts."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerFast

from posttrain.generation.prompts import (
    BUILTIN_TEMPLATES,
    PromptTemplate,
    build_prompts,
    chat_prompt_ids,
    load_template,
    render_prompts,
)

# The R1-Zero prompt as DeepSeek R1, Dr. GRPO and CS336 write it, character for character.
R1_ZERO_TEXT = (
    "A conversation between User and Assistant. The User asks a question, and the Assistant "
    "solves it. The Assistant first thinks about the reasoning process in the mind and then "
    "provides the User with the answer. The reasoning process is enclosed within <think> "
    "</think> and answer is enclosed within <answer> </answer> tags, respectively, i.e., "
    "<think> reasoning process here </think> <answer> answer here </answer>.\n"
    "User: What is 2 + 3?\n"
    "Assistant: <think>"
)


def test_r1_zero_renders_the_standard_prompt_and_stops_at_the_answer_tag() -> None:
    assert render_prompts("r1_zero", ["What is 2 + 3?"]) == [R1_ZERO_TEXT]
    assert load_template("r1_zero").stop == ("</answer>",)


def test_question_only_is_the_question_as_it_is() -> None:
    questions = ["What is 2 + 3?", "  spaced  \n", "{braces} and \\boxed{x}"]
    assert render_prompts("question_only", questions) == questions
    assert load_template("question_only").stop == ()
    assert set(BUILTIN_TEMPLATES) == {"r1_zero", "question_only"}


def test_a_template_file_keeps_other_braces_and_drops_one_trailing_newline(tmp_path) -> None:
    path = tmp_path / "boxed.txt"
    path.write_text("Solve: {question}\nPut the answer in \\boxed{}.\n", encoding="utf-8")
    template = load_template(str(path))
    assert template.stop == ()
    assert template.render("1 + 1") == "Solve: 1 + 1\nPut the answer in \\boxed{}."
    path.write_text("Q: {question}\nA:\n\n", encoding="utf-8")
    assert render_prompts(str(path), ["x"]) == ["Q: x\nA:\n"]


def test_a_template_without_the_placeholder_is_refused_by_name(tmp_path) -> None:
    path = tmp_path / "fixed.txt"
    path.write_text("Answer this: {q}\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"fixed.txt' has no \{question\} placeholder"):
        load_template(str(path))
    with pytest.raises(ValueError, match=r"template 'mine' has no \{question\}"):
        render_prompts(PromptTemplate("mine", "no placeholder"), ["x"])


def test_an_unknown_template_names_the_built_ins(tmp_path) -> None:
    with pytest.raises(ValueError, match="unknown prompt template 'r1zero': use one of r1_zero"):
        load_template("r1zero")
    with pytest.raises(ValueError, match="no such file"):
        load_template(str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="question 1 is a int"):
        render_prompts("question_only", ["ok", 3])  # type: ignore[list-item]


def test_chat_prompts_are_user_messages_with_the_generation_prompt(
    nobos_tokenizer: PreTrainedTokenizerFast,
) -> None:
    ids = chat_prompt_ids(nobos_tokenizer, ["What is 2 + 3?", "Hi"])
    text = nobos_tokenizer.decode(ids[0])
    assert text == "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"
    # The template's markers are single special tokens, not spelled out in pieces.
    im_start = nobos_tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert ids[1].count(im_start) == 2
    prompts, stops = build_prompts(nobos_tokenizer, ["What is 2 + 3?"], "r1_zero", chat=True)
    assert nobos_tokenizer.decode(prompts[0]).startswith("<|im_start|>user\nA conversation")
    assert stops == ("</answer>",)
    texts, _ = build_prompts(nobos_tokenizer, ["What is 2 + 3?"], "question_only")
    assert texts == ["What is 2 + 3?"]


def test_chat_prompts_need_a_chat_template(llama_tokenizer: PreTrainedTokenizerFast) -> None:
    plain = llama_tokenizer.__class__(
        tokenizer_object=llama_tokenizer.backend_tokenizer, eos_token="</s>"
    )
    assert plain.chat_template is None
    with pytest.raises(ValueError, match="need a chat template, but this tokenizer has none"):
        chat_prompt_ids(plain, ["x"])


def test_a_template_path_may_use_the_home_directory(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    (Path(tmp_path) / "t.txt").write_text("Q: {question}", encoding="utf-8")
    assert render_prompts("~/t.txt", ["x"]) == ["Q: x"]
