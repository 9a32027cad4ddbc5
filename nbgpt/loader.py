"""Batches of (x, y) from a token dataset, split across DDP ranks, with a position you can save and restore.

The split's tokens are cut into windows of T + 1 tokens (x is the first T, y the last T: each token's next
token). A window starts every T tokens, or, with `align_documents`, at every document start.

The position is counted in windows of the whole run, not in batches of one rank: the n-th call to next_batch
of every rank takes windows [n·B·W, (n+1)·B·W) of the epoch's order, and rank r of W takes the r-th B of
them, so ranks never read the same window and together cover exactly what one process with batch B·W would.
An optimizer step of S windows (S = total_batch_tokens / T, split over micro-steps and ranks) therefore reads
the same S windows whatever B and W are, and an epoch holds a whole number of steps (the order's last
len % S windows are left out), so it ends at the same window too. That is what lets a run stop on 2 GPUs
and continue on 1, or with a smaller micro-batch, reading exactly the windows it would have read next.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from .shards import DataError, TokenStore


@dataclass
class LoaderState:
    epoch: int = 0
    sequence: int = 0  # windows of this epoch taken so far, by all ranks together


class DataLoader:
    def __init__(self, data_dir: str | os.PathLike | TokenStore, split: str, batch_size: int, seq_len: int, *,
                 rank: int = 0, world_size: int = 1, shuffle: bool = False, seed: int = 0,
                 align_documents: bool = False, step_sequences: int | None = None):
        """step_sequences: windows per optimizer step, all ranks and micro-steps together (default one batch
        of every rank); an epoch is a whole number of them."""
        if batch_size <= 0 or seq_len <= 0:
            raise DataError(f"batch_size and seq_len must be positive, got {batch_size} and {seq_len}")
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside world_size {world_size}")
        per_call = batch_size * world_size
        step_sequences = step_sequences or per_call
        if step_sequences % per_call:
            raise DataError(f"a step of {step_sequences} windows does not split into batches of {batch_size} x "
                            f"{world_size} rank(s)")
        self.store = data_dir if isinstance(data_dir, TokenStore) else TokenStore(data_dir)
        self.split, self.B, self.T = split, batch_size, seq_len
        self.rank, self.world_size = rank, world_size
        self.shuffle, self.seed, self.align_documents = shuffle, seed, align_documents
        start, end = self.store.split_range(split)
        if align_documents:
            eot = self.store.manifest["tokenizer"]["eot"]
            starts = self.store.document_starts(start, end, eot)
            self.window_starts = starts[starts + seq_len + 1 <= end]
        else:
            count = max(0, (end - start - 1) // seq_len)
            self.window_starts = start + seq_len * np.arange(count, dtype=np.int64)
        self.step_sequences = step_sequences
        self.epoch_sequences = len(self.window_starts) // step_sequences * step_sequences
        self.steps_per_epoch = self.epoch_sequences // per_call  # next_batch calls per epoch, on every rank
        if self.steps_per_epoch == 0:
            micro_steps = f" x {step_sequences // per_call} micro-step(s)" if step_sequences > per_call else ""
            raise DataError(
                f"the {split} split of {self.store.data_dir} has {end - start} tokens: {len(self.window_starts)} "
                f"windows of {seq_len}+1 tokens, fewer than one batch of {batch_size} x {world_size} rank(s)"
                f"{micro_steps}. Lower the batch or seq_len, or prepare more data")
        self.state = LoaderState()
        self.pin_memory = torch.cuda.is_available()  # only a GPU reads pinned memory faster
        self._order: np.ndarray | None = None
        self._order_epoch = -1

    def _epoch_order(self) -> np.ndarray:
        if self._order_epoch != self.state.epoch:
            if self.shuffle:  # a fresh permutation per epoch, the same on every rank (same seed)
                rng = np.random.default_rng((self.seed, self.state.epoch))
                self._order = rng.permutation(len(self.window_starts))
            else:
                self._order = None
            self._order_epoch = self.state.epoch
        return self._order

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next (x, y), each (B, T) int64, then advance the position."""
        if self.state.sequence >= self.epoch_sequences:
            self.state = LoaderState(self.state.epoch + 1, 0)
        order = self._epoch_order()
        first = self.state.sequence + self.rank * self.B
        picks = np.arange(first, first + self.B)
        if order is not None:
            picks = order[picks]
        windows = np.stack([self.store.read(int(s), self.T + 1) for s in self.window_starts[picks]])
        self.state.sequence += self.B * self.world_size
        batch = torch.from_numpy(windows.astype(np.int64))
        x, y = batch[:, :-1], batch[:, 1:]
        if self.pin_memory:
            # Page-locked host memory lets `.to("cuda", non_blocking=True)` copy by DMA while the GPU is still
            # busy with the previous micro-step; from ordinary (pageable) memory the copy waits for the CPU.
            x, y = x.contiguous().pin_memory(), y.contiguous().pin_memory()
        return x, y

    def reset(self) -> None:
        self.state = LoaderState()

    def state_dict(self) -> dict:
        """The position and what it means. Keys are only ever added (checkpoints keep loading): "step", the
        batches of one rank, is what earlier versions read; "sequence" counts windows, whatever the layout."""
        return {"epoch": self.state.epoch, "sequence": self.state.sequence,
                "step": self.state.sequence // (self.B * self.world_size), "split": self.split,
                "batch_size": self.B, "seq_len": self.T, "world_size": self.world_size,
                "step_sequences": self.step_sequences, "shuffle": self.shuffle, "seed": self.seed,
                "align_documents": self.align_documents, "content_sha256": self.store.manifest["content_sha256"],
                "split_range": list(self.store.split_range(self.split))}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where the saved loader stopped, with any batch_size and world_size that split its
        steps; refuse a state whose windows or order differ (another seq_len, step, data or shuffle)."""
        self._check_same_order(state)
        # a state of an earlier version counts batches of one rank: "step" batches of batch_size x world_size
        sequence = int(state.get("sequence", int(state["step"]) * state["batch_size"] * state["world_size"]))
        per_call = self.B * self.world_size
        if sequence % per_call:
            raise DataError(f"the saved data position ({sequence} windows into epoch {state['epoch']}) is not a "
                            f"whole number of batches of {self.B} x {self.world_size} rank(s); resume with a "
                            f"micro_batch x nproc that divides {sequence}")
        self.state = LoaderState(int(state["epoch"]), sequence)

    def _check_same_order(self, state: dict) -> None:
        """The settings that decide which windows exist and in which order they come."""
        ours = {"split": self.split, "seq_len": self.T, "shuffle": self.shuffle,
                "align_documents": self.align_documents, "content_sha256": self.store.manifest["content_sha256"]}
        if self.shuffle:  # the seed orders the windows only when they are shuffled
            ours["seed"] = self.seed
        for key, value in ours.items():
            if state.get(key) != value:
                fix = ("resume on the dataset the run was trained on" if key == "content_sha256" else
                       f"resume with {key}={state.get(key)!r} (the data order depends on it)")
                raise DataError(f"loader state was saved with {key}={state.get(key)!r} but this loader has "
                                f"{key}={value!r}; {fix} or start a new run")
        # The same tokens split elsewhere (another val_fraction or val_tokens) make other windows. A state of an
        # earlier version recorded no split range, nor a step: it predates step-aligned epochs, and its position
        # holds whatever the step.
        ours = list(self.store.split_range(self.split))
        if state.get("split_range", ours) != ours:
            (a, b), (c, d) = state["split_range"], ours
            raise DataError(f"loader state was saved when the {self.split} split was tokens [{a}, {b}) of the "
                            f"dataset, and it is [{c}, {d}) now (prepared with another val_fraction or val_tokens); "
                            f"prepare the data as the run did, or start a new run")
        saved = state.get("step_sequences", self.step_sequences)
        if saved != self.step_sequences:  # checked after seq_len: tokens per step = sequences x the same T
            raise DataError(f"loader state was saved with {saved} sequences of {self.T} tokens per optimizer step "
                            f"(total_batch_tokens={saved * self.T}) but this run takes {self.step_sequences} "
                            f"(total_batch_tokens={self.step_sequences * self.T}); resume with "
                            f"total_batch_tokens={saved * self.T} or start a new run")
