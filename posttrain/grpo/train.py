"""`train_grpo(config)` and `train_expert_iteration(config)`: the functions behind
`posttrain grpo` and `posttrain expert-iteration`, on the engine."""

from __future__ import annotations

from posttrain.config.grpo import ExpertIterationConfig, GRPOConfig
from posttrain.engine.loop import run_method
from posttrain.engine.settings import RunSettings
from posttrain.engine.setup import TrainResult
from posttrain.grpo.expert_iteration import ExpertIteration
from posttrain.grpo.method import GRPO


def train_grpo(config: GRPOConfig) -> TrainResult:
    """Train `config.model` with GRPO on the questions of `config.train_file`."""
    return run_method(GRPO(config), RunSettings.of(config))


def train_expert_iteration(config: ExpertIterationConfig) -> TrainResult:
    """Train `config.model` by expert iteration on the questions of `config.train_file`."""
    return run_method(ExpertIteration(config), RunSettings.of(config))
