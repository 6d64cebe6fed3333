"""Supervised fine-tuning: the `SFT` method on the engine and `train_sft(config)`."""

from posttrain.sft.train import train as train_sft

__all__ = ["train_sft"]
