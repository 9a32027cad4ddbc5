"""The pieces a Trainer is built from: the process's device and precision, the model, the data loaders, the
optimizers and the form of the model that training runs.

Each builder takes the configuration and what came before it and returns plain objects; the Trainer calls
them in order, so its constructor reads as a list of what training needs.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import Callable, TYPE_CHECKING

import torch
from torch.nn.parallel import DistributedDataParallel

from .device import choose_precision, configure_backends, resolve_device
from .distributed import DistInfo, init_distributed, is_sharded, shard
from .loader import DataLoader
from .model import ConfigError, GPT, GPTConfig
from .optim import build_adamw, build_muon
from .shards import DataError, TokenStore

if TYPE_CHECKING:
    from .run_config import TrainConfig


@dataclass
class Runtime:
    device: torch.device
    dist: DistInfo
    precision: str  # fp32 | bf16 | fp16, what "auto" became on this device


def start_runtime(device: str, precision: str, threads: int = 0) -> Runtime:
    """Join the process group (if launched by torchrun), pick this rank's device and its precision: the
    start of every command that runs a model on one or more processes (train, eval)."""
    chosen = resolve_device(device)
    dist = init_distributed(chosen.type)
    if dist.enabled and chosen.type == "cuda":
        chosen = torch.device("cuda", dist.local_rank)  # one GPU per rank
    if threads:
        torch.set_num_threads(threads)
    configure_backends(chosen)
    return Runtime(chosen, dist, choose_precision(chosen, precision))


def open_store(config: TrainConfig) -> TokenStore:
    if not config.data_dir:
        raise ConfigError("TrainConfig.data_dir is empty: point it at a dataset made by prepare()")
    return TokenStore(config.data_dir)


def build_model(config: TrainConfig, vocab_size: int, device: torch.device) -> tuple[GPT, GPTConfig]:
    """A fresh GPT (seeded, so every rank starts from the same weights) or pretrained weights to fine-tune."""
    if config.init_from == "scratch":
        torch.manual_seed(config.seed)
        model = GPT(config.model_config(vocab_size))
    else:
        from .model_files import load_hf

        model = load_hf(config.init_from, vocab_multiple=config.model_overrides.get("vocab_multiple", 1))
        if model.config.vocab_size != vocab_size:
            raise ConfigError(f"{config.init_from} has vocab_size {model.config.vocab_size}, the "
                              f"dataset's tokenizer {vocab_size}")
    return model.to(device), model.config


def build_loaders(config: TrainConfig, micro_batch: int, store: TokenStore, seq_len: int, dist: DistInfo,
                  log_event: Callable[[str], None]) -> tuple[DataLoader, DataLoader | None]:
    """This rank's share of the train split, and of the val split when it holds at least one batch, in
    batches of `micro_batch` sequences (config.micro_batch resolved: it may say "auto").

    The train loader's epochs are whole optimizer steps of total_batch_tokens, so that the windows a step reads
    do not depend on nproc or micro_batch: a run may continue with others (see nbgpt.loader)."""
    shard = dict(batch_size=micro_batch, seq_len=seq_len, rank=dist.rank, world_size=dist.world_size)
    train = DataLoader(store, "train", shuffle=config.shuffle, seed=config.seed,
                       align_documents=config.align_documents,
                       step_sequences=config.total_batch_tokens // seq_len, **shard)
    try:
        return train, DataLoader(store, "val", **shard)
    except DataError:
        log_event("no validation batches: the val split is empty or smaller than one batch")
        return train, None  # evaluation is skipped


def build_optimizers(model: GPT, config: TrainConfig, device_type: str) -> list[torch.optim.Optimizer]:
    """The optimizer(s) that `config.optimizer` names; every one of them follows the same LR schedule."""
    betas = (config.beta1, config.beta2)
    scale = config.embedding_lr_scale
    if config.optimizer == "adamw":
        return [build_adamw(model, config.weight_decay, config.max_lr, betas, device_type,
                            embeddings=model.embedding_parameters(), embedding_lr_scale=scale)]
    return build_muon(model, config.weight_decay, config.max_lr, betas, device_type, embedding_lr_scale=scale)


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    # fp16 has a narrow exponent range: small gradients underflow to zero unless the loss is scaled up first.
    # The scaler does that, and skips any step whose gradients overflowed to inf/NaN. Elsewhere it is a no-op.
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def wrap_model(model: GPT, config: TrainConfig, runtime: Runtime) -> torch.nn.Module:
    """The model as the training step runs it: compiled if asked, and that wrapped in DDP across ranks; or,
    with parallel="fsdp", sharded in place (nbgpt.distributed) and then compiled. A single process has nothing
    to share or shard: it trains the plain model either way. Evaluation runs the GPT itself: its forward pass
    needs no gradient hooks, and one compiled graph (for training) is all a run compiles."""
    if runtime.dist.enabled and config.parallel == "fsdp":
        shard(model, runtime.precision)
    compiled = torch.compile(model) if config.compile else model
    if not runtime.dist.enabled or config.parallel == "fsdp":
        return compiled
    device_ids = [runtime.dist.local_rank] if runtime.device.type == "cuda" else None
    # DDP re-sends the module's buffers from rank 0 before every forward by default. GPT's only buffers are
    # the rotary tables, computed from the config alike on every rank and never updated: nothing to re-send.
    # (torch 2.13 renamed the switch; before it, broadcast_buffers=False said the same.)
    renamed = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
    no_buffer_sync = {"forward_sync_buffers" if renamed else "broadcast_buffers": False}
    # gradient_as_bucket_view: the gradients live in DDP's all-reduce buckets instead of beside a second copy
    # of them there, which saves one model's worth of gradient memory.
    return DistributedDataParallel(compiled, device_ids=device_ids, gradient_as_bucket_view=True,
                                   **no_buffer_sync)


@contextlib.contextmanager
def gradient_sync(model: torch.nn.Module, train_model: torch.nn.Module, sync: bool):
    """A micro-step's backward: gradients reduced over the ranks when `sync` (the last micro-step), else only
    accumulated on each rank, which saves a reduction per micro-step. DDP all-reduces whole gradients; FSDP
    reduce-scatters them into each rank's shard, and until then keeps the unsharded gradients it accumulates
    (in fp32: 4 bytes per parameter of the whole model on every rank, the price of one reduction per step)."""
    if sync:
        yield
    elif is_sharded(model):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    elif isinstance(train_model, DistributedDataParallel):
        with train_model.no_sync():
            yield
    else:
        yield
