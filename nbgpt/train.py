"""The training loop: one code path for a laptop CPU, a 2×T4 Kaggle box and an 8×H100 node.

A step accumulates gradients over `grad_accum_steps` micro-batches of (micro_batch × seq_len) tokens on each of
`world_size` processes, so that every optimizer step sees `total_batch_tokens` tokens (0.5 M for GPT-2),
whatever the hardware. The learning rate warms up linearly, then follows a cosine down to `min_lr_ratio` of its
peak, or (schedule="trapezoid") stays at its peak until a linear cooldown. `recipe` names a bundle of these
settings and of the model's (nbgpt.recipes).
"""

from __future__ import annotations

import gc
import math
import time
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable

import torch

from . import train_state
from .checkpoint import save_checkpoint
from .config import (ConfigWarning, check_fields, check_known, config_warnings_to, field_types, knob,
                     typed_mapping)
from .device import autocast, peak_flops, resolve_device, synchronize
from .distributed import all_reduce_max, all_reduce_mean, shutdown
from .divergence import DivergenceGuard, TrainingDiverged
from .loader import DataLoader
from .memory import AUTO, resolve_micro_batch
from .metrics import MetricsLog
from .model import MODEL_PRESETS, ConfigError, GPTConfig, flops_per_token
from .optim import build_adamw
from .progress import ProgressLog, progress_bar
from .recipes import RECIPES, check_recipe, with_recipe
from .runlock import RunLock
from .schedule import Clock, Schedule, budget_shortfall, fitted_max_steps, lr_at
from .shards import DataError, TokenStore
from .stop import StopSignals, TrainingStopped, signal_name
from .trackers import TRACKERS, check_tracker, open_tracker
from .sharding import full_state, is_sharded
from .train_setup import (Runtime, build_loaders, build_model, build_optimizers, grad_scaler, gradient_sync,
                          open_store, start_runtime, wrap_model)


