"""When things happen in a run: the learning rate at a step, which evaluations, samples and checkpoints a step
owes, how a wall-clock budget becomes a number of steps (timed by the run's Clock), and when a schedule has no
step left.

Everything here but the Clock is a pure function of the configuration, the step and measured time, so the loop
only asks "is it due?" and never does interval arithmetic itself.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

import torch

from .device import synchronize

if TYPE_CHECKING:
    from .run_config import TrainConfig


def lr_at(step: int, config: TrainConfig, max_steps: int | None = None) -> float:
    """Linear warmup to max_lr, then down to min_lr_ratio * max_lr at max_steps, by `config.schedule`:

    cosine     the decay starts at once and follows half a cosine (GPT-2, build-nanogpt).
    trapezoid  max_lr until the last `cooldown_fraction` of the steps, then a straight line down.

    Warmup keeps the first updates small while Adam's second-moment estimates are still noise. The cosine
    anneals at the end, where loss drops fastest, but it starts lowering the rate from the first step. The
    trapezoid trains longer at the peak and gets the annealing's drop from its cooldown (the speedrun records
    and Hägele et al., 2024, find it as good or better); and as nothing before the cooldown depends on the
    horizon, a horizon fitted to a time budget (`max_steps` here) can move without changing the past.
    """
    max_steps = max_steps or config.max_steps
    min_lr = config.max_lr * config.min_lr_ratio
    if step < config.warmup_steps:
        return config.max_lr * (step + 1) / config.warmup_steps
    if step >= max_steps:
        return min_lr
    if config.schedule == "trapezoid":
        cooldown_start = round(max_steps * (1 - config.cooldown_fraction))
        if step < cooldown_start:
            return config.max_lr
        progress = (step - cooldown_start) / max(1, max_steps - cooldown_start)
        return config.max_lr + progress * (min_lr - config.max_lr)
    progress = (step - config.warmup_steps) / max(1, max_steps - config.warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (config.max_lr - min_lr)


# Validation points over a time-budgeted run (see evaluation_interval).
BUDGET_EVALS = 20


def evaluation_interval(config: TrainConfig, max_steps: int) -> int:
    """Steps between validation evaluations: eval_interval, or fewer under a time budget.

    With max_seconds the run's length is only known as it goes (max_steps is re-fitted every step), so a fixed
    eval_interval may leave two points, start and end. There it becomes an upper bound: the interval is the
    round number (1, 2, 5, 10, 20, 50, ...) giving about BUDGET_EVALS points over the fitted run. Round numbers
    keep it steady while the estimate drifts, so evaluations neither skip nor bunch up.
    """
    if config.max_seconds is None or config.eval_interval <= 0:
        return config.eval_interval
    target = max(1, max_steps // BUDGET_EVALS)
    decade = 10 ** int(math.log10(target))
    return min(config.eval_interval, max(m * decade for m in (1, 2, 5) if m * decade <= target))


def _on_interval(interval: int, step: int) -> bool:
    return interval > 0 and step % interval == 0  # an interval of 0 switches the thing off


class Schedule:
    """Which extras a step owes. Evaluations look at the model *before* step `step` trains, so step 0 gives the
    untrained baseline; `final` is the end of the run, where every enabled extra happens once more."""

    def __init__(self, config: TrainConfig):
        self.config = config

    def evaluation(self, step: int, max_steps: int, final: bool) -> bool:
        return final or _on_interval(evaluation_interval(self.config, max_steps), step)

    def hellaswag(self, step: int, final: bool) -> bool:
        # Not at step 0: an untrained model scores chance, which costs a full pass to learn nothing.
        interval = self.config.hellaswag_interval
        return interval > 0 and step > 0 and (final or _on_interval(interval, step))

    def sample(self, step: int, final: bool) -> bool:
        interval = self.config.sample_interval
        return interval > 0 and (final or _on_interval(interval, step))

    def checkpoint(self, step: int, final: bool, until: int | None) -> bool:
        # `until` is a planned stop (a notebook training in slices): it leaves a checkpoint as a signal would.
        return final or _on_interval(self.config.checkpoint_interval, step) or step == until


def fitted_max_steps(config: TrainConfig, step: int, elapsed: float, per_step: float) -> int:
    """max_steps fitted to the wall-clock budget from the measured time per training step, so the schedule
    (the cosine, or the trapezoid's cooldown) ends just as the budget runs out. The budget is the run's:
    `elapsed` counts time spent before a resume, and the evaluations so far; those still to come (about
    BUDGET_EVALS of them) come on top."""
    remaining = max(0.0, config.max_seconds - elapsed)
    return min(config.max_steps, step + int(remaining / per_step))


def budget_shortfall(config: TrainConfig, step: int) -> str | None:
    """One line for a run whose time budget ended it before config.max_steps, else None.

    A horizon fitted to max_seconds still anneals, so such a run ends cleanly, but earlier and at a higher
    loss: on a busy or slow machine that must be said, with the budget that would give the full run."""
    if config.max_seconds is None or step >= config.max_steps or step == 0:
        return None
    share = step / config.max_steps  # the budget's share of the steps = this machine's share of the speed needed
    needed = math.ceil(config.max_seconds / share / 60) * 60  # the same rate over all the steps, whole minutes
    return (f"warning: the {config.max_seconds:g}-second budget (max_seconds) ended training after {step:,} of "
            f"max_steps={config.max_steps:,} steps: this machine trained at {share:.0%} of the speed a full run "
            f"needs (a busy or slow CPU), so the loss is higher than a full run's; for the full result run again "
            f"on a quieter machine or with max_seconds={needed} (e.g. make demo ARGS=\"-p max_seconds {needed}\")")


class Clock:
    """The one timer of training: the run's training time (what earlier processes spent plus this one's) and
    the seconds of each training step, which the trainer's records, ETA and time budget all read.

    The step rate counts training steps only: were evaluations in it, an estimate that shrinks the run would
    make evaluations more frequent, which would shrink it further. A process's first step is left out too
    (lazy initialisation, compilation): until a second one is measured the rate is unknown, and a resumed run
    keeps the horizon it saved."""

    def __init__(self, elapsed_before: float = 0.0):
        self.before, self.started = elapsed_before, time.perf_counter()
        self.step_started = self.started
        self.step_seconds: list[float] = []

    def elapsed(self) -> float:
        return self.before + time.perf_counter() - self.started

    def start_step(self) -> None:
        self.step_started = time.perf_counter()

    def end_step(self, device: torch.device) -> float:
        """Seconds since start_step, once the device has done the work queued (a GPU runs behind the host)."""
        synchronize(device)
        self.step_seconds.append(time.perf_counter() - self.step_started)
        return self.step_seconds[-1]

    def per_step(self) -> float | None:
        """Mean seconds per training step after this process's first; None until there is one."""
        settled = self.step_seconds[1:]
        return sum(settled) / len(settled) if settled else None

    def eta_per_step(self) -> float:
        """The rate an ETA uses: per_step, or the one step measured so far (0 before any)."""
        return self.per_step() or (self.step_seconds or [0.0])[-1]


def nothing_to_train(step: int, max_steps: int, config: TrainConfig) -> str | None:
    """Why a resumed run has no step left to train, as the line that says what to do, else None."""
    if step < max_steps:
        return None
    if config.max_seconds is not None and step < config.max_steps:  # the horizon was fitted to the time budget
        return (f"nothing was trained: the checkpoint at step {step} ends the schedule that its max_seconds="
                f"{config.max_seconds:g} budget fitted, and a resumed run keeps that schedule; to train longer, start "
                f"a new run (another out_dir or --name) with a larger max_seconds")
    return (f"nothing was trained: the checkpoint is at step {step}, already at or past max_steps="
            f"{config.max_steps}; to train further, raise max_steps above {step} (e.g. -p max_steps {2 * step})")
