"""Validation of token-id tensors before they reach an index kernel."""

from __future__ import annotations

import torch


def check_token_ids(name: str, ids: torch.Tensor, vocab_size: int) -> None:
    """Raise ValueError if `ids` is not an integer tensor, or naming its first id outside
    [0, vocab_size) (before it reaches an index kernel or a device-side assert)."""
    if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.is_complex():
        raise ValueError(f"{name} must be an integer tensor, got {ids.dtype}")
    bad = (ids < 0) | (ids >= vocab_size)
    if bool(bad.any()):
        value = int(ids[bad][0])
        where = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"{name} holds token id {value} at position {where}, outside the model's "
            f"vocabulary [0, {vocab_size}); mask ignored positions with a valid id (e.g. 0) "
            "instead of a sentinel such as -100"
        )
