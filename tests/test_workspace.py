"""The head kernels' reusable scratch: buffers reused by name, casts kept until stale."""

from __future__ import annotations

import torch

from posttrain.ops.workspace import Workspace

CPU = torch.device("cpu")


def test_rows_reuses_storage_until_a_larger_request() -> None:
    ws = Workspace()
    first = ws.rows("logits", 8, 5, torch.float32, CPU)
    assert first.shape == (8, 5)
    smaller = ws.rows("logits", 3, 5, torch.float32, CPU)
    assert smaller.shape == (3, 5) and smaller.data_ptr() == first.data_ptr()
    larger = ws.rows("logits", 9, 5, torch.float32, CPU)
    assert larger.shape == (9, 5)
    # Another width, dtype or name never aliases the buffer.
    assert ws.rows("logits", 9, 5, torch.float32, CPU).data_ptr() == larger.data_ptr()
    assert ws.rows("logits", 9, 4, torch.float32, CPU).shape == (9, 4)
    assert ws.rows("logits", 9, 4, torch.bfloat16, CPU).dtype == torch.bfloat16
    other = ws.rows("probs", 9, 4, torch.bfloat16, CPU)
    assert other.data_ptr() != ws.rows("logits", 9, 4, torch.bfloat16, CPU).data_ptr()


def test_cast_is_kept_until_the_weight_changes() -> None:
    weight = torch.randn(6, 4)
    ws = Workspace()
    low = ws.cast("w", weight, torch.bfloat16)
    torch.testing.assert_close(low, weight.to(torch.bfloat16), rtol=0, atol=0)
    assert ws.cast("w", weight, torch.bfloat16) is low
    assert ws.is_cached("w")
    with torch.no_grad():
        weight.add_(1.0)  # an optimizer step bumps the version
    fresh = ws.cast("w", weight, torch.bfloat16)
    assert fresh is not low
    torch.testing.assert_close(fresh, weight.to(torch.bfloat16), rtol=0, atol=0)


def test_forget_casts_catches_changes_that_keep_the_version() -> None:
    # FSDP gathers a sharded weight into the same storage without bumping its version.
    weight = torch.randn(6, 4)
    ws = Workspace()
    low = ws.cast("w", weight, torch.bfloat16)
    with torch.no_grad(), torch.autograd._unsafe_preserve_version_counter(weight):
        weight.mul_(3.0)
    assert ws.cast("w", weight, torch.bfloat16) is low  # the cache cannot see it...
    ws.forget_casts()  # ...so the training loop forgets casts after every step
    assert not ws.is_cached("w")
    torch.testing.assert_close(
        ws.cast("w", weight, torch.bfloat16), weight.to(torch.bfloat16), rtol=0, atol=0
    )


def test_cast_to_the_same_dtype_is_the_weight_itself() -> None:
    weight = torch.randn(3, 2, requires_grad=True)
    ws = Workspace()
    same = ws.cast("w", weight, torch.float32)
    assert same.data_ptr() == weight.data_ptr() and not same.requires_grad
    assert not ws.is_cached("w")


def test_nbytes_counts_what_is_held_and_release_frees_it() -> None:
    ws = Workspace()
    ws.rows("logits", 4, 8, torch.float32, CPU)
    ws.rows("logits", 2, 8, torch.float32, CPU)  # reused: nothing more held
    ws.cast("w", torch.randn(2, 3), torch.bfloat16)
    assert ws.nbytes == 4 * 8 * 4 + 2 * 3 * 2
    ws.release()
    assert ws.nbytes == 0 and not ws.is_cached("w")
