"""What a training checkpoint holds, and how a trainer takes it back.

A resumed run must continue as if it had never stopped: the same weights and optimizer moments, the same loss
scale, the data loader at the same sequence of the run, the same random streams, and the same schedule (step,
the horizon fitted to a time budget, the training time spent). The data position counts sequences, not batches
of one rank, so the run may continue with another nproc or micro_batch (nbgpt.loader). The payload's keys
(Trainer.save writes them, Trainer._restore reads them) are a file format: checkpoints written by earlier
versions must keep loading, so keys are only ever added, and read with defaults.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from .checkpoint import CheckpointError, has_checkpoints, load_latest
from .distributed import DistInfo, all_gather_objects
from .files import remove_stale_temp_files
from .model import ConfigError

if TYPE_CHECKING:
    from .run_config import TrainConfig


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


def load_resumable(config: TrainConfig, checkpoint_dir: Path, is_main: bool, note: Callable[[str], None]
                   ) -> dict | None:
    """The newest good checkpoint of the run directory when resuming, else None.

    resume=False over existing checkpoints is refused rather than obeyed: the new run's checkpoints would
    replace the old ones, and a user's run is never overwritten silently."""
    if is_main:
        remove_stale_temp_files(checkpoint_dir)  # the halves of a save a kill interrupted
    if not config.resume and has_checkpoints(checkpoint_dir):
        raise ConfigError(f"{checkpoint_dir.parent} holds checkpoints of a run and resume=False would overwrite "
                          f"them; resume it, choose another out_dir, or delete {checkpoint_dir} to start over")
    if not config.resume:
        return None
    try:
        return load_latest(checkpoint_dir, on_skip=note)
    except CheckpointError as exc:
        raise CheckpointError(f"{exc}\nMove {checkpoint_dir} away to start over.") from exc


def _tokens(identity: dict) -> str:
    """A tokenizer identity (nbgpt.tokenizer) in words: its kind and vocabulary size."""
    return f"{identity.get('kind')}, vocabulary {identity.get('vocab_size')}"


def check_compatible(payload: dict, config: TrainConfig, model_config: dict, tokenizer, optimizers: int,
                     checkpoint_dir: Path) -> None:
    """Refuse a checkpoint this run cannot continue: other token ids, another model shape, another optimizer
    (what a recipe changes is among them; its name alone is a label)."""
    if payload["tokenizer"]["identity"] != tokenizer.identity():
        # Another run's checkpoints in this out_dir, far more often than a dataset that changed under a run.
        theirs = payload["train_config"].get("data_dir") or "another dataset"
        raise CheckpointError(
            f"{checkpoint_dir.parent} already holds checkpoints of another run, trained on {theirs} (tokens: "
            f"{_tokens(payload['tokenizer']['identity'])}), and this run's data {config.data_dir} has other "
            f"tokens ({_tokens(tokenizer.identity())}): choose another out_dir (run directory) for this run, or "
            f"resume that one with its data_dir {theirs}")
    saved = payload["model_config"]
    if differ := ", ".join(f"{name} {saved.get(name)!r} there, {model_config.get(name)!r} here"
                           for name in differing(saved, model_config)):
        raise CheckpointError(f"the checkpoint in {checkpoint_dir} is of a different model ({differ}); resume with "
                              f"the checkpoint's model settings, or use another out_dir")
    if len(payload["optimizer"]) != optimizers:
        raise CheckpointError(f"the checkpoint in {checkpoint_dir} was trained with another optimizer "
                              f"({len(payload['optimizer'])} state(s), this run has {optimizers}); "
                              f"resume with the same optimizer setting, or use another out_dir")


def differing(saved: dict, current: dict) -> list[str]:
    """The settings on which a checkpoint's run (`saved`) and this one disagree, saved's first: the one test
    that a run directory's checkpoints continue only the run that wrote them (here, and in nbgpt.run)."""
    return [name for name in {**saved, **current} if saved.get(name) != current.get(name)]


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