@dataclass
class TrainConfig:
    # where
    data_dir: str = knob("", "a prepared dataset (manifest.json + shards)")
    # not the notebooks' run directory (runs/default), so that `nbgpt train` and an interactive notebook run never
    # continue each other's checkpoints
    out_dir: str = knob("runs/train", "checkpoints/, metrics.jsonl and train.log go here")
    model: str = knob("tiny", "a model preset (tiny, mini, small, cpu-char, small-char, gpt2, gpt2-medium, ...); "
                      "GPTConfig fields reshape it, and the dataset's tokenizer sets vocab_size")
    model_overrides: dict = knob(help='GPTConfig fields that reshape the model preset, e.g. {"n_layer": 2}',
                                 default_factory=dict)
    init_from: str = knob("scratch", "scratch, or an HF GPT-2 directory / hub name to fine-tune from")
    # batch: the defaults suit the tiny model on a CPU; the gpt2-124m preset has GPT-2's 0.5M tokens per step
    total_batch_tokens: int = knob(8192, "tokens per optimizer step, all ranks and micro-steps together")
    micro_batch: int | str = knob(32, "sequences per forward pass per rank, or auto: the most that fit the GPU "
                                      "(nbgpt.memory)")
    seq_len: int | None = knob(None, "tokens per training window (none: the model's block_size)")
    recipe: str = knob("gpt2", "gpt2 or speedrun: a named bundle of optimizer, schedule and architecture settings "
                       "(nbgpt.recipes)")
    # schedule
    max_steps: int = knob(200, "optimizer steps to train: the schedule's horizon")
    max_seconds: float | None = knob(None, "wall-clock budget in seconds (none: no budget); the schedule's horizon "
                                           "is fitted to it")
    max_lr: float = knob(1e-3, "peak learning rate, reached after warmup_steps")
    min_lr_ratio: float = knob(0.1, "the learning rate decays to min_lr_ratio * max_lr")
    warmup_steps: int = knob(20, "steps of linear learning-rate warmup up to max_lr")
    schedule: str = knob("cosine", "after warmup: cosine decay, or trapezoid (constant, then a linear cooldown)")
    cooldown_fraction: float = knob(0.4, "trapezoid: the share of the steps spent cooling down to min_lr_ratio * "
                                         "max_lr")
    weight_decay: float = knob(0.1, "decoupled weight decay of the weight matrices (biases and norms get none)")
    optimizer: str = knob("adamw", "adamw, or muon: Muon for the blocks' matrices, AdamW for the rest")
    embedding_lr_scale: float = knob(1.0, "the input embeddings' learning rate (wte, wpe; a tied head is wte), in "
                                          "multiples of max_lr")
    beta1: float = knob(0.9, "Adam's first-moment (momentum) decay")
    beta2: float = knob(0.95, "Adam's second-moment decay")
    grad_clip: float = knob(1.0, "clip the global gradient norm to this before each step")
    # evaluation, samples, checkpoints
    eval_interval: int = knob(50, "steps between validation-loss evaluations (0: only at the end); with max_seconds, "
                                  "an upper bound")
    eval_batches: int = knob(20, "batches averaged per validation-loss evaluation")
    final_eval_batches: int | None = knob(None, "batches of the final evaluation (none: eval_batches; 0: the whole "
                                                "split)")
    sample_interval: int = knob(0, "steps between text samples written to the log (0: none)")
    sample_prompt: str = knob("", "prompt of those samples ('': start from end-of-text)")
    sample_tokens: int = knob(64, "tokens per sample")
    hellaswag_interval: int = knob(0, "steps between HellaSwag evaluations while training (0: none)")
    hellaswag_path: str | None = knob(None, "hellaswag_val.jsonl (none: the cache, then a one-time download)")
    hellaswag_limit: int | None = knob(None, "score only the first N HellaSwag examples (none: all 10,042)")
    checkpoint_interval: int = knob(100, "steps between checkpoints (0: only at the end; a stop signal also writes "
                                         "one)")
    keep_checkpoints: int = knob(3, "how many of the newest checkpoints to keep; older ones are deleted")
    resume: bool = knob(True, "continue from the newest good checkpoint in out_dir if there is one")
    log_interval: int = knob(10, "steps between progress lines (train.log, the terminal, the notebook)")
    max_bad_steps: int = knob(3, "consecutive steps with a non-finite loss or gradient before training stops")
    # hardware
    seed: int = knob(1337, "random seed of the initialisation, the data order and samples")
    device: str = knob("auto", "auto, cpu, cuda, cuda:N or mps (auto: the best available)")
    precision: str = knob("auto", "auto, fp32, bf16 or fp16 (auto: bf16 where native and faster, else fp16 on "
                                  "GPUs, fp32 on CPUs)")
    compile: bool = knob(False, "torch.compile the model: faster steps after a one-time compile")
    parallel: str = knob("ddp", "how processes share the work: ddp (each holds the whole model, gradients are "
                                "all-reduced) or fsdp (each holds 1/N of the weights, gradients and optimizer "
                                "state: nbgpt.sharding); one process: neither")
    threads: int | None = knob(None, "CPU threads for torch (none: torch's default)")
    # data order
    shuffle: bool = knob(False, "visit the training windows in a fresh random order each epoch (else in order)")
    align_documents: bool = knob(False, "start training windows at document starts (else every seq_len tokens)")
    progress: bool = knob(True, "show progress bars")
    # watching from elsewhere
    tracker: str = knob("none", "none, wandb or tensorboard: every metrics.jsonl record mirrored there "
                                "(nbgpt.trackers)")
    tracker_project: str = knob("nbgpt", "the W&B project")
    tracker_run_name: str | None = knob(None, "the W&B run's name (none: the run directory's name)")

    def __post_init__(self) -> None:
        check_fields(self)
        self.model_overrides = typed_mapping(GPTConfig, self.model_overrides, exclude=("vocab_size",))
        check_recipe(self.recipe)
        if self.optimizer not in ("adamw", "muon"):
            raise ConfigError(f"TrainConfig.optimizer must be 'adamw' or 'muon', got {self.optimizer!r}")
        if self.schedule not in ("cosine", "trapezoid"):
            raise ConfigError(f"TrainConfig.schedule must be 'cosine' or 'trapezoid', got {self.schedule!r}")
        if not 0.0 < self.cooldown_fraction <= 1.0:
            raise ConfigError(f"cooldown_fraction must be in (0, 1], the share of the steps spent cooling down "
                              f"(e.g. 0.4), got {self.cooldown_fraction}")
        if not self.embedding_lr_scale > 0.0:
            raise ConfigError(f"embedding_lr_scale must be positive (1 = the same learning rate as the rest), "
                              f"got {self.embedding_lr_scale}")
        if self.tracker not in TRACKERS:
            raise ConfigError(f"tracker must be none, wandb or tensorboard, got {self.tracker!r}")
        if self.parallel not in ("ddp", "fsdp"):
            raise ConfigError(f"parallel must be 'ddp' (a whole model per process) or 'fsdp' (weights, gradients "
                              f"and optimizer state sharded over the processes), got {self.parallel!r}")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ConfigError(f"precision must be auto, fp32, bf16 or fp16, got {self.precision!r}")
        if self.micro_batch != AUTO and not (isinstance(self.micro_batch, int) and self.micro_batch >= 1):
            raise ConfigError(f"micro_batch must be a positive integer or {AUTO!r} (the most that fit the GPU), got "
                              f"{self.micro_batch!r}")
        for name in ("total_batch_tokens", "max_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads must be at least 1 (or none: torch's default), got {self.threads}")
        for message in contradictions(self):
            warnings.warn(message, ConfigWarning, stacklevel=3)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        """TrainConfig from flat names: GPTConfig fields (n_layer, bias, ...) go into model_overrides, and a
        named `recipe` fills in its bundle under the values given (nbgpt.recipes.with_recipe).

        Checkpoints written before model_overrides existed stored those fields flat, None meaning "the
        preset's": they load too.
        """
        model_fields = set(field_types(GPTConfig)) - {"vocab_size"}
        nested = dict(values.get("model_overrides") or {})
        check_known(nested, model_fields, "GPTConfig field")
        flat = {name: value for name, value in values.items()
                if name != "model_overrides" and not (name in model_fields and value is None)}
        check_known(flat, set(field_types(cls)) | model_fields, "TrainConfig field")
        flat = with_recipe({}, {**nested, **flat})
        overrides = {name: flat.pop(name) for name in model_fields & set(flat)}
        return cls(**flat, model_overrides=overrides)

    def model_config(self, vocab_size: int) -> GPTConfig:
        return GPTConfig.from_preset(self.model, **{**self.model_overrides, "vocab_size": vocab_size})

    def batch_layout(self, block_size: int, world_size: int, micro_batch: int | None = None) -> tuple[int, int]:
        """(seq_len, grad_accum_steps): how total_batch_tokens splits over ranks and micro-steps of
        `micro_batch` sequences (default: the configured one; "auto" is checked at 1, which it may become)."""
        micro_batch = micro_batch or (1 if self.micro_batch == AUTO else self.micro_batch)
        seq_len = self.seq_len or block_size
        if seq_len > block_size:
            raise ConfigError(f"seq_len={seq_len} exceeds the model's block_size={block_size}; lower seq_len or "
                              f"raise block_size")
        tokens_per_micro_step = micro_batch * seq_len * world_size
        if self.total_batch_tokens % tokens_per_micro_step:
            raise ConfigError(
                f"total_batch_tokens={self.total_batch_tokens} is not a multiple of micro_batch × seq_len × "
                f"world_size = {micro_batch} × {seq_len} × {world_size} = {tokens_per_micro_step}"
                f"{' (micro_batch=auto, at its smallest)' if self.micro_batch == AUTO else ''}; "
                f"change total_batch_tokens, micro_batch or the number of processes (nproc)")
        return seq_len, self.total_batch_tokens // tokens_per_micro_step


