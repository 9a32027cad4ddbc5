"""Stopping on request: SIGTERM (a scheduler, a session limit, a preemption notice) or SIGINT (Ctrl-C, the
JupyterLab stop button) asks a run to stop, and it stops where nothing is lost.

The handler only records the signal. The training loop looks at the record between steps; under DDP every
rank must stop after the same step (a rank that left early would hang the others in an all-reduce), so
the ranks agree by an all-reduce of the flag. A second signal means "now": the process exits at once,
which harms nothing because checkpoints are written atomically.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Callable

import torch

from .distributed import DistInfo, all_reduce_max

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class TrainingStopped(RuntimeError):
    """Training stopped on a signal after checkpointing; `signum` is the signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


class StopSignals:
    """While active (a `with` block in the main thread), SIGTERM/SIGINT are recorded instead of killing.

    `forward(signum)`, if given, passes every signal on (to the workers that do the stopping) and makes a
    second signal pass on too instead of exiting. Elsewhere than the main thread, signals cannot be caught
    and this does nothing.
    """

    def __init__(self, forward: Callable[[int], None] | None = None):
        self.forward = forward
        self.signum: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        first = self.signum is None
        self.signum = signum if first else self.signum
        if self.forward is not None:
            self.forward(signum)
        elif first:
            print(f"{signal_name(signum)}: stopping after this step, with a checkpoint (again: exit at once)",
                  file=sys.stderr, flush=True)
        else:
            print(f"{signal_name(signum)} again: exiting now; the checkpoints on disk are intact",
                  file=sys.stderr, flush=True)
            os._exit(128 + signum)

    def agreed(self, dist: DistInfo, device: torch.device) -> int:
        """The signal any rank received (0: none); every rank gets the same answer."""
        flag = torch.tensor(float(self.signum or 0), device=device)
        return int(all_reduce_max(flag, dist).item())
