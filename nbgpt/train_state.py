"""What a training checkpoint holds, and how a trainer takes it back.

A resumed run must continue as if it had never stopped: the same weights and optimizer moments, the same loss
scale, the data loader at the same sequence of the run, the same random streams, and the same schedule (step,
the horizon fitted to a time budget, the training time spent). The data position counts sequences, not batches
of one rank, so the run may continue with another nproc or micro_batch (nbgpt.loader). The payload keys below
are a file format: checkpoints written by earlier versions must keep loading, so keys are only ever added, and
read with defaults.
"""

from __future__ import annotations

import random
from dataclasses import asdict
from typing import TYPE_CHECKING

import numpy as np
import torch

from .checkpoint import CheckpointError, has_checkpoints, load_latest
from .distributed import DistInfo, all_gather_objects
from .files import remove_stale_temp_files
from .model import ConfigError
from .sharding import load_full_state
from .tokenizer import tokenizer_spec

if TYPE_CHECKING:
    from .train import Trainer


def rng_state(device: torch.device, dist: DistInfo) -> dict:
    """Every random stream training draws from; every rank calls this (a collective), rank 0 saves it.

    Each rank drives a GPU of its own, whose CUDA generator (dropout) is its own too: "cuda_per_rank" lists
    every rank's, by rank (None for a rank without CUDA). "cuda" is rank 0's view of all its GPUs, the one
    CUDA state checkpoints held before. numpy's key array is kept as a tensor: a checkpoint loads with
    weights_only=True, which accepts tensors but not numpy arrays."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state["numpy"] = {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss,
                      "gauss": gauss}
    own = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    state["cuda_per_rank"] = all_gather_objects(own, dist)
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def saved_cuda_state(state: dict, rank: int) -> torch.Tensor | None:
    """This rank's CUDA generator state in a saved `rng_state`, or None: a rank the checkpoint did not have
    (written by fewer ranks, or none with CUDA) keeps its generator as seeded. Checkpoints from before per-rank
    states hold rank 0's GPUs ("cuda"); the first of them, cuda:0, is the only one rank 0 drew from."""
    per_rank = state["cuda_per_rank"] if "cuda_per_rank" in state else state.get("cuda", [])[:1]
    return per_rank[rank] if rank < len(per_rank) else None


def set_rng_state(state: dict, device: torch.device, rank: int) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state(("MT19937", numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["gauss"]))
    cuda = saved_cuda_state(state, rank)
    if cuda is not None and device.type == "cuda":  # a run may move from a GPU box to a CPU one
        torch.cuda.set_rng_state(cuda, device)


def capture(trainer: Trainer, rng: dict, model_state: dict, optimizer_states: list[dict]) -> dict:
    """The checkpoint payload of the trainer's current state, with what every rank joined to gather: `rng`
    (rng_state) and the whole model's and optimizers' state dicts (nbgpt.sharding.full_state)."""
    return {
        "model": model_state, "optimizer": optimizer_states,
        "scaler": trainer.scaler.state_dict(), "loader": trainer.train_loader.state_dict(), "rng": rng,
        "model_config": trainer.model_config.to_dict(), "train_config": asdict(trainer.config),
        "tokenizer": tokenizer_spec(trainer.tokenizer), "max_steps": trainer.max_steps,
        "elapsed": trainer.elapsed, "val_loss": trainer.last_val_loss, "precision": trainer.precision,
    }


def load_resumable(trainer: Trainer) -> dict | None:
    """The newest good checkpoint of the run directory when resuming, else None.

    resume=False over existing checkpoints is refused rather than obeyed: the new run's checkpoints would
    replace the old ones, and a user's run is never overwritten silently."""
    config, directory = trainer.config, trainer.checkpoint_dir
    if trainer.dist.is_main:
        remove_stale_temp_files(directory)  # the halves of a save a kill interrupted
    if not config.resume and has_checkpoints(directory):
        raise ConfigError(f"{trainer.out_dir} holds checkpoints of a run and resume=False would overwrite them; "
                          f"resume it, choose another out_dir, or delete {directory} to start over")
    if not config.resume:
        return None
    try:
        return load_latest(directory, on_skip=trainer.log_event)
    except CheckpointError as exc:
        raise CheckpointError(f"{exc}\nMove {directory} away to start over.") from exc


