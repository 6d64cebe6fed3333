"""Supervised fine-tuning: the `SFT` method on the engine (`method`), its data source
(`data`) and objective (`objective`), and `train.train_sft(config)`."""
