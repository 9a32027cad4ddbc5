"""Non-finite steps: a NaN or infinite loss or gradient is skipped by the trainer, and counted here.

One bad batch (a rare overflow, a corrupt document) costs one step. Several in a row mean the run itself
has diverged (too high a learning rate, a precision too narrow): training stops, naming the last good
checkpoint to go back to, or saying there is none yet.
"""

from __future__ import annotations

from pathlib import Path

from .checkpoint import latest_checkpoint


class TrainingDiverged(RuntimeError):
    """The loss or the gradient stayed NaN or infinite for max_bad_steps steps in a row."""


class DivergenceGuard:
    def __init__(self, max_bad_steps: int, checkpoint_dir: Path):
        self.max_bad_steps, self.checkpoint_dir = max_bad_steps, checkpoint_dir
        self.in_a_row = 0

    def observe(self, record: dict) -> None:
        """Count a train record (skipped steps carry "nonfinite"); raise TrainingDiverged at the limit."""
        self.in_a_row = self.in_a_row + 1 if record.get("nonfinite") else 0
        if self.in_a_row < self.max_bad_steps:
            return
        latest = latest_checkpoint(self.checkpoint_dir)
        kept = (f"the last good checkpoint is {latest}" if latest is not None else
                f"no checkpoint exists yet in {self.checkpoint_dir}")
        raise TrainingDiverged(
            f"the loss or gradient was not finite for {self.in_a_row} steps in a row (up to step "
            f"{record['step']}); those steps were skipped, so no update reached the weights; {kept}. Lower "
            f"max_lr, raise warmup_steps, or use precision='fp32'/'bf16', then resume")
