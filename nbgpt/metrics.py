"""Training logs as JSON Lines: one object per line, written by the trainer, read by plots and notebooks.

Record kinds (the "kind" field): "train" (step, loss, lr, grad_norm, dt, tokens_per_s, mfu, null on a GPU whose
peak is unknown; a step skipped for a non-finite loss or gradient has "nonfinite": true and null where a number was
not finite), "eval" (step, val_loss, val_batches: the validation batches averaged, whole_split: whether that was
all of them), "hellaswag" (step, acc_norm, acc, count), "sample" (step, text), "config" (step training starts or
resumes at, device, precision, world_size, micro_batch: the one in use where config may say "auto", parameters,
and config: every TrainConfig field), "event" (message). With a tracker (nbgpt.trackers), each record written goes
there too.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from .files import atomic_write_bytes


def strict(record: dict) -> dict:
    """NaN and infinities are not JSON (json.dumps would write the bare token NaN): they become null."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}


class MetricsLog:
    """Append-only JSONL file, flushed per record so a kill loses at most the line being written."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tracker = None  # W&B or TensorBoard, once mirror_to gives one

    def mirror_to(self, tracker) -> None:
        """Send every record written from now on to `tracker` too (an nbgpt.trackers.Mirror, or None)."""
        self.tracker = tracker

    def write(self, record: dict) -> None:
        record = strict(record)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, allow_nan=False) + "\n")
        if self.tracker is not None:  # after the file: the tracker sees only what the record holds
            self.tracker.log(record)

    def close(self) -> None:
        """Close the tracker (the file needs nothing: each record was flushed)."""
        if self.tracker is not None:
            self.tracker.close()
            self.tracker = None

    def truncate_from(self, step: int) -> None:
        """Drop records of `step` and later: a run resumed from the checkpoint of `step` redoes them."""
        if not self.path.is_file():
            return
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) < step]
        atomic_write_bytes(self.path, "".join(json.dumps(r) + "\n" for r in kept).encode())


def read_metrics(path: str | os.PathLike, kind: str | None = None) -> list[dict]:
    """All records (or those of one kind); a torn last line from a killed writer is ignored."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if kind is None or record.get("kind") == kind:
            records.append(record)
    return records
