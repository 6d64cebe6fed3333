"""Scratch tensors that the chunked head kernels reuse from one call to the next.

On CPU every fresh vocabulary-sized tensor is a new mmap whose page faults the first
write pays for: about 40 ms for a 256 x 151,936 float32 chunk (155 MB) here, a fifth of
the matmul that fills it. A `Workspace` owned by the caller (the training loss) keeps the
chunk buffers between calls and keeps the narrowed copy of the head weight between the
micro-batches of an optimizer step. Without one, every call allocates afresh and frees on return.
"""

from __future__ import annotations

import torch
from torch import Tensor


class Workspace:
    """Grow-only scratch buffers by name, and cached dtype casts of weights.

    Buffer contents are undefined between calls; callers overwrite before reading. A
    cast is reused while the weight is the same tensor at the same version (an in-place
    update such as an optimizer step bumps the version), and until `forget_casts()`,
    which the training loop calls after each optimizer step because a sharded (FSDP)
    weight is gathered into storage whose version it does not bump.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, Tensor] = {}
        self._casts: dict[str, tuple[tuple, Tensor]] = {}

    def rows(
        self, name: str, rows: int, width: int, dtype: torch.dtype, device: torch.device
    ) -> Tensor:
        """A (rows, width) tensor of `dtype` on `device`, contents undefined.

        Reuses the buffer of that name when it has at least `rows` rows of that width,
        dtype and device; otherwise replaces it (the old one is released first).
        """
        buf = self._buffers.get(name)
        fits = (
            buf is not None
            and buf.dtype == dtype
            and buf.device == device
            and buf.shape[1] == width
            and buf.shape[0] >= rows
        )
        if not fits:
            self._buffers.pop(name, None)
            buf = torch.empty(rows, width, dtype=dtype, device=device)
            self._buffers[name] = buf
        return buf[:rows]

    def cast(self, name: str, weight: Tensor, dtype: torch.dtype) -> Tensor:
        """`weight.to(dtype)`, detached; the copy is kept for later calls with the same
        weight (same storage, shape and version) until `forget_casts()`."""
        if weight.dtype == dtype:
            return weight.detach()
        key = (weight.data_ptr(), weight.shape, weight.stride(), weight._version, dtype)
        cached = self._casts.get(name)
        if cached is not None and cached[0] == key:
            return cached[1]
        self._casts.pop(name, None)
        copy = weight.detach().to(dtype)
        self._casts[name] = (key, copy)
        return copy

    def is_cached(self, name: str) -> bool:
        """Whether a cast of that name is held."""
        return name in self._casts

    @property
    def nbytes(self) -> int:
        """Bytes held in buffers and casts."""
        held = [*self._buffers.values(), *(copy for _, copy in self._casts.values())]
        return sum(t.untyped_storage().nbytes() for t in held)

    def forget_casts(self) -> None:
        """Drop every cached cast: the weights have changed (an optimizer step)."""
        self._casts.clear()

    def release(self) -> None:
        """Free every buffer and cast (before memory-hungry work such as generation)."""
        self._buffers.clear()
        self._casts.clear()
