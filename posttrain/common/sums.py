"""Named sums over the micro-batches of a step, kept on the device until one all-reduce."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

from posttrain.common.distributed import DistInfo, all_reduce_sum


class Sums:
    """Running sums of named statistics (a step's loss, token counts...).

    Values are added as device tensors (0-dim) or plain numbers and are never read back to
    the host while adding: a GPU loop runs without a sync per micro-batch. `all_reduced`
    stacks them into one float64 tensor, sums it over the ranks with one collective and
    returns plain floats. Every rank must hold the same names in the same order: `names`
    starts them at zero, for a rank that may have nothing to add.
    """

    def __init__(self, names: Iterable[str] = ()) -> None:
        self._values: dict[str, Tensor | float] = dict.fromkeys(names, 0.0)

    def add(self, values: Mapping[str, Tensor | float | int]) -> None:
        """Add each value to its running sum (a tensor is detached first)."""
        for name, value in values.items():
            if isinstance(value, Tensor):
                # float64 as the host sums had: many micro-batches add up exactly enough.
                value = value.detach().to(torch.float64).reshape(())
            else:
                value = float(value)
            self._values[name] = self._values.get(name, 0.0) + value

    def names(self) -> list[str]:
        return list(self._values)

    def all_reduced(self, info: DistInfo) -> dict[str, float]:
        """The sums over every rank, as plain floats: one all-reduce, one host copy."""
        if not self._values:
            return {}
        parts = [
            v.to(info.device)
            if isinstance(v, Tensor)
            else torch.tensor(v, dtype=torch.float64, device=info.device)
            for v in self._values.values()
        ]
        totals = all_reduce_sum(torch.stack(parts), info).tolist()
        return dict(zip(self._values, totals, strict=True))
