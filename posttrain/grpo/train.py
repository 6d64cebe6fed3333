"""`train_grpo(config)`: the function behind `posttrain grpo`, RL on the engine."""

from __future__ import annotations

from posttrain.config.grpo import GRPOConfig
from posttrain.engine.loop import run_method
from posttrain.engine.settings import RunSettings
from posttrain.engine.setup import TrainResult
from posttrain.grpo.method import GRPO


def train_grpo(config: GRPOConfig) -> TrainResult:
    """Train `config.model` with GRPO on the questions of `config.train_file`."""
    return run_method(GRPO(config), RunSettings.of(config))