def _tokens(identity: dict) -> str:
    """A tokenizer identity (nbgpt.tokenizer) in words: its kind and vocabulary size."""
    return f"{identity.get('kind')}, vocabulary {identity.get('vocab_size')}"


def check_compatible(trainer: Trainer, payload: dict) -> None:
    """Refuse a checkpoint this trainer cannot continue: other token ids, another recipe, another model shape,
    another optimizer."""
    directory, tokenizer = trainer.checkpoint_dir, trainer.tokenizer
    if payload["tokenizer"]["identity"] != tokenizer.identity():
        # Another run's checkpoints in this out_dir, far more often than a dataset that changed under a run.
        theirs = payload["train_config"].get("data_dir") or "another dataset"
        raise CheckpointError(
            f"{trainer.out_dir} already holds checkpoints of another run, trained on {theirs} (tokens: "
            f"{_tokens(payload['tokenizer']['identity'])}), and this run's data {trainer.config.data_dir} has "
            f"other tokens ({_tokens(tokenizer.identity())}): choose another out_dir (run directory) for this "
            f"run, or resume that one with its data_dir {theirs}")
    recipe = payload["train_config"].get("recipe", "gpt2")  # checkpoints from before recipes were gpt2's
    if recipe != trainer.config.recipe:
        raise CheckpointError(f"the checkpoint in {directory} was trained with recipe={recipe!r}, this run asks for "
                              f"recipe={trainer.config.recipe!r}; resume with recipe={recipe!r}, or use another out_dir")
    saved, current = payload["model_config"], trainer.model_config.to_dict()
    if saved != current:
        differ = ", ".join(f"{name} {saved.get(name)!r} there, {current.get(name)!r} here"
                           for name in sorted(set(saved) | set(current)) if saved.get(name) != current.get(name))
        raise CheckpointError(f"the checkpoint in {directory} is of a different model ({differ}); resume with "
                              f"the checkpoint's model settings, or use another out_dir")
    if len(payload["optimizer"]) != len(trainer.optimizers):
        raise CheckpointError(f"the checkpoint in {directory} was trained with another optimizer "
                              f"({len(payload['optimizer'])} state(s), this run has {len(trainer.optimizers)}); "
                              f"resume with the same optimizer setting, or use another out_dir")


def restore(trainer: Trainer, payload: dict) -> None:
    """Put a compatible checkpoint's state back into the trainer (see check_compatible)."""
    load_full_state(trainer.model, trainer.optimizers, payload["model"], payload["optimizer"])
    trainer.scaler.load_state_dict(payload["scaler"])
    trainer.train_loader.load_state_dict(payload["loader"])
    set_rng_state(payload["rng"], trainer.device, trainer.dist.rank)
    trainer.step = payload["step"]
    trainer.elapsed = payload.get("elapsed", 0.0)  # absent before time budgets existed
    if trainer.config.max_seconds is not None:  # a horizon fitted to the budget is the run's, not the process's
        trainer.max_steps = min(trainer.config.max_steps, payload["max_steps"])
    trainer.last_val_loss = payload.get("val_loss")


def nothing_to_train(trainer: Trainer) -> str | None:
    """Why a resumed trainer has no step left to train, as the line that says what to do, else None."""
    step, config = trainer.step, trainer.config
    if step < trainer.max_steps:
        return None
    if config.max_seconds is not None and step < config.max_steps:  # the horizon was fitted to the time budget
        return (f"nothing was trained: the checkpoint at step {step} ends the schedule that its max_seconds="
                f"{config.max_seconds:g} budget fitted, and a resumed run keeps that schedule; to train longer, start "
                f"a new run (another out_dir or --name) with a larger max_seconds")
    return (f"nothing was trained: the checkpoint is at step {step}, already at or past max_steps="
            f"{config.max_steps}; to train further, raise max_steps above {step} (e.g. -p max_steps {2 * step})")
