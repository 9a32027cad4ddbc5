"""What a run records and shows: metrics.jsonl for code (below), readable lines and tqdm bars for people (further
down).

The record is JSON Lines: one object per line, written by the trainer, read by plots and notebooks.

Record kinds (the "kind" field): "train" (step, loss, lr, grad_norm, dt, tokens_per_s, mfu, null on a GPU whose
peak is unknown; a step skipped for a non-finite loss or gradient has "nonfinite": true and null where a number was
not finite), "eval" (step, val_loss, val_batches: the validation batches averaged, whole_split: whether that was
all of them), "hellaswag" (step, acc_norm, acc, count), "sample" (step, text), "config" (step training starts or
resumes at, device, precision, world_size, micro_batch: the one in use where config may say "auto", parameters,
and config: every TrainConfig field), "event" (message). With a tracker (nbgpt.trackers), each record written goes
there too.
"""

from __future__ import annotations

import io
import json
import math
import os
import sys
from pathlib import Path
from typing import Callable

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


# What a run shows while it trains: tqdm bars, and one readable line per log interval in `train.log`.
#
# The lines are for people (the terminal of `nbgpt train`, the notebook's output, `tail -f train.log`, and
# `nbgpt run`, which streams the file); metrics.jsonl stays the record that plots and code read.


def _kernel():
    """The IPython kernel this code runs in, or None (a terminal, a script, a torchrun worker)."""
    try:
        from IPython import get_ipython
    except ImportError:
        return None
    return getattr(get_ipython(), "kernel", None)


def watched() -> bool:
    """Whether someone watches the output as it is drawn: a terminal, or a kernel taking input (JupyterLab).

    papermill (nbclient) executes with stdin off, and a redirected stream (`> log 2>&1`) is no terminal: there a
    bar's redraws ("\r") would be kept one after another in the saved notebook, or glued onto the log's lines.
    """
    kernel = _kernel()
    if kernel is not None:
        return getattr(kernel, "_allow_stdin", True)
    return sys.stderr.isatty()


class LineFrames(io.TextIOBase):
    """A stream for tqdm where nobody watches: each frame it draws becomes one whole line, so a log or a saved
    notebook reads top to bottom. Repeated frames (tqdm redraws the last one on closing) are written once."""

    def __init__(self, stream):
        self.stream, self.last = stream, None

    def write(self, text: str) -> int:
        for frame in text.split("\r"):
            frame = frame.strip()
            if frame and frame != self.last:
                self.stream.write(frame + "\n")
                self.last = frame
        self.stream.flush()
        return len(text)


# Seconds between frames where nobody watches: a readable log of a long job, not a flip-book.
UNWATCHED_INTERVAL = 30.0


def progress_bar(**kwargs):
    """A tqdm bar: the widget in JupyterLab and a redrawn bar in a terminal; elsewhere (a notebook executed by
    papermill, output redirected to a file) a line every UNWATCHED_INTERVAL seconds."""
    if watched():
        from tqdm.auto import tqdm
    else:
        from tqdm.std import tqdm

        kwargs.update(file=LineFrames(sys.stderr), mininterval=UNWATCHED_INTERVAL, maxinterval=UNWATCHED_INTERVAL,
                      dynamic_ncols=False, ncols=100)
    return tqdm(**kwargs)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _number(value, spec: str) -> str:
    return "n/a" if value is None or not math.isfinite(value) else format(value, spec)


def _percent(fraction: float | None) -> str:
    return "n/a" if fraction is None else f"{100 * fraction:.1f}%"  # None: MFU of a GPU whose peak is unknown


def eval_scope(record: dict) -> str:
    """What an evaluation record averaged over, as a label: the final one may cover the whole validation split
    (final_eval_batches=0) where the others take eval_batches, so its point is not comparable as it stands.
    Empty for records written before evaluations said so."""
    if "val_batches" not in record:
        return ""
    whole = "whole validation split, " if record.get("whole_split") else ""
    return f" ({whole}{record['val_batches']} batches)"


def format_record(record: dict, max_steps: int, elapsed: float, per_step: float,
                  max_seconds: float | None = None) -> str:
    """One line for a metrics record: train steps with throughput and ETA, evaluations, samples, events.

    With a time budget the ETA is at most the time left: before the first steps fit the horizon to the
    budget, max_steps is only a cap."""
    kind, step = record.get("kind"), record.get("step")
    if kind == "train":
        remaining = max(0, max_steps - step - 1) * per_step
        if max_seconds is not None:
            remaining = min(remaining, max(0.0, max_seconds - elapsed))
        eta = _duration(remaining)
        skipped = "  (skipped: non-finite)" if record.get("nonfinite") else ""
        return (f"step {step:6d}/{max_steps} | loss {_number(record['loss'], '.4f')} | lr {record['lr']:.2e} | "
                f"{record['tokens_per_s']:,.0f} tok/s | MFU {_percent(record.get('mfu'))} | "
                f"elapsed {_duration(elapsed)} | ETA {eta}{skipped}")
    if kind == "eval":
        return f"step {step:6d} | val loss {record['val_loss']:.4f}{eval_scope(record)}"
    if kind == "hellaswag":
        if "acc_norm" not in record:
            return f"step {step:6d} | HellaSwag skipped: {record.get('skipped', record)}"
        return f"step {step:6d} | HellaSwag acc_norm {record['acc_norm']:.4f} ({record.get('count')} examples)"
    if kind == "sample":
        return f"step {step:6d} | sample: {record['text']!r}"
    return str(record.get("message", record))


class ProgressLog:
    """Prints lines and appends them to `<run dir>/train.log` (flushed per line, so a tail sees them)."""

    def __init__(self, path: str | os.PathLike, echo: Callable[[str], None] = print, log_interval: int = 10,
                 max_seconds: float | None = None):
        self.path = Path(path)
        self.echo = echo
        self.log_interval = log_interval
        self.max_seconds = max_seconds  # the run's time budget, if any, bounds the ETA

    def line(self, text: str) -> None:
        self.echo(text)
        sys.stdout.flush()  # whole lines, in order, also where stdout is a file shared with stderr (`> log 2>&1`)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(text + "\n")

    def record(self, record: dict, max_steps: int, elapsed: float, per_step: float) -> None:
        """Train records on the log interval (and every skipped one); all other kinds always."""
        if record.get("kind") == "train" and not record.get("nonfinite"):
            step = record["step"]
            if self.log_interval <= 0 or (step % self.log_interval and step + 1 < max_steps):
                return
        self.line(format_record(record, max_steps, elapsed, per_step, self.max_seconds))
