"""The training loop: one code path for a laptop CPU, a 2×T4 Kaggle box and an 8×H100 node.

A step accumulates gradients over `grad_accum_steps` micro-batches of (micro_batch × seq_len) tokens on each of
`world_size` processes, so that every optimizer step sees `total_batch_tokens` tokens (0.5 M for GPT-2),
whatever the hardware. The learning rate warms up linearly, then follows a cosine down to `min_lr_ratio` of its
peak, or (schedule="trapezoid") stays at its peak until a linear cooldown. `recipe` names a bundle of these
settings and of the model's (nbgpt.run_config).

`Trainer.fit` reads top to bottom, one step at a time: evaluate, score HellaSwag and sample when due, take the
optimizer step (`train_step`: accumulate, clip, step), log it, checkpoint when due, stop when asked to.
"""

from __future__ import annotations

import gc
import math
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch

from .checkpoint import (check_compatible, latest_checkpoint, load_resumable, rng_state, save_checkpoint,
                         set_rng_state)
from .knobs import config_warnings_to
from .device import autocast, peak_flops, resolve_device
from .distributed import agreed_max, all_reduce_mean, full_state, is_sharded, load_full_state, shutdown
from .loader import DataLoader
from .memory import resolve_micro_batch
from .metrics import MetricsLog, ProgressLog, progress_bar
from .model import BigramLM, flops_per_token
from .optim import build_adamw
from .run_config import AUTO, TrainConfig
from .files import RunLock
from .schedule import Clock, Schedule, budget_shortfall, fitted_max_steps, lr_at, nothing_to_train
from .shards import DataError, TokenStore
from .stop import DivergenceGuard, StopSignals, TrainingStopped
from .tokenizer import tokenizer_spec
from .trackers import check_tracker, open_tracker
from .train_setup import (Runtime, build_loaders, build_model, build_optimizers, grad_scaler, gradient_sync,
                          open_store, start_runtime, wrap_model)


