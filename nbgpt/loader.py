"""Batches of (x, y) from a token dataset, split across DDP ranks, with a position you can save and restore.

The split's tokens are cut into windows of T + 1 tokens (x is the first T, y the last T: each token's next
token). A window starts every T tokens, or, with `align_documents`, at every document start. Step g of an
epoch takes windows [g·B·W, (g+1)·B·W) of the epoch's order, and rank r of W takes the r-th B of them, so
ranks never read the same window and together cover exactly what one process with batch B·W would.
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
    step: int = 0  # batches taken so far in this epoch (per rank; the same number on every rank)


class DataLoader:
    def __init__(self, data_dir: str | os.PathLike | TokenStore, split: str, batch_size: int, seq_len: int, *,
                 rank: int = 0, world_size: int = 1, shuffle: bool = False, seed: int = 0,
                 align_documents: bool = False):
        if batch_size <= 0 or seq_len <= 0:
            raise DataError(f"batch_size and seq_len must be positive, got {batch_size} and {seq_len}")
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside world_size {world_size}")
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
        per_step = batch_size * world_size
        self.steps_per_epoch = len(self.window_starts) // per_step
        if self.steps_per_epoch == 0:
            raise DataError(
                f"the {split} split of {self.store.data_dir} has {end - start} tokens: {len(self.window_starts)} "
                f"windows of {seq_len}+1 tokens, fewer than one batch of {batch_size} x {world_size} rank(s). "
                f"Lower batch_size or seq_len, or prepare more data")
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
        if self.state.step >= self.steps_per_epoch:
            self.state = LoaderState(self.state.epoch + 1, 0)
        order = self._epoch_order()
        first = (self.state.step * self.world_size + self.rank) * self.B
        picks = np.arange(first, first + self.B)
        if order is not None:
            picks = order[picks]
        windows = np.stack([self.store.read(int(s), self.T + 1) for s in self.window_starts[picks]])
        self.state.step += 1
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
        return {"epoch": self.state.epoch, "step": self.state.step, "split": self.split, "batch_size": self.B,
                "seq_len": self.T, "world_size": self.world_size, "shuffle": self.shuffle, "seed": self.seed,
                "align_documents": self.align_documents,
                "content_sha256": self.store.manifest["content_sha256"]}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where the saved loader stopped; refuse a state from an incompatible setup."""
        for key, ours in (("split", self.split), ("batch_size", self.B), ("seq_len", self.T),
                          ("world_size", self.world_size), ("shuffle", self.shuffle), ("seed", self.seed),
                          ("align_documents", self.align_documents),
                          ("content_sha256", self.store.manifest["content_sha256"])):
            if state.get(key) != ours:
                raise DataError(f"loader state was saved with {key}={state.get(key)!r} but this loader has "
                                f"{key}={ours!r}; resume with the same data and batch settings")
        self.state = LoaderState(int(state["epoch"]), int(state["step"]))