def contradictions(config: TrainConfig) -> list[str]:
    """Settings that run but do not do what they seem to ask for."""
    found = []
    if config.warmup_steps >= config.max_steps:
        found.append(f"warmup_steps={config.warmup_steps} >= max_steps={config.max_steps}: the learning rate "
                     f"never reaches max_lr; lower warmup_steps (e.g. to {max(1, config.max_steps // 20)})")
    if config.schedule == "cosine" and config.cooldown_fraction != TrainConfig.cooldown_fraction:
        found.append(f"cooldown_fraction={config.cooldown_fraction} has no effect with schedule='cosine'; "
                     f"set schedule='trapezoid' to use it")
    elif config.schedule == "trapezoid" and config.warmup_steps > config.max_steps * (1 - config.cooldown_fraction):
        found.append(f"warmup_steps={config.warmup_steps} runs into the cooldown, which starts at step "
                     f"{round(config.max_steps * (1 - config.cooldown_fraction))}: the rate never stays at max_lr; "
                     f"lower warmup_steps or cooldown_fraction")
    for name in ("eval_interval", "sample_interval", "hellaswag_interval"):
        interval = getattr(config, name)
        if config.max_seconds is None and interval > config.max_steps:
            found.append(f"{name}={interval} > max_steps={config.max_steps}: it happens only at the end of "
                         f"the run; lower {name} to see it during training")
    model = {**MODEL_PRESETS.get(config.model, {}), **config.model_overrides}
    if "rope_base" in config.model_overrides and model.get("position", GPTConfig.position) != "rope":
        found.append(f"rope_base={config.model_overrides['rope_base']} has no effect with learned absolute "
                     f"positions; set position='rope' to use rotary positions")
    if config.recipe != TrainConfig.recipe and not recipe_in_effect(config):
        found.append(f"recipe={config.recipe!r} but none of its settings is in effect (TrainConfig(...) does not "
                     f"apply a recipe): build the config with TrainConfig.from_dict, the CLI or a preset")
    return found