class Trainer:
    """Trains a GPT as a TrainConfig describes. Two handles on the model: `train_model`, what the training step
    runs (compiled when asked; across ranks wrapped in DDP, or, under FSDP, the GPT sharded in place), and
    `model`, the GPT itself, which is evaluated (validation, HellaSwag, samples) and saved."""

    def __init__(self, config: TrainConfig, echo: Callable[[str], None] = print):
        check_tracker(config.tracker)  # a tracker that cannot work is refused now, on every rank alike
        self.config = config
        setup_warnings: list[str] = []  # e.g. a forced precision this CPU only emulates; train.log gets them
        with config_warnings_to(setup_warnings.append):
            runtime = start_runtime(config.device, config.precision, config.threads)
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
            self._start_records(setup_warnings)
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
        self.micro_batch = -agreed_max(-mine, self.device, self.dist)
        if self.micro_batch != mine:
            self.micro_batch_why += f"; {self.micro_batch} on every rank, the smallest another rank's GPU allows"
        self.seq_len, self.grad_accum_steps = config.batch_layout(self.model_config.block_size, self.dist.world_size,
                                                                  self.micro_batch)
        self.train_loader, self.val_loader = build_loaders(config, self.micro_batch, self.store, self.seq_len,
                                                           self.dist, self.log_event)
        # before the optimizers: FSDP replaces the parameters by their shards, which the optimizers must own
        self.train_model = wrap_model(self.model, config, runtime)
        self.optimizers = build_optimizers(self.model, config, self.device.type)
        self.scaler = grad_scaler(self.device, self.precision)
        self.flops_per_token = flops_per_token(self.model_config, self.seq_len,
                                               non_embedding_params=self.model.num_params(non_embedding=True))
        peak = peak_flops(self.device, self.precision)  # None: a GPU with no datasheet figure (MFU unknown)
        self.peak = None if peak is None else peak * self.dist.world_size  # the run's peak FLOP/s, for MFU
        self.schedule = Schedule(config)
        self.step, self.elapsed, self.last_val_loss = 0, 0.0, None  # elapsed: seconds trained, a resume continues it
        self.max_steps = config.max_steps  # the LR schedule's horizon (fitted to max_seconds when it is set)
        self.clock = Clock()  # fit starts one from the run's elapsed time; this one times a train_step called alone
        self.divergence = DivergenceGuard(config.max_bad_steps, self.checkpoint_dir, latest_checkpoint)
        self._hellaswag_examples = None

    def _resume(self) -> None:
        """Continue from the newest good checkpoint, if any; the metrics log keeps only the steps it covers."""
        payload = load_resumable(self.config.resume, self.checkpoint_dir, self.dist.is_main, self.log_event)
        if payload is None:
            if self.dist.is_main:
                self.metrics.truncate_from(0)  # records of an attempt that never checkpointed are void
            return
        then, now = TrainConfig.of_checkpoint(payload), self.bound_settings()
        # Checkpoints saved without their bound settings named every run that named no recipe 'gpt2': that name
        # says nothing of them, so it is not compared.
        saved = payload.get("bound") or {**then.bound_settings(payload["model_config"]), "recipe": now["recipe"]}
        check_compatible(payload, saved, now, self.tokenizer, self.config.data_dir, self.checkpoint_dir)
        self._restore(payload)
        finished = nothing_to_train(self.step, self.max_steps, self.config)
        if self.dist.is_main:  # the steps after the checkpoint are about to be redone; with none left, the
            # evaluations of the checkpoint's own step (the run's final ones) still describe it
            self.metrics.truncate_from(self.step + 1 if finished else self.step)
        self.log_event(f"resumed from step {self.step} ({self.checkpoint_dir})" + (f": {finished}" if finished else ""))
        saved = (payload["loader"]["world_size"], payload["loader"]["batch_size"])
        if saved != (self.dist.world_size, self.train_loader.B):
            self.log_event(f"trained so far on {saved[0]} process(es) x micro_batch {saved[1]}, now "
                           f"{self.dist.world_size} x {self.train_loader.B} in {self.grad_accum_steps} micro-step(s): "
                           f"each step reads the same sequences as before"
                           + self._validation_change(then.eval_batches, *saved))

    def bound_settings(self) -> dict:
        """What this run's checkpoints are bound to (TrainConfig.bound_settings, with the model as built)."""
        return self.config.bound_settings(self.model_config.to_dict())

    def _restore(self, payload: dict) -> None:
        """Put a compatible checkpoint's state back (the keys `save` writes; see nbgpt.checkpoint)."""
        load_full_state(self.model, self.optimizers, payload["model"], payload["optimizer"])
        self.scaler.load_state_dict(payload["scaler"])
        self.train_loader.load_state_dict(payload["loader"])
        set_rng_state(payload["rng"], self.device, self.dist.rank)
        self.step, self.last_val_loss = payload["step"], payload.get("val_loss")
        self.elapsed = payload.get("elapsed", 0.0)  # absent before time budgets existed
        if self.config.max_seconds is not None:  # a horizon fitted to the budget is the run's, not the process's
            self.max_steps = min(self.config.max_steps, payload["max_steps"])

    def _validation_change(self, eval_batches: int, world_size: int, micro_batch: int) -> str:
        """What a move to another layout does to validation, which reads eval_batches batches of micro_batch on
        each process: '' when it averages as many sequences as before, else the count and the eval_batches
        that restores it, so a jump in the validation curve is never mistaken for a change in the model."""
        per_batch, split = self.train_loader.B * self.dist.world_size, self.val_loader.epoch_sequences
        before, now = min(eval_batches * micro_batch * world_size, split), self.val_batches() * per_batch
        if not before or before == now:
            return ""
        fix = f"; -p eval_batches {before // per_batch} keeps it comparable" if before % per_batch == 0 else ""
        return (f"; validation now averages {now} sequences ({self.val_batches()} batches of "
                f"{self.train_loader.B} on {self.dist.world_size} process(es)), it averaged {before}{fix}")

    def _start_records(self, setup_warnings: list[str]) -> None:
        """From the step training starts at, the tracker (if any) follows metrics.jsonl, whose first record
        there says what is trained where: the configuration, device and precision; train.log says it in words."""
        config = self.config
        if self.dist.is_main:  # rank 0 alone writes records
            self.metrics.mirror_to(open_tracker(config, self.step, self.log_event))
        self.log({"kind": "config", "step": self.step, "device": str(self.device), "precision": self.precision,
                  "world_size": self.dist.world_size, "micro_batch": self.train_loader.B,
                  "parameters": self.model.num_params(), "config": asdict(config)})
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

    def log(self, record: dict) -> None:
        if self.dist.is_main:
            self.metrics.write(record)

    def log_event(self, message: str) -> None:
        if self.dist.is_main:
            self.progress.line(message)

    # ----------------------------------------------------------------------------------------------- fit

    def fit(self, on_record: Callable[[dict], None] | None = None, until: int | None = None) -> dict:
        """Train from the current step to max_steps (or stop early at step `until`, with a checkpoint, as if
        interrupted there); returns the step, the last train record and the last val loss.

        SIGTERM/SIGINT stop it after the current step with a checkpoint (TrainingStopped), too many non-finite
        steps in a row stop it without one (TrainingDiverged); either way the trainer is closed."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.clock = Clock(self.elapsed)
        bar = progress_bar(total=self.max_steps, initial=self.step, desc="training", unit="step",
                           disable=not (self.config.progress and self.dist.is_main))
        self.on_record, last_train = on_record, {}
        try:
            with StopSignals() as signals:
                while self.step < self.max_steps and (until is None or self.step < until):
                    self._evaluations(final=False)  # evaluate, HellaSwag and sample when due
                    last_train = self.train_step()  # the optimizer step
                    self.elapsed = self.clock.elapsed()
                    if self.config.max_seconds is not None:
                        bar.total = self.max_steps = self._fit_budget()
                    self._emit(last_train)  # log
                    bar.update(1)
                    bar.set_postfix(loss=f"{last_train['loss']:.4f}", refresh=False)
                    self.divergence.observe(last_train)  # stop: diverged
                    final = self.step >= self.max_steps
                    if final:
                        self._finish()
                    signum = agreed_max(signals.signum or 0, self.device, self.dist)  # any rank's, on every rank
                    if signum or self.schedule.checkpoint(self.step, final, until):
                        self.save()  # checkpoint
                    if signum:  # stop: asked to
                        stopped = TrainingStopped.by_signal(signum, self.checkpoint_dir, self.step)
                        self.log_event(stopped.what)  # train.log ends with why (how to go on: the caller's)
                        raise stopped
        except TrainingStopped:  # a signal, or divergence
            self.close()
            raise
        finally:
            bar.close()
        return {"step": self.step, "train": last_train, "val_loss": self.last_val_loss}

    def _emit(self, record: dict) -> None:
        """A record to metrics.jsonl (and the tracker), its line to train.log, and to fit's `on_record`."""
        self.log(record)
        if self.dist.is_main:
            self.progress.record(record, self.max_steps, self.clock.elapsed(), self.clock.eta_per_step())
            if self.on_record is not None:
                self.on_record(record)

    def _evaluations(self, final: bool) -> None:
        """Evaluations and samples of the current step: on their intervals, and all of them at the end."""
        schedule, step = self.schedule, self.step
        batches = self.config.final_eval_batches if final else None
        if schedule.evaluation(step, self.max_steps, final) and (val := self.evaluate(batches)) is not None:
            used = self.val_batches(batches)  # labelled: the final evaluation may average more than the others
            self._emit({"kind": "eval", "step": step, "val_loss": val, "val_batches": used,
                        "whole_split": used == self.val_loader.steps_per_epoch})
        if schedule.hellaswag(step, final) and (scores := self.hellaswag()) is not None:
            self._emit({"kind": "hellaswag", "step": step, **scores})
        # Rank 0 samples alone, but a sharded model decodes on every rank (each forward gathers from all);
        # only rank 0 logs what it emits.
        if schedule.sample(step, final) and (self.dist.is_main or is_sharded(self.model)):
            self._emit({"kind": "sample", "step": step, "text": self.sample()})

    def _fit_budget(self) -> int:
        """The schedule's horizon refitted to the time left; every rank takes the shortest estimate, so that all
        of them stop at the same step."""
        per_step = self.clock.per_step()
        if per_step is not None:
            fitted = fitted_max_steps(self.config, self.step, self.elapsed, per_step)
        else:  # no rate yet: keep the horizon (a resumed run's saved one), unless no time is left at all
            fitted = self.max_steps if self.elapsed < self.config.max_seconds else self.step
        # every rank joins this all-reduce on every step, whatever its own clock says, so none waits alone
        return -agreed_max(-fitted, self.device, self.dist)

    def _finish(self) -> None:
        """The end of the schedule: what a time budget cost, then every evaluation once more."""
        config = self.config
        if config.max_seconds is not None and self.max_steps <= config.warmup_steps:
            self.log_event(f"warning: the {config.max_seconds:g}-second budget allowed {self.max_steps} steps, "
                           f"no more than warmup_steps={config.warmup_steps}: the learning rate never "
                           f"peaked; raise max_seconds or lower warmup_steps")
        if shortfall := budget_shortfall(config, self.step):
            self.log_event(shortfall)
        self._evaluations(final=True)

    # --------------------------------------------------------------------------------------------- steps

    def train_step(self) -> dict:
        """One optimizer step over total_batch_tokens tokens: accumulate, clip, step; returns its record."""
        train_model, scaler, accum = self.train_model, self.scaler, self.grad_accum_steps
        train_model.train()
        self.clock.start_step()
        lr = lr_at(self.step, self.config, self.max_steps)
        for optimizer in self.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)  # groups with a rate of their own (embeddings)
            optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=self.device)
        for micro_step in range(accum):
            x, y = (t.to(self.device, non_blocking=True) for t in self.train_loader.next_batch())
            with gradient_sync(self.model, train_model, sync=micro_step == accum - 1):  # reduce on the last only
                with autocast(self.device, self.precision):
                    _, loss = train_model(x, y)
                loss = loss / accum  # the mean over the whole batch, not a sum of means
                loss_sum += loss.detach()
                scaler.scale(loss).backward()  # fp16: scaled up so that small gradients do not underflow
        loss = all_reduce_mean(loss_sum, self.dist).item()
        for optimizer in self.optimizers:
            scaler.unscale_(optimizer)  # the true gradients again, before they are clipped
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip).item()
        outcome = step_all_or_none(self.optimizers, scaler, loss, grad_norm)
        dt = self.clock.end_step(self.device)
        tokens_per_s = self.config.total_batch_tokens / dt
        mfu = None if self.peak is None else tokens_per_s * self.flops_per_token / self.peak
        self.step += 1
        return {"kind": "train", "step": self.step - 1, "loss": loss, "lr": lr, "grad_norm": grad_norm, "dt": dt,
                "tokens_per_s": tokens_per_s, "mfu": mfu, **outcome}

    @torch.no_grad()
    def evaluate(self, batches: int | None = None) -> float | None:
        """Mean validation loss over the same first `batches` (default eval_batches; 0: all) val batches."""
        if self.val_loader is None:
            return None
        model = self.model
        model.eval()
        self.val_loader.reset()
        batches = self.val_batches(batches)
        total = torch.zeros((), device=self.device)
        for _ in range(batches):
            x, y = self.val_loader.next_batch()
            with autocast(self.device, self.precision):
                _, loss = model(x.to(self.device), y.to(self.device))
            total += loss.float()
        model.train()
        self.last_val_loss = all_reduce_mean(total / batches, self.dist).item()
        return self.last_val_loss

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
        from .hellaswag import HellaSwagUnavailable, evaluate_hellaswag, load_examples_for

        if self._hellaswag_examples is None:  # read and validated once, scored every interval
            try:
                self._hellaswag_examples = load_examples_for(self.tokenizer, self.config.hellaswag_path,
                                                             limit=self.config.hellaswag_limit)
            except HellaSwagUnavailable as reason:
                self._hellaswag_examples = []
                self.log_event(f"HellaSwag skipped for this run: {reason}")
        if not self._hellaswag_examples:
            return None
        return evaluate_hellaswag(self.model, self.tokenizer, self._hellaswag_examples, device=self.device,
                                  precision=self.precision, dist_info=self.dist)

    def save(self) -> Path | None:
        """Checkpoint the current state (rank 0 writes; other ranks wait so nobody runs ahead). The payload's
        keys are a file format (nbgpt.checkpoint): they are only ever added, and `_restore` reads new ones
        with defaults. Weights that are not finite are never written: they would become the run's "latest"."""
        path = None
        model_state, optimizer_states = full_state(self.model, self.optimizers)  # under FSDP: rank 0's alone
        rng = rng_state(self.device, self.dist)  # gathered from every rank
        if self.dist.is_main and not all(bool(torch.isfinite(t).all()) for t in model_state.values()):
            self.log_event(f"step {self.step}: the weights are not finite; no checkpoint written")
        elif self.dist.is_main:
            path = save_checkpoint(self.checkpoint_dir, self.step, {
                "model": model_state, "optimizer": optimizer_states, "scaler": self.scaler.state_dict(),
                "loader": self.train_loader.state_dict(), "rng": rng, "model_config": self.model_config.to_dict(),
                "train_config": asdict(self.config), "bound": self.bound_settings(),
                "tokenizer": tokenizer_spec(self.tokenizer),
                "max_steps": self.max_steps, "elapsed": self.elapsed, "val_loss": self.last_val_loss,
                "precision": self.precision}, keep=self.config.keep_checkpoints)
        if self.dist.enabled:
            torch.distributed.barrier()
        return path

    def close(self) -> None:
        """Release the run directory and leave the process group, then close the tracker (it may wait on its
        uploads, and no other rank waits on it); the trainer cannot train afterwards."""
        if self.lock is not None:
            self.lock.release()
        # DDP's wrapper holds the process group in its reducer: freed while the group lives (collected after the
        # group was destroyed, it hung rank 0 of gloo runs at exit); evaluation needs only the model
        self.train_model = None
        gc.collect()
        shutdown(self.dist)
        if self.dist.enabled:  # a sharded model's handles on the group: freed now, in order, not by the
            self.model = self.train_model = self.optimizers = None  # interpreter's exit (a C++ abort there)
            gc.collect()
        self.metrics.close()


