"""Plots of a run, drawn from its metrics.jsonl (the same records the trainer wrote), saved as PNG."""

from __future__ import annotations

import os
import time
from pathlib import Path

import matplotlib

if not os.environ.get("MPLBACKEND") and "ipykernel" not in __import__("sys").modules:
    matplotlib.use("Agg")  # scripts and tests: no display needed
import matplotlib.pyplot as plt

from .files import atomic_write, read_json
from .hellaswag import GPT2_124M_ACC_NORM, GPT3_124M_ACC_NORM
from .metrics import read_metrics


def _smooth(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _save(fig, path: str | os.PathLike | None) -> Path | None:
    if path is None:
        return None
    path = Path(path)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110, bbox_inches="tight"))
    return path


def loss_figure(run_dir: str | os.PathLike, title: str | None = None):
    """Train loss (raw and smoothed) and validation loss against step, with the bigram baseline if known."""
    run_dir = Path(run_dir)
    train = [r for r in read_metrics(run_dir, "train") if r["loss"] is not None]  # None: a skipped step
    evals = read_metrics(run_dir, "eval")
    fig, ax = plt.subplots(figsize=(8, 4.5))
    if train:
        steps = [r["step"] for r in train]
        losses = [r["loss"] for r in train]
        ax.plot(steps, losses, color="tab:blue", alpha=0.25, linewidth=1, label="train loss (per step)")
        ax.plot(steps, _smooth(losses, max(1, len(losses) // 50)), color="tab:blue", linewidth=2,
                label="train loss (smoothed)")
    if evals:
        ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", color="tab:orange",
                linewidth=2, markersize=4, label="validation loss")
    bigram = run_dir / "bigram.json"
    if bigram.is_file():
        ax.axhline(read_json(bigram)["val_loss"], color="gray", linestyle="--", label="bigram baseline (val)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy loss (nats/token)")
    ax.set_title(title or f"{run_dir.name}: loss")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def plot_losses(run_dir: str | os.PathLike, path: str | os.PathLike | None = None) -> Path | None:
    fig = loss_figure(run_dir)
    saved = _save(fig, path if path is not None else Path(run_dir) / "loss.png")
    plt.close(fig)
    return saved


def evaluation_figure(run_dir: str | os.PathLike, hellaswag: dict | None = None):
    """Validation loss and HellaSwag acc_norm side by side, with GPT-2 and GPT-3 124M reference lines.

    `hellaswag` is the final result ({"acc_norm": ...}) or {"skipped": reason}; periodic results from the
    training log are drawn as a curve.
    """
    run_dir = Path(run_dir)
    evals = read_metrics(run_dir, "eval")
    periodic = read_metrics(run_dir, "hellaswag")
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    if evals:
        left.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", color="tab:orange")
    left.set_title("validation loss")
    left.set_xlabel("optimizer step")
    left.set_ylabel("cross-entropy (nats/token)")
    left.grid(alpha=0.3)
    right.axhline(GPT2_124M_ACC_NORM, color="tab:red", linestyle="--", label=f"GPT-2 124M ({GPT2_124M_ACC_NORM})")
    right.axhline(GPT3_124M_ACC_NORM, color="tab:green", linestyle="--", label=f"GPT-3 124M ({GPT3_124M_ACC_NORM})")
    right.axhline(0.25, color="gray", linestyle=":", label="random guess (0.25)")
    if periodic:
        right.plot([r["step"] for r in periodic], [r["acc_norm"] for r in periodic], "o-", color="tab:blue",
                   label="this run (during training)")
    final_step = evals[-1]["step"] if evals else 0
    if hellaswag and "acc_norm" in hellaswag:
        right.plot([final_step], [hellaswag["acc_norm"]], "*", color="tab:blue", markersize=14,
                   label=f"this run, final ({hellaswag['acc_norm']:.4f} on {hellaswag['count']})")
    elif hellaswag and "skipped" in hellaswag:
        right.text(0.5, 0.5, "HellaSwag skipped:\n" + _wrap(hellaswag["skipped"]), ha="center", va="center",
                   transform=right.transAxes, fontsize=9, color="dimgray")
    right.set_ylim(0.2, 0.4)
    right.set_title("HellaSwag acc_norm")
    right.set_xlabel("optimizer step")
    right.grid(alpha=0.3)
    right.legend(loc="upper left", fontsize=8)
    fig.suptitle(f"{run_dir.name}: evaluation")
    return fig


def plot_evaluation(run_dir: str | os.PathLike, hellaswag: dict | None = None,
                    path: str | os.PathLike | None = None) -> Path | None:
    fig = evaluation_figure(run_dir, hellaswag)
    saved = _save(fig, path if path is not None else Path(run_dir) / "evaluation.png")
    plt.close(fig)
    return saved


def lr_figure(config, max_steps: int | None = None):
    from .train import lr_at

    steps = range(max_steps or config.max_steps)
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.plot(list(steps), [lr_at(s, config, max_steps) for s in steps])
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("learning rate")
    ax.set_title(f"warmup, then cosine decay to {config.min_lr_ratio:.0%} of the peak")
    ax.grid(alpha=0.3)
    return fig


def _wrap(text: str, width: int = 48) -> str:
    words, lines, line = text.split(), [], ""
    for word in words:
        if len(line) + len(word) + 1 > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return "\n".join(lines + [line])


class LiveLossPlot:
    """Redraws the loss plot in the notebook output at most every `every_seconds` while training runs."""

    def __init__(self, run_dir: str | os.PathLike, every_seconds: float = 3.0):
        from IPython.display import display

        self.run_dir = Path(run_dir)
        self.every_seconds = every_seconds
        self.last = 0.0
        self.handle = display(None, display_id=True)

    def __call__(self, record: dict) -> None:
        now = time.monotonic()
        if record.get("kind") == "eval" or now - self.last >= self.every_seconds:
            self.last = now
            fig = loss_figure(self.run_dir, title="training (live)")
            if self.handle is not None:
                self.handle.update(fig)
            plt.close(fig)
