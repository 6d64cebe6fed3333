"""`train_dpo(config)`: the function behind `posttrain dpo`, on the engine."""

from __future__ import annotations

from posttrain.config.dpo import DPOConfig
from posttrain.dpo.method import DPO
from posttrain.engine.loop import run_method
from posttrain.engine.settings import RunSettings
from posttrain.engine.setup import TrainResult


def train_dpo(config: DPOConfig) -> TrainResult:
    """Train `config.model` with DPO on the preference pairs of `config.train_file`."""
    return run_method(DPO(config), RunSettings.of(config))