def recipe_in_effect(config: TrainConfig) -> bool:
    """Whether any setting by which config.recipe's bundle differs from the defaults (which are the gpt2
    recipe's architecture and optimizer) holds: a recipe applied and then ablated does, a bare name does not."""
    defaults = {**asdict(GPTConfig()), **{f.name: f.default for f in fields(TrainConfig)}}
    values = {**defaults, **asdict(config), **MODEL_PRESETS.get(config.model, {}), **config.model_overrides}
    distinctive = {name: value for name, value in RECIPES[config.recipe].items() if defaults[name] != value}
    return any(values[name] == value for name, value in distinctive.items())


class Trainer:
    """Trains a GPT as a TrainConfig describes: built by train_setup, resumed and checkpointed by train_state,
    its extras timed by schedule. What stays here is the loop itself: train_step, evaluate and fit."""

    def __init__(self, config: TrainConfig, echo: Callable[[str], None] = print):
        check_tracker(config.tracker)  # a tracker that cannot work is refused now, on every rank alike
        self.config = config
        self.echo = echo
        setup_warnings: list[str] = []  # e.g. a forced precision this CPU only emulates; train.log gets them
        with config_warnings_to(setup_warnings.append):
            runtime = start_runtime(config)
        self.device, self.dist, self.precision = runtime.device, runtime.dist, runtime.precision
        self.out_dir = Path(config.out_dir)
        self.checkpoint_dir = self.out_dir / "checkpoints"
        self.progress = ProgressLog(self.out_dir / "train.log", echo, config.log_interval, config.max_seconds)
        self.metrics = MetricsLog(self.out_dir / "metrics.jsonl")
        self.lock = None
        try:
            # Two trainers writing one run directory would interleave checkpoints and logs: refuse the second.
            self.lock = RunLock(self.out_dir).acquire() if self.dist.is_main else None
            self._build(runtime)
            self._resume()
            self._start_records()
            layout = f"{config.parallel} over {self.dist.world_size} processes · " if self.dist.enabled else ""
            self.log_event(f"device {self.device} · precision {self.precision} (asked: {config.precision}) · "
                           f"{self.model.num_params():,} parameters · {layout}{self.grad_accum_steps} micro-step(s) "
                           f"per step · {'resuming at' if self.step else 'starting at'} step {self.step}")
            if self.peak is None:
                self.log_event(f"MFU not reported: peak unknown for {torch.cuda.get_device_name(self.device)} in "
                               f"{self.precision} (nbgpt.device.GPU_PEAK_FLOPS has no datasheet figure for it)")
            if config.micro_batch == AUTO:
                self.log_event(self.micro_batch_why)
            for line in setup_warnings:
                self.log_event(line)
        except BaseException:
            self.close()  # a trainer that never came to be holds nothing: the next attempt may start
            raise

    def _build(self, runtime: Runtime) -> None:
        """Data, model, batch layout, optimizers, loss scaling, compilation and DDP, and a fresh schedule."""
        config = self.config
        self.store = open_store(config)
        self.tokenizer = self.store.tokenizer()
        self.model, self.model_config = build_model(config, self.tokenizer.vocab_size, self.device)
        # "auto" becomes a number here, on the device this rank trains on; train.log says which and why. Every
        # rank takes the smallest any rank chose, so that GPUs of different sizes still step together.
        mine, self.micro_batch_why = resolve_micro_batch(config, self.model_config.vocab_size, self.dist.world_size,
                                                         self.device, self.precision)
        self.micro_batch = int(-all_reduce_max(-torch.tensor(mine, device=self.device), self.dist).item())
        if self.micro_batch != mine:
            self.micro_batch_why += f"; {self.micro_batch} on every rank, the smallest another rank's GPU allows"
        self.seq_len, self.grad_accum_steps = config.batch_layout(self.model_config.block_size, self.dist.world_size,
                                                                  self.micro_batch)
        self.train_loader, self.val_loader = build_loaders(config, self.micro_batch, self.store, self.seq_len,
                                                           self.dist, self.log_event)
        # before the optimizers: FSDP replaces the parameters by their shards, which the optimizers must own
        self.forward_model, self.train_model = wrap_model(self.model, config, runtime)
        self.optimizers = build_optimizers(self.model, config, self.device.type)
        self.scaler = grad_scaler(self.device, self.precision)
        self.flops_per_token = flops_per_token(self.model_config, self.seq_len,
                                               non_embedding_params=self.model.num_params(non_embedding=True))
        peak = peak_flops(self.device, self.precision)  # None: a GPU with no datasheet figure (MFU unknown)
        self.peak = None if peak is None else peak * self.dist.world_size  # the run's peak FLOP/s, for MFU
        self.schedule = Schedule(config)
        self.step = 0
        self.max_steps = config.max_steps  # the LR schedule's horizon (fitted to max_seconds when it is set)
        self.elapsed = 0.0  # seconds this run has trained, over all its processes (a resume continues it)
        self.last_val_loss: float | None = None
        self.divergence = DivergenceGuard(config.max_bad_steps, self.checkpoint_dir)
        self._hellaswag_examples = None

    def _resume(self) -> None:
        """Continue from the newest good checkpoint, if any; the metrics log keeps only the steps it covers."""
        payload = train_state.load_resumable(self)
        if payload is None:
            if self.dist.is_main:
                self.metrics.truncate_from(0)  # records of an attempt that never checkpointed are void
            return
        train_state.check_compatible(self, payload)
        train_state.restore(self, payload)
        finished = train_state.nothing_to_train(self)
        if self.dist.is_main:  # the steps after the checkpoint are about to be redone; with none left, the
            # evaluations of the checkpoint's own step (the run's final ones) still describe it
            self.metrics.truncate_from(self.step + 1 if finished else self.step)
        self.log_event(f"resumed from step {self.step} ({self.checkpoint_dir})" + (f": {finished}" if finished else ""))
        saved = (payload["loader"]["world_size"], payload["loader"]["batch_size"])
        if saved != (self.dist.world_size, self.train_loader.B):
            self.log_event(f"trained so far on {saved[0]} process(es) x micro_batch {saved[1]}, now "
                           f"{self.dist.world_size} x {self.train_loader.B} in {self.grad_accum_steps} micro-step(s): "
                           f"each step reads the same sequences as before"
                           + self._validation_change(payload["train_config"].get("eval_batches"), *saved))

    def _validation_change(self, eval_batches: int | None, world_size: int, micro_batch: int) -> str:
        """What a move to another layout does to validation, which reads eval_batches batches of micro_batch on
        each process: '' when it averages as many sequences as before, else the count and the eval_batches
        that restores it, so a jump in the validation curve is never mistaken for a change in the model."""
        per_batch = self.train_loader.B * self.dist.world_size
        before, now = (eval_batches or 0) * micro_batch * world_size, self.config.eval_batches * per_batch
        if not before or before == now:
            return ""
        fix = f"; -p eval_batches {before // per_batch} keeps it comparable" if before % per_batch == 0 else ""
        return (f"; validation now averages {now} sequences ({self.config.eval_batches} batches of "
                f"{self.train_loader.B} on {self.dist.world_size} process(es)), it averaged {before}{fix}")

    def _start_records(self) -> None:
        """From the step training starts at, the tracker (if any) follows metrics.jsonl, whose first record
        there says what is trained where: the configuration, device and precision."""
        if self.dist.is_main:  # rank 0 alone writes records
            self.metrics.mirror_to(open_tracker(self.config, self.step, self.log_event))
        self.log({"kind": "config", "step": self.step, "device": str(self.device), "precision": self.precision,
                  "world_size": self.dist.world_size, "micro_batch": self.train_loader.B,
                  "parameters": self.model.num_params(),
                  "config": asdict(self.config)})

    def log(self, record: dict) -> None:
        if self.dist.is_main:
            self.metrics.write(record)

    def log_event(self, message: str) -> None:
        if self.dist.is_main:
            self.progress.line(message)

    def save(self) -> Path | None:
        """Checkpoint the current state (rank 0 writes; other ranks wait so nobody runs ahead).

        Weights that are not finite are never written: they would become the run's "latest"."""
        path = None
        model_state, optimizer_states = full_state(self.model, self.optimizers)  # under FSDP: rank 0's alone
        rng = train_state.rng_state(self.device, self.dist)  # gathered from every rank
        if self.dist.is_main:
            if all(bool(torch.isfinite(t).all()) for t in model_state.values()):
                path = save_checkpoint(self.checkpoint_dir, self.step,
                                       train_state.capture(self, rng, model_state, optimizer_states),
                                       keep=self.config.keep_checkpoints)
            else:
                self.log_event(f"step {self.step}: the weights are not finite; no checkpoint written")
        if self.dist.enabled:
            torch.distributed.barrier()
        return path

    def close(self) -> None:
        """Release the run directory and leave the process group, then close the tracker (it may wait on its
        uploads, and no other rank waits on it); the trainer cannot train afterwards."""
        if self.lock is not None:
            self.lock.release()
        # DDP's wrapper holds the process group in its reducer: freed while the group lives (collected after the
        # group was destroyed, it hung rank 0 of gloo runs at exit)
        self.train_model = getattr(self, "forward_model", None)
        gc.collect()
        shutdown(self.dist)
        self.metrics.close()

    # --------------------------------------------------------------------------------------------- steps

    def train_step(self) -> dict:
        """One optimizer step over total_batch_tokens tokens; returns its metrics record."""
        config, model = self.config, self.train_model
        model.train()
        start = time.perf_counter()
        lr = lr_at(self.step, config, self.max_steps)
        for optimizer in self.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)  # groups with a rate of their own (embeddings)
            optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=self.device)
        for micro_step in range(self.grad_accum_steps):
            x, y = self.train_loader.next_batch()
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            last = micro_step == self.grad_accum_steps - 1
            with gradient_sync(self.model, model, last):
                with autocast(self.device, self.precision):
                    _, loss = model(x, y)
                loss = loss / self.grad_accum_steps  # the mean over the whole batch, not a sum of means
                loss_sum += loss.detach()
                self.scaler.scale(loss).backward()
        all_reduce_mean(loss_sum, self.dist)
        loss_value = loss_sum.item()
        for optimizer in self.optimizers:
            self.scaler.unscale_(optimizer)  # fp16: the true gradients again, each optimizer's overflow noted
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), config.grad_clip).item()
        outcome = self._step_all_or_none(loss_value, grad_norm)
        synchronize(self.device)
        dt = time.perf_counter() - start
        tokens_per_s = config.total_batch_tokens / dt
        record = {"kind": "train", "step": self.step, "loss": loss_value, "lr": lr, "grad_norm": grad_norm,
                  "dt": dt, "tokens_per_s": tokens_per_s,
                  "mfu": None if self.peak is None else tokens_per_s * self.flops_per_token / self.peak, **outcome}
        self.step += 1
        return record

    def _step_all_or_none(self, loss: float, grad_norm: float) -> dict:
        """Step every optimizer or none, then let the loss scaler update; returns the record's fields for it.

        An inf or NaN in any gradient makes the total norm non-finite. GradScaler.step alone would skip only
        the optimizer owning that gradient, while clipping by an infinite norm has scaled every other gradient
        to zero, and Muon, or AdamW's momentum and weight decay, would still move their weights: half a step.
        So the whole step is skipped; the scaler's update still sees the overflow that unscale_ recorded and
        halves the scale. Every rank sees the same all-reduced loss and gradients, so all of them agree."""
        scale = self.scaler.get_scale() if self.scaler.is_enabled() else None
        skip = not (math.isfinite(loss) and math.isfinite(grad_norm))
        for optimizer in self.optimizers:
            if skip:
                optimizer.zero_grad(set_to_none=True)
            else:
                self.scaler.step(optimizer)
        self.scaler.update()
        if scale is None:  # no fp16 scaler: any non-finite step counts toward divergence (DivergenceGuard)
            return {"nonfinite": True, "skipped": True} if skip else {}
        # fp16: an overflowing gradient is the scaler's routine (a lower scale), only a non-finite loss is not
        return {"grad_scale": scale, "skipped": skip, **({"nonfinite": True} if not math.isfinite(loss) else {})}

    @torch.no_grad()
    def evaluate(self, batches: int | None = None) -> float | None:
        """Mean validation loss over the same first `batches` (default eval_batches; 0: all) val batches."""
        if self.val_loader is None:
            return None
        self.forward_model.eval()
        self.val_loader.reset()
        batches = self.val_batches(batches)
        total = torch.zeros((), device=self.device)
        for _ in range(batches):
            x, y = self.val_loader.next_batch()
            with autocast(self.device, self.precision):
                _, loss = self.forward_model(x.to(self.device), y.to(self.device))
            total += loss.float()
        self.forward_model.train()
        value = all_reduce_mean(total / batches, self.dist).item()
        self.last_val_loss = value
        return value

    def val_batches(self, batches: int | None = None) -> int:
        """The validation batches an evaluation of `batches` averages (None: eval_batches; 0: the whole split)."""
        whole = self.val_loader.steps_per_epoch
        batches = self.config.eval_batches if batches is None else batches
        return min(batches or whole, whole)

    def sample(self) -> str:
        from .generate import Generator, SamplingConfig

        generator = Generator(self.model, self.tokenizer, device=self.device, precision=self.precision)
        return generator.complete(self.config.sample_prompt,
                                  SamplingConfig(max_new_tokens=self.config.sample_tokens, top_k=50, seed=self.step))

    def hellaswag(self) -> dict | None:
        """HellaSwag accuracy now; None when it cannot be scored (said once: the run goes on without it)."""
        from .hellaswag import HellaSwagUnavailable, evaluate_hellaswag, load_examples

        if self._hellaswag_examples is None:  # read and validated once, scored every interval
            try:
                if self.tokenizer.name != "gpt2":
                    raise HellaSwagUnavailable(f"it is English text in GPT-2 BPE, and this run uses the "
                                               f"{self.tokenizer.name} tokenizer")
                self._hellaswag_examples = load_examples(self.config.hellaswag_path,
                                                         limit=self.config.hellaswag_limit)
            except HellaSwagUnavailable as reason:
                self._hellaswag_examples = []
                self.log_event(f"HellaSwag skipped for this run: {reason}")
        if not self._hellaswag_examples:
            return None
        return evaluate_hellaswag(self.model, self.tokenizer, self._hellaswag_examples, device=self.device,
                                  precision=self.precision, dist_info=self.dist)

    # ----------------------------------------------------------------------------------------------- fit

    def _periodic(self, emit: Callable[[dict], None], final: bool) -> None:
        """Evaluations and samples of the current step: on their intervals, and all of them at the end."""
        schedule, step = self.schedule, self.step
        batches = self.config.final_eval_batches if final else None
        if schedule.evaluation(step, self.max_steps, final) and (val := self.evaluate(batches)) is not None:
            used = self.val_batches(batches)  # labelled: the final evaluation may average more than the others
            emit({"kind": "eval", "step": step, "val_loss": val, "val_batches": used,
                  "whole_split": used == self.val_loader.steps_per_epoch})
        if schedule.hellaswag(step, final) and (scores := self.hellaswag()) is not None:
            emit({"kind": "hellaswag", "step": step, **scores})
        # Rank 0 samples alone, but a sharded model decodes on every rank (each forward gathers from all);
        # only rank 0 logs what it emits.
        if schedule.sample(step, final) and (self.dist.is_main or is_sharded(self.model)):
            emit({"kind": "sample", "step": step, "text": self.sample()})

    def fit(self, on_record: Callable[[dict], None] | None = None, until: int | None = None) -> dict:
        """Train from the current step to max_steps (or stop early at step `until`, with a checkpoint, as if
        interrupted there); returns the step, the last train record and the last val loss.

        SIGTERM/SIGINT stop it after the current step with a checkpoint (TrainingStopped), too many non-finite
        steps in a row stop it without one (TrainingDiverged); either way the trainer is closed."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        clock = Clock(self.elapsed)

        def emit(record: dict) -> None:
            self.log(record)
            if self.dist.is_main:
                per_step = clock.per_step() or (clock.step_seconds or [0.0])[-1]
                self.progress.record(record, self.max_steps, clock.elapsed(), per_step)
                if on_record is not None:
                    on_record(record)

        bar = progress_bar(total=self.max_steps, initial=self.step, desc="training", unit="step",
                           disable=not (self.config.progress and self.dist.is_main))
        last_train: dict = {}
        try:
            with StopSignals() as stop:
                while self.step < min(self.max_steps, until if until is not None else self.max_steps):
                    self._periodic(emit, final=False)
                    last_train = self.train_step()
                    clock.add_step(last_train["dt"])
                    self.elapsed = clock.elapsed()
                    if self.config.max_seconds is not None:
                        self._fit_budget(clock)
                        bar.total = self.max_steps
                    emit(last_train)
                    self.divergence.observe(last_train)
                    bar.update(1)
                    bar.set_postfix(loss=f"{last_train['loss']:.4f}", refresh=False)
                    self._end_of_step(emit, stop, until)
        except (TrainingStopped, TrainingDiverged):
            self.close()
            raise
        finally:
            bar.close()
        return {"step": self.step, "train": last_train, "val_loss": self.last_val_loss}

    def _fit_budget(self, clock: Clock) -> None:
        """Refit the schedule's horizon to the time left; every rank takes the shortest estimate, so that all
        of them stop at the same step."""
        per_step = clock.per_step()
        if per_step is not None:
            fitted = fitted_max_steps(self.config, self.step, self.elapsed, per_step)
        else:  # no rate yet: keep the horizon (a resumed run's saved one), unless no time is left at all
            fitted = self.max_steps if self.elapsed < self.config.max_seconds else self.step
        # every rank joins this all-reduce on every step, whatever its own clock says, so none waits alone
        self.max_steps = int(-all_reduce_max(-torch.tensor(fitted, device=self.device), self.dist).item())

    def _end_of_step(self, emit: Callable[[dict], None], stop: StopSignals, until: int | None) -> None:
        """The final evaluations, checkpoints on their interval, at `until` and on a stop signal."""
        final = self.step >= self.max_steps
        if final:
            if self.config.max_seconds is not None and self.max_steps <= self.config.warmup_steps:
                self.log_event(f"warning: the {self.config.max_seconds:g}-second budget allowed {self.max_steps} steps, "
                               f"no more than warmup_steps={self.config.warmup_steps}: the learning rate never "
                               f"peaked; raise max_seconds or lower warmup_steps")
            if shortfall := budget_shortfall(self.config, self.step):
                self.log_event(shortfall)
            self._periodic(emit, final=True)
        signum = stop.agreed(self.dist, self.device)
        if signum or self.schedule.checkpoint(self.step, final, until):
            self.save()
        if signum:
            message = f"stopped by {signal_name(signum)} after step {self.step} with a checkpoint in {self.checkpoint_dir}"
            self.log_event(message)  # train.log ends with why it ends
            raise TrainingStopped(f"{message}; run again with resume=True (the default) to continue", signum)


def train_bigram(data_dir: str, steps: int = 500, batch_size: int = 32, seq_len: int = 64, lr: float = 0.1,
                 eval_batches: int = 8, seed: int = 1337, device: str = "auto", progress: bool = True,
                 max_table_vocab: int = 4096, rank: int = 256) -> dict:
    """Train the bigram baseline briefly; returns the model and its final train and validation losses.

    Vocabularies above `max_table_vocab` (GPT-2's BPE) get a table factorised through `rank` dimensions."""
    from .model import BigramLM

    torch.manual_seed(seed)
    target = resolve_device(device)
    store = TokenStore(data_dir)
    vocab_size = store.tokenizer().vocab_size
    model = BigramLM(vocab_size, block_size=seq_len, rank=rank if vocab_size > max_table_vocab else None).to(target)
    optimizer = build_adamw(model, 0.0, lr if model.unembed is None else lr / 30, (0.9, 0.99), target.type)
    loader = DataLoader(store, "train", batch_size, seq_len, shuffle=True, seed=seed)
    losses = []
    for _ in progress_bar(iterable=range(steps), desc="bigram", disable=not progress):
        x, y = loader.next_batch()
        _, loss = model(x.to(target), y.to(target))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    val_loss = None
    try:
        val = DataLoader(store, "val", batch_size, seq_len)
        with torch.no_grad():
            batches = min(eval_batches, val.steps_per_epoch)
            val_loss = sum(model(*(t.to(target) for t in val.next_batch()))[1].item() for _ in range(batches)) / batches
    except DataError:
        pass
    return {"model": model.cpu(), "train_losses": losses, "val_loss": val_loss}
