"""Why training ends before its last step, and what to do next.

A signal: SIGTERM (a scheduler, a session limit, a preemption notice) or SIGINT (Ctrl-C, the JupyterLab stop
button) asks a run to stop, and it stops where nothing is lost. The handler only records the signal; the
training loop looks at the record between steps, and under DDP all ranks agree on it by an all-reduce (a rank
that left early would hang the others). A second signal means "now": the process exits at once, which harms
nothing because checkpoints are written atomically.

Divergence: a NaN or infinite loss or gradient is skipped by the trainer and counted here. One bad batch (a
rare overflow, a corrupt document) costs one step; several in a row mean the run itself has diverged (too high
a learning rate, a precision too narrow), and training stops, naming the last good checkpoint to go back to.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import threading
from pathlib import Path
from typing import Callable

from .errors import NbgptError

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


# How a stopped run goes on, unless whoever started it knows better (`nbgpt run` gives its own command): a
# Trainer, in a notebook or under `nbgpt train`, continues from its newest checkpoint by default.
RESUME = "run it again (with resume=True, the default, it continues from the newest checkpoint)"


class TrainingStopped(NbgptError):
    """Training, or the pipeline around it, ended before its last step. Every stop says the same three things,
    in one sentence built here: what happened, what to change first (if anything), and how to go on (`resume`).
    `signum` is the signal that asked for the stop (exit status 128 + it), None for a run that stopped itself
    (exit status 2)."""

    def __init__(self, what: str, signum: int | None = None, change: str = "", resume: str = RESUME):
        super().__init__(f"{what}. {change + '. ' if change else ''}To go on: {resume}")
        self.what, self.signum = what, signum

    @classmethod
    def by_signal(cls, signum: int, checkpoint_dir: Path | str, step: int | None = None) -> "TrainingStopped":
        at = "" if step is None else f" at step {step}"
        return cls(f"stopped by {signal_name(signum)}{at} with a checkpoint in {checkpoint_dir}", signum)

    @staticmethod
    def signal_in(text: str) -> int | None:
        """The signal a by_signal stop names in `text` (a torchrun worker's output, a kernel's error), else None:
        how a process that started the stopped one learns why it stopped."""
        said = re.search(r"stopped by (SIG[A-Z]+)(?: at step \d+)? with a checkpoint", text)
        return signal.Signals[said.group(1)] if said else None

    @property
    def exit_status(self) -> int:
        """128 + the signal, as a shell reports a process a signal ended; 2 for a run that stopped itself."""
        return 2 if self.signum is None else 128 + self.signum


class TrainingDiverged(TrainingStopped):
    """The loss or the gradient stayed NaN or infinite for max_bad_steps steps in a row."""


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


class DivergenceGuard:
    """Counts non-finite steps in a row; `latest_checkpoint` finds the newest checkpoint in `checkpoint_dir`."""

    def __init__(self, max_bad_steps: int, checkpoint_dir: Path,
                 latest_checkpoint: Callable[[Path], Path | None]):
        self.max_bad_steps, self.checkpoint_dir = max_bad_steps, checkpoint_dir
        self.latest_checkpoint = latest_checkpoint
        self.in_a_row = 0

    def observe(self, record: dict) -> None:
        """Count a train record (skipped steps carry "nonfinite"); raise TrainingDiverged at the limit."""
        self.in_a_row = self.in_a_row + 1 if record.get("nonfinite") else 0
        if self.in_a_row < self.max_bad_steps:
            return
        latest = self.latest_checkpoint(self.checkpoint_dir)
        kept = (f"the last good checkpoint is {latest}" if latest is not None else
                f"no checkpoint exists yet in {self.checkpoint_dir}")
        raise TrainingDiverged(
            f"the loss or gradient was not finite for {self.in_a_row} steps in a row (up to step "
            f"{record['step']}); those steps were skipped, so no update reached the weights; {kept}",
            change="Lower max_lr, raise warmup_steps, or use precision='fp32'/'bf16'")
