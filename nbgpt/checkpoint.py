"""Checkpoints that survive a kill at any moment and never execute code when loaded, and what a training
checkpoint holds for a run to continue as if it had never stopped (below).

A checkpoint is one `ckpt_XXXXXXX.pt` file written atomically (temp file, fsync, rename). `checkpoints.json`
lists the complete ones with their step and sha256; it is rewritten atomically after each save, so whatever
it points to is complete. It is a cache of the folder, never the only record: when it is lost or disagrees
with the files, it is rebuilt from the checkpoint files that verify. Loading verifies the hash and uses
`torch.load(weights_only=True)`, which only rebuilds tensors and plain containers: a file with a pickled payload
is refused, not run.
"""

from __future__ import annotations

import io
import os
import random
import re
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .knobs import ConfigError, differences
from .distributed import DistInfo, all_gather_objects
from .errors import NbgptError
from .files import (atomic_write_bytes, atomic_write_json, read_json, remove_stale_temp_files, sha256_bytes,
                    sha256_file)

INDEX = "checkpoints.json"


class CheckpointError(NbgptError):
    """A checkpoint that is missing, truncated, corrupt or not made by nbgpt."""


def checkpoint_name(step: int) -> str:
    return f"ckpt_{step:07d}.pt"


def _valid_entry(entry) -> bool:
    return (isinstance(entry, dict) and isinstance(entry.get("step"), int) and isinstance(entry.get("sha256"), str)
            and isinstance(entry.get("file"), str) and entry["file"] == checkpoint_name(entry["step"]))


