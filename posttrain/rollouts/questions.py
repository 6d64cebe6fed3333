"""The questions an RL run samples from: prompts as token ids, gold answers, and which
questions each step takes.

Each epoch visits every question once in an order shuffled from (seed, epoch); step `s`
takes the next `questions_per_step` of that stream, epoch after epoch. The choice is a
function of the seed and the step alone, so a resumed run (on any number of ranks)
takes the same questions with no saved position.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from posttrain.data.tokenized import end_of_turn_token_ids
from posttrain.evaluation.answers import load_eval_data
from posttrain.generation.decode import encode_prompts
from posttrain.generation.prompts import build_prompts
from posttrain.rewards import RewardFn


@dataclass
class Questions:
    """Prompt token ids, gold answers and where each came from (file:line)."""

    prompt_ids: list[list[int]]
    golds: list[str]
    sources: list[str]
    stop: tuple[str, ...]
    stop_token_ids: list[int]
    # The order of the last epoch asked for: ((seed, epoch), question indices).
    _order_cache: tuple[tuple[int, int], list[int]] | None = field(
        default=None, init=False, repr=False
    )

    def __len__(self) -> int:
        return len(self.golds)

    def for_step(self, seed: int, step: int, per_step: int) -> list[int]:
        """The question indices of step `step` (0-based), in the order they are sampled."""
        start = step * per_step
        chosen = []
        for position in range(start, start + per_step):
            epoch, index = divmod(position, len(self))
            chosen.append(self._order(seed, epoch)[index])
        return chosen

    def _order(self, seed: int, epoch: int) -> list[int]:
        if self._order_cache is None or self._order_cache[0] != (seed, epoch):
            generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            order = torch.randperm(len(self), generator=generator).tolist()
            self._order_cache = ((seed, epoch), order)
        return self._order_cache[1]


def load_questions(
    path: str,
    tokenizer: Any,
    *,
    prompt_field: str | None,
    answer_field: str | None,
    template: str,
    chat: bool,
    reward_fn: RewardFn | None,
    vocab_size: int,
) -> Questions:
    """Read the questions and golds (every gold checked against a built-in reward), render
    the template and tokenize: every input error surfaces here, before the model loads."""
    data = load_eval_data(path, prompt_field, answer_field, reward_fn=reward_fn)
    prompts, stop = build_prompts(tokenizer, data.questions, template, chat=chat)
    return Questions(
        prompt_ids=encode_prompts(tokenizer, prompts, True, vocab_size),
        golds=data.golds,
        sources=data.sources,
        stop=tuple(stop),
        stop_token_ids=end_of_turn_token_ids(tokenizer),
    )
