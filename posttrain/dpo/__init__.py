"""Direct Preference Optimization: the `DPO` method on the engine (`method`), `train_dpo`
(`train`), and CS336's `compute_per_instance_dpo_loss` and `dpo_loss` (defined in
`posttrain.losses.dpo`)."""

from posttrain.losses.dpo import compute_per_instance_dpo_loss, dpo_loss

__all__ = ["compute_per_instance_dpo_loss", "dpo_loss"]