def _read_index(directory: Path) -> tuple[list[dict] | None, str]:
    """The index's entries, or None and why they cannot be trusted."""
    path = directory / INDEX
    if not path.is_file():
        return None, f"{INDEX} is missing"
    try:
        entries = read_json(path)["checkpoints"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return None, f"{INDEX} is unreadable ({type(exc).__name__}: {exc})"
    if not isinstance(entries, list) or not all(_valid_entry(e) for e in entries):
        return None, f"{INDEX} has malformed entries"
    listed = {e["file"] for e in entries}
    on_disk = {p.name for p in directory.glob("ckpt_*.pt")}
    if listed != on_disk:
        return None, f"{INDEX} lists {sorted(listed) or 'nothing'} but the folder holds {sorted(on_disk)}"
    return entries, ""


def _scan(directory: Path, note) -> list[dict]:
    """Index entries for the checkpoint files that load and verify, oldest first."""
    entries = []
    for path in sorted(directory.glob("ckpt_*.pt")):
        try:
            step = load_file(path)["step"]
        except CheckpointError as exc:
            note(f"skipping damaged checkpoint: {exc}")
            continue
        entries.append({"step": step, "file": path.name, "sha256": sha256_file(path)})
    return entries


def _index(directory: Path, note=None) -> list[dict]:
    """The checkpoints of `directory`, oldest first. The index is a cache of the folder: when it is missing,
    torn, or disagrees with the files there, it is rebuilt from the checkpoint files that verify."""
    entries, problem = _read_index(directory)
    if entries is not None:
        return entries
    files = sorted(directory.glob("ckpt_*.pt"))
    if not files:
        return []
    note = note or (lambda message: None)
    entries = _scan(directory, note)
    note(f"{problem}: rebuilt it from {len(entries)} verified checkpoint file(s) of {len(files)} in {directory}")
    return entries


def has_checkpoints(directory: str | os.PathLike) -> bool:
    """Whether `directory` holds any checkpoint file (good or damaged): a run that must not be overwritten."""
    return any(Path(directory).glob("ckpt_*.pt"))


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The newest indexed checkpoint file, or None when the run has none yet."""
    entries = _index(Path(directory))
    return Path(directory) / entries[-1]["file"] if entries else None


def save_checkpoint(directory: str | os.PathLike, step: int, payload: dict, keep: int = 3) -> Path:
    """Write `payload` (tensors, numbers, strings, lists, dicts) as the checkpoint of `step`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / checkpoint_name(step)
    # Serialise in memory first: a full disk then fails as a plain write (a clear WriteError), not inside
    # torch's zip writer, and the hash comes from the bytes without reading the file back.
    buffer = io.BytesIO()
    torch.save({**payload, "step": step, "format": "nbgpt-checkpoint-1"}, buffer)
    data = buffer.getvalue()
    entries = [e for e in _index(directory) if e["step"] != step]  # read before the new file joins the folder
    atomic_write_bytes(path, data)
    entries.append({"step": step, "file": path.name, "sha256": sha256_bytes(data)})
    entries.sort(key=lambda e: e["step"])
    kept, dropped = entries[-keep:] if keep > 0 else entries, entries[:-keep] if keep > 0 else []
    atomic_write_json(directory / INDEX, {"checkpoints": kept, "latest": kept[-1]["file"]})
    for entry in dropped:
        (directory / entry["file"]).unlink(missing_ok=True)
    return path


def load_file(path: str | os.PathLike, expected_sha256: str | None = None) -> dict:
    """Load one checkpoint file safely; raise CheckpointError naming the problem."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if expected_sha256 is not None and sha256_file(path) != expected_sha256:
        raise CheckpointError(f"checkpoint {path} is damaged: it does not match the sha256 recorded when it was "
                              f"written (truncated or corrupted since)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise _unreadable(path, exc) from exc
    if not isinstance(payload, dict) or payload.get("format") != "nbgpt-checkpoint-1":
        raise CheckpointError(f"{path} is not an nbgpt checkpoint")
    return payload


def _unreadable(path: Path, exc: Exception) -> CheckpointError:
    """Why torch.load(weights_only=True) failed. A global (a name to import and call) is code, which no nbgpt
    checkpoint holds: refused, never run. Anything else is a damaged file. torch's own text is not passed on:
    it advises weights_only=False, which would run whatever the file holds."""
    named = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
    if named:
        return CheckpointError(f"checkpoint {path} refers to {named.group(1)}, code rather than tensors and plain "
                               f"data: refused without running it (it may be malicious); load only checkpoints "
                               f"that nbgpt wrote")
    return CheckpointError(f"checkpoint {path} is damaged: torch cannot read it ({type(exc).__name__}), so it was "
                           f"truncated or corrupted after it was written")


def warn(message: str) -> None:
    print(message, file=sys.stderr)


def load_latest(directory: str | os.PathLike, on_skip=warn) -> dict | None:
    """The newest checkpoint in `directory` that verifies, falling back to older ones; None if none exist.

    `on_skip(message)` hears every fallback and index rebuild, with the reason (default: stderr).
    """
    directory = Path(directory)
    entries = _index(directory, on_skip)
    if not entries:
        return None
    errors = []
    for entry in reversed(entries):
        try:
            payload = load_file(directory / entry["file"], entry["sha256"])
        except CheckpointError as exc:
            errors.append(str(exc))
            continue
        if errors:
            on_skip(f"using the older checkpoint {entry['file']} (step {entry['step']}) because the newer ones "
                    f"are damaged: " + "; ".join(errors))
        return payload
    raise CheckpointError(f"no usable checkpoint in {directory} (restore one from a copy, or train a new run in "
                          f"another folder):\n  " + "\n  ".join(errors))


def checkpoint_folder(path: str | os.PathLike) -> Path | None:
    """Where the checkpoints of `path` are: a run directory's checkpoints/, or `path` itself when it is such a
    folder; None when it holds none (then it is no run, or a run that has not checkpointed yet)."""
    path = Path(path)
    for directory in (path / "checkpoints", path):
        if (directory / INDEX).is_file() or has_checkpoints(directory):
            return directory
    return None


def resolve_checkpoint(path: str | os.PathLike) -> dict:
    """A run directory, a checkpoints folder, or a checkpoint file -> the newest good checkpoint."""
    path = Path(path)
    if path.is_file():
        entries, _ = _read_index(path.parent)  # a checkpoint of a run is checked against its recorded hash
        recorded = {e["file"]: e["sha256"] for e in entries or ()}
        try:
            return load_file(path, recorded.get(path.name))
        except CheckpointError as exc:
            raise CheckpointError(f"{exc}; {_instead_of(path)}") from None
    folder = checkpoint_folder(path)
    payload = load_latest(folder) if folder is not None else None
    if payload is None:
        raise CheckpointError(f"no nbgpt checkpoint at {path} (looked for {INDEX} in it and in its checkpoints/)")
    return payload


def _instead_of(path: Path) -> str:
    """What to load when the checkpoint file `path` cannot be."""
    if any(other != path for other in path.parent.glob("ckpt_*.pt")):
        return (f"pass its folder, {path.parent}, instead: loading a folder falls back to the newest of its "
                f"checkpoints that verifies, and says which")
    return "restore it from a copy, or train again"


# What a training checkpoint holds, and how a trainer takes it back.
#
# A resumed run must continue as if it had never stopped: the same weights and optimizer moments, the same loss
# scale, the data loader at the same sequence of the run, the same random streams, and the same schedule (step,
# the horizon fitted to a time budget, the training time spent). The data position counts sequences, not batches
# of one rank, so the run may continue with another nproc or micro_batch (nbgpt.loader). The payload's keys
# (Trainer.save writes them, Trainer._restore reads them) are a file format: checkpoints written by earlier
# versions must keep loading, so keys are only ever added, and read with defaults.


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


def load_resumable(resume: bool, checkpoint_dir: Path, is_main: bool, note: Callable[[str], None]) -> dict | None:
    """The newest good checkpoint of the run directory when resuming, else None.

    resume=False over existing checkpoints is refused rather than obeyed: the new run's checkpoints would
    replace the old ones, and a user's run is never overwritten silently."""
    if is_main:
        remove_stale_temp_files(checkpoint_dir)  # the halves of a save a kill interrupted
    if not resume and has_checkpoints(checkpoint_dir):
        raise ConfigError(f"{checkpoint_dir.parent} holds checkpoints of a run and resume=False would overwrite "
                          f"them; resume it, choose another out_dir, or delete {checkpoint_dir} to start over")
    if not resume:
        return None
    try:
        return load_latest(checkpoint_dir, on_skip=note)
    except CheckpointError as exc:
        raise CheckpointError(f"{exc}\nMove {checkpoint_dir} away to start over.") from exc


def _tokens(identity: dict) -> str:
    """A tokenizer identity (nbgpt.tokenizer) in words: its kind and vocabulary size."""
    return f"{identity.get('kind')}, vocabulary {identity.get('vocab_size')}"


def check_compatible(payload: dict, then: dict, now: dict, tokenizer, data_dir: str, checkpoint_dir: Path) -> None:
    """Refuse a checkpoint this run cannot continue: other token ids, or other settings among those a run is
    bound to (TrainConfig.bound_settings: `then` the checkpoint's run's, `now` this run's)."""
    if payload["tokenizer"]["identity"] != tokenizer.identity():
        # Another run's checkpoints in this out_dir, far more often than a dataset that changed under a run.
        theirs = payload["train_config"].get("data_dir") or "another dataset"
        raise CheckpointError(
            f"{checkpoint_dir.parent} already holds checkpoints of another run, trained on {theirs} (tokens: "
            f"{_tokens(payload['tokenizer']['identity'])}), and this run's data {data_dir} has other "
            f"tokens ({_tokens(tokenizer.identity())}): choose another out_dir (run directory) for this run, or "
            f"resume that one with its data_dir {theirs}")
    if differ := differences(then, now):
        raise CheckpointError(f"the checkpoint in {checkpoint_dir} was trained with other settings ({differ}); "
                              f"resume with the checkpoint's settings (nproc and micro_batch may change), or use "
                              f"another out_dir")
