"""Stopping a run cleanly on SIGINT (Ctrl-C) or SIGTERM (what job schedulers send before
they kill a job): the current optimizer step finishes, a checkpoint is written, the
process exits with 128 + the signal number."""

from __future__ import annotations

import signal
import threading
from types import FrameType, TracebackType

import torch

from posttrain.common.distributed import DistInfo, all_reduce_max

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """Records the first SIGINT/SIGTERM while active; a second SIGINT interrupts at once.

    Handlers are installed only in the main thread (signals are delivered there), and
    the previous handlers are restored on exit.
    """

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: the user does not want to wait
        self.signum = self.signum or signum

    def agreed(self, info: DistInfo) -> int:
        """The signal any rank received (0: none); every rank must call this together, so
        all stop after the same step."""
        if not info.is_distributed:
            return self.signum
        flag = torch.tensor(float(self.signum), dtype=torch.float64, device=info.device)
        return int(all_reduce_max(flag, info))
