"""The demo's task, as data: word reversal ("Reverse the word: daczsb =" -> "bszcad").

Torch-free, so that `posttrain demo --help` and the task's tests start fast; the run
itself (tokenizer, model, training, scoring) is `posttrain.demo.run`.

Word reversal was chosen because a tiny model learns it reliably for every seed: each
answer character is a copy of one prompt character, found by position, which two
attention layers do well. Multi-digit addition, tried first, stalled on a plateau for
some seeds.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass

PROMPT_PREFIX = "Reverse the word: "
PROMPT_SUFFIX = " ="
MIN_LETTERS = 3
MAX_LETTERS = 8
ALPHABET = string.ascii_lowercase

DEFAULT_OUTPUT_DIR = "runs/demo"
DEFAULT_MAX_STEPS = 300
# `posttrain demo --rl` writes elsewhere by default, so that it never asks to overwrite
# the plain demo's run.
DEFAULT_RL_OUTPUT_DIR = "runs/demo-rl"
# `posttrain demo --rl` keeps its SFT and GRPO runs in these sub-directories of DIR.
SFT_DIR, RL_DIR = "sft", "rl"
NUM_TRAIN = 20_000
NUM_EVAL = 200


class DemoError(ValueError):
    """A problem the user can fix (an occupied output directory, a bad argument)."""


@dataclass(frozen=True)
class DemoSettings:
    """Everything that shapes a demo run; saved as DIR/demo_config.json."""

    seed: int = 0
    max_steps: int = DEFAULT_MAX_STEPS
    num_train: int = NUM_TRAIN
    num_eval: int = NUM_EVAL
    arch: str = "llama"
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 512
    micro_batch_size: int = 64
    lr: float = 2e-3
    warmup_steps: int = 30
    num_threads: int = 1


@dataclass(frozen=True)
class RLDemoSettings:
    """Everything that shapes a `posttrain demo --rl` run; saved as DIR/demo_config.json.

    A short SFT run (`sft_steps` of the plain demo's recipe) leaves the model part-way,
    then GRPO with the `exact` reward trains it on its own samples: each step samples
    `group_size` answers to each of `questions_per_step` training words at temperature 1,
    on-policy (one optimizer step per rollout batch). Held-out greedy accuracy and
    mean@`eval_samples` are scored at the SFT model and after RL.
    """

    seed: int = 0
    sft_steps: int = 130
    # At 100 steps seed 1 rose only 61.5% -> 66.0%; 150 steps still fit in 5 minutes.
    rl_steps: int = 150
    num_eval: int = NUM_EVAL
    questions_per_step: int = 32
    group_size: int = 8
    # Rollouts per forward/backward pass: the whole batch in one pass was the fastest
    # (0.74 s against 0.86 s per step in micro-batches of 64); the result is the same.
    micro_batch_size: int = 256
    # Optimizer steps per rollout batch (each on 1/N of it; 1: on-policy).
    updates_per_step: int = 1
    lr: float = 1e-4
    adam_beta2: float = 0.95
    temperature: float = 1.0
    # Held-out greedy accuracy every this many RL steps (the plot's accuracy curve).
    eval_every: int = 10
    # Samples per held-out word at temperature 1 for mean@N.
    eval_samples: int = 8
    num_threads: int = 1

    def sft(self) -> DemoSettings:
        """The plain demo's settings for the SFT stage."""
        return DemoSettings(
            seed=self.seed,
            max_steps=self.sft_steps,
            num_eval=self.num_eval,
            num_threads=self.num_threads,
        )


def reversal_prompt(word: str) -> str:
    """The prompt asking to reverse `word`: `Reverse the word: daczsb =`.

    The trailing " =" marks where the word ends and the answer begins; without it the
    model can't tell, while generating, whether a letter belongs to the word or to its
    answer ("abc" + "c" reads like the word "abcc").
    """
    return f"{PROMPT_PREFIX}{word}{PROMPT_SUFFIX}"


def make_reversal_examples(
    num_train: int, num_eval: int, seed: int
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Train and held-out `{"prompt", "response"}` examples of word reversal.

    Words are random lowercase strings of 3 to 8 letters (length uniform), all
    distinct, so no held-out word is ever seen in training. The same seed gives the
    same examples.
    """
    if num_train < 1 or num_eval < 1:
        raise DemoError(
            f"need at least one train and one eval example, got {num_train}, {num_eval}"
        )
    rng = random.Random(seed)
    words: list[str] = []
    seen: set[str] = set()
    while len(words) < num_train + num_eval:
        length = rng.randint(MIN_LETTERS, MAX_LETTERS)
        word = "".join(rng.choice(ALPHABET) for _ in range(length))
        if word not in seen:
            seen.add(word)
            words.append(word)
    examples = [{"prompt": reversal_prompt(w), "response": w[::-1]} for w in words]
    return examples[num_eval:], examples[:num_eval]
