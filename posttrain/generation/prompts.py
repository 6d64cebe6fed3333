"""Prompt templates for generation-based evaluation: built-ins by name, or a text file.

A template is text with a `{question}` placeholder, replaced by each question. Only that
exact placeholder is substituted (no `str.format`), so a template may hold other braces,
e.g. LaTeX's `\\boxed{}`. Built-ins:

- `r1_zero`: the R1-Zero prompt of DeepSeek R1, Dr. GRPO and CS336, which ends with
  `Assistant: <think>` so that the model continues its reasoning and closes with
  `</think> <answer> ... </answer>`; it implies the stop string `</answer>`.
- `question_only`: the question as it is.

`chat_prompt_ids` then wraps prompts as user messages through a tokenizer's chat template.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from transformers.tokenization_utils_base import PreTrainedTokenizerBase

PLACEHOLDER = "{question}"

R1_ZERO = (
    "A conversation between User and Assistant. The User asks a question, and the Assistant "
    "solves it. The Assistant first thinks about the reasoning process in the mind and then "
    "provides the User with the answer. The reasoning process is enclosed within "
    "<think> </think> and answer is enclosed within <answer> </answer> tags, respectively, "
    "i.e., <think> reasoning process here </think> <answer> answer here </answer>.\n"
    "User: {question}\n"
    "Assistant: <think>"
)
QUESTION_ONLY = PLACEHOLDER

BUILTIN_TEMPLATES: dict[str, str] = {"r1_zero": R1_ZERO, "question_only": QUESTION_ONLY}
# The stop strings a built-in implies when the caller gives none: r1_zero's answer is
# complete at its closing tag, and whatever a model writes after it is never graded.
DEFAULT_STOPS: dict[str, tuple[str, ...]] = {"r1_zero": ("</answer>",)}


@dataclass(frozen=True)
class PromptTemplate:
    """A named template: `text` holds `{question}`; `stop` are the stop strings it implies."""

    name: str
    text: str
    stop: tuple[str, ...] = ()

    def render(self, question: str) -> str:
        """The prompt for one question."""
        return self.text.replace(PLACEHOLDER, question)


def load_template(template: str | PromptTemplate) -> PromptTemplate:
    """The template called `template`: a built-in name or the path of a UTF-8 text file.

    A file's single trailing newline (which editors add) is dropped; write two to keep
    one. Raises ValueError, naming the template, for an unknown name, a missing or
    unreadable file, or a template without `{question}`.
    """
    if isinstance(template, PromptTemplate):
        return _checked(template)
    if not isinstance(template, str) or not template.strip():
        raise ValueError(f"prompt template must be a name or a file path, got {template!r}")
    if template in BUILTIN_TEMPLATES:
        return PromptTemplate(
            template, BUILTIN_TEMPLATES[template], DEFAULT_STOPS.get(template, ())
        )
    path = Path(template).expanduser()
    if not path.is_file():
        known = ", ".join(BUILTIN_TEMPLATES)
        raise ValueError(
            f"unknown prompt template {template!r}: use one of {known}, or the path of a "
            f"text file holding {PLACEHOLDER} (no such file)"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read prompt template file {path}: {exc}") from None
    return _checked(PromptTemplate(str(path), text.removesuffix("\n")))


def _checked(template: PromptTemplate) -> PromptTemplate:
    if PLACEHOLDER not in template.text:
        raise ValueError(
            f"prompt template {template.name!r} has no {PLACEHOLDER} placeholder, so every "
            f"prompt would be the same text: {template.text[:80]!r}"
        )
    return template


def render_prompts(template: str | PromptTemplate, questions: Sequence[str]) -> list[str]:
    """Each question rendered through `template` (a name, a file path or a PromptTemplate)."""
    loaded = load_template(template)
    for i, question in enumerate(questions):
        if not isinstance(question, str):
            raise ValueError(f"question {i} is a {type(question).__name__}, not a string")
    return [loaded.render(question) for question in questions]


def chat_prompt_ids(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text sent as one user message, with the assistant's generation
    prompt: one list of ints per text.

    The rendering is tokenized without adding special tokens, as `posttrain sft` tokenizes
    chats: templates write their own (a Llama 3 template renders its BOS). Raises
    ValueError when the tokenizer has no chat template or the template fails.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            "chat prompts need a chat template, but this tokenizer has none: drop --chat to "
            "use the prompts as plain text"
        )
    rendered = []
    for i, text in enumerate(texts):
        messages = [{"role": "user", "content": text}]
        try:
            rendered.append(
                tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            )
        except Exception as exc:  # jinja errors (raise_exception in templates) and others
            raise ValueError(f"the chat template failed on prompt {i}: {exc}") from None
    if not rendered:
        return []
    return [list(ids) for ids in tokenizer(rendered, add_special_tokens=False)["input_ids"]]


def build_prompts(
    tokenizer: PreTrainedTokenizerBase,
    questions: Sequence[str],
    template: str | PromptTemplate = "question_only",
    chat: bool = False,
) -> tuple[list[str] | list[list[int]], tuple[str, ...]]:
    """(prompts, the template's stop strings) for `questions`: rendered through
    `template`, then, with `chat`, token ids through the chat template (else the texts,
    which generation tokenizes with the tokenizer's special tokens)."""
    loaded = load_template(template)
    texts = render_prompts(loaded, questions)
    return (chat_prompt_ids(tokenizer, texts) if chat else texts), loaded.stop
