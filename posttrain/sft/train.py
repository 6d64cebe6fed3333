"""`train(config)`: the function behind `posttrain sft`, supervised fine-tuning on the engine."""

from __future__ import annotations

from posttrain.config import SFTConfig
from posttrain.engine.loop import TrainingInterrupted, run_method
from posttrain.engine.run import TrainingError
from posttrain.engine.settings import RunSettings
from posttrain.engine.setup import TrainResult
from posttrain.sft.method import SFT
from posttrain.sft.objective import accumulate_gradients

__all__ = [
    "TrainResult",
    "TrainingError",
    "TrainingInterrupted",
    "accumulate_gradients",
    "train",
    "train_sft",
]


def train(config: SFTConfig) -> TrainResult:
    """Fine-tune `config.model` on `config.train_file`; return where the results are."""
    return run_method(SFT(config), RunSettings.of(config))


# The name `from posttrain import train_sft` gives.
train_sft = train
