"""Checkpoints that survive a kill at any moment and never execute code when loaded.

A checkpoint is one `ckpt_XXXXXXX.pt` file written atomically (temp file, fsync, rename). `checkpoints.json`
lists the complete ones with their step and sha256; it is rewritten atomically after each save, so whatever
it points to is complete. Loading verifies the hash and uses `torch.load(weights_only=True)`, which only
rebuilds tensors and plain containers: a file with a pickled payload is refused, not run.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import torch

from .files import atomic_write_bytes, atomic_write_json, read_json, sha256_bytes, sha256_file

INDEX = "checkpoints.json"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, truncated, corrupt or not made by nbgpt."""


def checkpoint_name(step: int) -> str:
    return f"ckpt_{step:07d}.pt"


def _index(directory: Path) -> list[dict]:
    path = directory / INDEX
    if not path.is_file():
        return []
    try:
        return list(read_json(path)["checkpoints"])
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path} is unreadable ({exc}); delete it to rescan, checkpoints stay") from exc


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
    atomic_write_bytes(path, data)
    entries = [e for e in _index(directory) if e["step"] != step]
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
        raise CheckpointError(f"checkpoint {path} does not match its recorded sha256: it is truncated or corrupt")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        text = str(exc)
        if "weights_only" in text or "Unsupported global" in text or "Unpickler" in text:
            raise CheckpointError(f"checkpoint {path} contains objects other than tensors and plain data and was "
                                  f"refused without running them (it may carry code): {text[:300]}") from exc
        raise CheckpointError(f"checkpoint {path} is not a readable torch file (truncated or corrupt): "
                              f"{type(exc).__name__}: {text[:200]}") from exc
    if not isinstance(payload, dict) or payload.get("format") != "nbgpt-checkpoint-1":
        raise CheckpointError(f"{path} is not an nbgpt checkpoint")
    return payload


def load_latest(directory: str | os.PathLike, on_skip=None) -> dict | None:
    """The newest checkpoint in `directory` that verifies, falling back to older ones; None if none exist.

    `on_skip(message)` is called for each damaged checkpoint passed over.
    """
    directory = Path(directory)
    entries = _index(directory)
    if not entries:
        return None
    errors = []
    for entry in reversed(entries):
        try:
            return load_file(directory / entry["file"], entry["sha256"])
        except CheckpointError as exc:
            errors.append(str(exc))
            if on_skip is not None:
                on_skip(f"skipping damaged checkpoint: {exc}")
    raise CheckpointError("no usable checkpoint in " + str(directory) + ":\n  " + "\n  ".join(errors))


def resolve_checkpoint(path: str | os.PathLike) -> dict:
    """A run directory, a checkpoints folder, or a checkpoint file -> the newest good checkpoint."""
    path = Path(path)
    if path.is_file():
        return load_file(path)
    for directory in (path / "checkpoints", path):
        if (directory / INDEX).is_file():
            payload = load_latest(directory)
            if payload is not None:
                return payload
    raise CheckpointError(f"no nbgpt checkpoint at {path} (looked for {INDEX} in it and in its checkpoints/)")