def step_all_or_none(optimizers: list[torch.optim.Optimizer], scaler: torch.amp.GradScaler, loss: float,
                     grad_norm: float) -> dict:
    """Step every optimizer or none, then let the loss scaler update; returns the train record's fields for it.

    An inf or NaN in any gradient makes the total norm non-finite. GradScaler.step alone would skip only
    the optimizer owning that gradient, while clipping by an infinite norm has scaled every other gradient
    to zero, and Muon, or AdamW's momentum and weight decay, would still move their weights: half a step.
    So the whole step is skipped; the scaler's update still sees the overflow that unscale_ recorded and
    halves the scale. Every rank sees the same all-reduced loss and gradients, so all of them agree."""
    scale = scaler.get_scale() if scaler.is_enabled() else None
    skip = not (math.isfinite(loss) and math.isfinite(grad_norm))
    for optimizer in optimizers:
        if skip:
            optimizer.zero_grad(set_to_none=True)
        else:
            scaler.step(optimizer)
    scaler.update()
    if scale is None:  # no fp16 scaler: any non-finite step counts toward divergence (DivergenceGuard)
        return {"nonfinite": True, "skipped": True} if skip else {}
    # fp16: an overflowing gradient is the scaler's routine (a lower scale), only a non-finite loss is not
    return {"grad_scale": scale, "skipped": skip, **({"nonfinite": True} if not math.isfinite(loss) else {})}


def train_bigram(data_dir: str, steps: int = 500, batch_size: int = 32, seq_len: int = 64, lr: float = 0.1,
                 eval_batches: int = 8, seed: int = 1337, device: str = "auto", progress: bool = True,
                 max_table_vocab: int = 4096, rank: int = 256) -> dict:
    """Train the bigram baseline briefly; returns the model and its final train and validation losses.

    Vocabularies above `max_table_vocab` (GPT-2's BPE) get a table factorised through `rank` dimensions."""
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
