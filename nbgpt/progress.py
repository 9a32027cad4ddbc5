"""What a run shows while it trains: tqdm bars, and one readable line per log interval in `train.log`.

The lines are for people (the terminal of `nbgpt train`, the notebook's output, `tail -f train.log`, and
`nbgpt run`, which streams the file); metrics.jsonl stays the record that plots and code read.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable


def unattended_kernel() -> bool:
    """True inside a notebook kernel that nobody watches: papermill (nbclient) executes with stdin off.

    A widget bar is saved into the executed notebook as its first frame ("0%"), so there a text bar is
    used, whose last frame is what the saved output shows.
    """
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    kernel = getattr(get_ipython(), "kernel", None)
    return kernel is not None and not getattr(kernel, "_allow_stdin", True)


def progress_bar(**kwargs):
    """A tqdm bar: the widget in JupyterLab, text in a terminal and in notebooks executed unattended."""
    if unattended_kernel():
        from tqdm.std import tqdm

        kwargs.setdefault("mininterval", 5.0)  # each redraw is kept in the saved notebook's output
    else:
        from tqdm.auto import tqdm
    return tqdm(**kwargs)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _number(value, spec: str) -> str:
    return "n/a" if value is None or not math.isfinite(value) else format(value, spec)


def _percent(fraction: float | None) -> str:
    return "n/a" if fraction is None else f"{100 * fraction:.1f}%"  # None: MFU of a GPU whose peak is unknown


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
        return f"step {step:6d} | val loss {record['val_loss']:.4f}"
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
