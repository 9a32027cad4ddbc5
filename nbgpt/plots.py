"""Plots of a run, drawn from its metrics.jsonl (the same records the trainer wrote), saved as PNG."""

from __future__ import annotations

import os
import textwrap
import time
from pathlib import Path

import matplotlib

if not os.environ.get("MPLBACKEND") and "ipykernel" not in __import__("sys").modules:
    matplotlib.use("Agg")  # scripts and tests: no display needed
import matplotlib.pyplot as plt

from .files import atomic_write, read_json
from .hellaswag import GPT2_124M_ACC_NORM, GPT3_124M_ACC_NORM
from .metrics import eval_scope, read_metrics


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


def _plot_evals(ax, evals: list[dict], markersize: int) -> None:
    """Validation losses as a curve of the points that averaged the usual number of batches, and a marker of
    its own for any that averaged another (the final evaluation over the whole split): joined by one line,
    the curve would jump where only the measurement changed."""
    if not evals:
        return
    usual = max({r.get("val_batches") for r in evals}, key=[r.get("val_batches") for r in evals].count)
    curve = [r for r in evals if r.get("val_batches") == usual]
    ax.plot([r["step"] for r in curve], [r["val_loss"] for r in curve], "o-", color="tab:orange", linewidth=2,
            markersize=markersize, label="validation loss" + eval_scope(curve[0]))
    for record in (r for r in evals if r.get("val_batches") != usual):
        ax.plot([record["step"]], [record["val_loss"]], "D", color="tab:red", markersize=markersize + 3,
                label="validation loss" + eval_scope(record))


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
    _plot_evals(ax, evals, markersize=4)
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
    training log are drawn as a curve. With no HellaSwag score at all there is no second chart: reference
    lines over an empty plot would read as a result, so the reason is written under the loss curve instead.
    """
    run_dir = Path(run_dir)
    evals = read_metrics(run_dir, "eval")
    periodic = read_metrics(run_dir, "hellaswag")
    scored = bool(periodic) or bool(hellaswag and "acc_norm" in hellaswag)
    fig, axes = plt.subplots(1, 2 if scored else 1, figsize=(12 if scored else 7, 4.5), squeeze=False)
    left = axes[0][0]
    _plot_evals(left, evals, markersize=3)
    if evals:
        left.legend(fontsize=8)
    left.set_title("validation loss")
    left.set_xlabel("optimizer step")
    left.set_ylabel("cross-entropy (nats/token)")
    left.grid(alpha=0.3)
    if scored:
        _hellaswag_axes(axes[0][1], periodic, hellaswag, evals[-1]["step"] if evals else 0)
    else:
        reason = (hellaswag or {}).get("skipped", "HellaSwag was not evaluated")
        fig.text(0.5, -0.02, textwrap.fill(f"No HellaSwag score: {reason}", 90), ha="center", va="top", fontsize=9,
                 color="dimgray")
    fig.suptitle(f"{run_dir.name}: evaluation")
    return fig


def _hellaswag_axes(ax, periodic: list[dict], final: dict | None, final_step: int) -> None:
    ax.axhline(GPT2_124M_ACC_NORM, color="tab:red", linestyle="--", label=f"GPT-2 124M ({GPT2_124M_ACC_NORM})")
    ax.axhline(GPT3_124M_ACC_NORM, color="tab:green", linestyle="--", label=f"GPT-3 124M ({GPT3_124M_ACC_NORM})")
    ax.axhline(0.25, color="gray", linestyle=":", label="random guess (0.25)")
    if periodic:
        ax.plot([r["step"] for r in periodic], [r["acc_norm"] for r in periodic], "o-", color="tab:blue",
                label="this run (during training)")
    if final and "acc_norm" in final:
        ax.plot([final_step], [final["acc_norm"]], "*", color="tab:blue", markersize=14,
                label=f"this run, final ({final['acc_norm']:.4f} on {final['count']})")
    ax.set_ylim(0.2, 0.4)
    ax.set_title("HellaSwag acc_norm")
    ax.set_xlabel("optimizer step")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)


def plot_evaluation(run_dir: str | os.PathLike, hellaswag: dict | None = None,
                    path: str | os.PathLike | None = None) -> Path | None:
    fig = evaluation_figure(run_dir, hellaswag)
    saved = _save(fig, path if path is not None else Path(run_dir) / "evaluation.png")
    plt.close(fig)
    return saved


def schedule_figure(run_dir: str | os.PathLike, grad_clip: float | None = None):
    """The learning rate each step actually used and the gradient norm before clipping (at `grad_clip`).

    Drawn from what the trainer recorded, not recomputed from the config: with a time budget the cosine's
    horizon is fitted while the run goes, and only the log knows the schedule that was followed.
    """
    train = read_metrics(run_dir, "train")
    steps = [r["step"] for r in train]
    fig, (lr, norm) = plt.subplots(1, 2, figsize=(12, 3.5))
    lr.plot(steps, [r["lr"] for r in train], color="tab:purple")
    lr.set_title("learning rate (as used)")
    norm.plot(steps, [r["grad_norm"] for r in train], color="tab:gray", linewidth=1, label="gradient norm")
    if grad_clip:
        norm.axhline(grad_clip, color="tab:red", linestyle="--", label=f"clipped to {grad_clip}")
    norm.set_title("gradient norm (before clipping)")
    norm.set_yscale("log")
    norm.legend(fontsize=8)
    for ax in (lr, norm):
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    return fig


def attention_figure(weights, tokens: list[str], title: str = "attention", max_heads: int = 4):
    """Heatmaps of attention weights (H, T, T), one per head (the first `max_heads`): row t shows how query
    token t spreads its attention over the keys; the dark upper triangle is the causal mask (weight 0: no
    token sees its future)."""
    weights = weights[:max_heads]
    heads, T = weights.shape[0], weights.shape[-1]
    side = max(3.2, 0.13 * T)  # room for one readable label per token
    fig, axes = plt.subplots(1, heads, figsize=(side * heads + 0.8, side + 0.6), squeeze=False)
    labels = [repr(t)[1:-1] for t in tokens]  # newlines and spaces made visible
    upright = all(len(label) <= 2 for label in labels)  # single characters read best unrotated
    for h, ax in enumerate(axes[0]):
        image = ax.imshow(weights[h], cmap="viridis", vmin=0.0, vmax=1.0)
        ax.set_title(f"head {h}", fontsize=9)
        ax.set_xticks(range(T), labels, rotation=0 if upright else 90, fontsize=7, family="monospace")
        ax.set_yticks(range(T), labels if h == 0 else [], fontsize=7, family="monospace")
        ax.set_xlabel("key (attended to)", fontsize=8)
    axes[0][0].set_ylabel("query (attending)", fontsize=8)
    fig.colorbar(image, ax=list(axes[0]), fraction=0.02, pad=0.02)
    fig.suptitle(title)
    return fig


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
