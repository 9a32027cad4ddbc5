"""Fully sharded data parallel training (torch's FSDP2, `fully_shard`): each rank keeps 1/N of the weights,
gradients and optimizer state instead of all of it.

Under DDP every GPU holds the whole model, its gradients and AdamW's two moments: 16 bytes per parameter in
fp32, ~20 GiB for GPT-3 XL (1.3B) before any activation. `fully_shard` turns every parameter into a DTensor
sharded along its first dimension over the ranks; each transformer block gathers its weights just before it
runs (forward and backward) and frees them after, and gradients are reduce-scattered, so each rank ends a
step with the gradient of its own shard only. Per rank that is 16/N bytes per parameter, plus one block's
gathered weights at a time and whatever the root module (embeddings, final LayerNorm, head) holds while it runs.

Checkpoints stay what they are without sharding: full state dicts gathered to rank 0 (torch's
`get_model_state_dict`, and the optimizers' shards gathered one tensor at a time, to its CPU memory), written
as one verified file. So a run saved under FSDP resumes on any number of processes, under DDP or FSDP, and
export, sample, eval and the panel read it like any other. torch's distributed checkpoint format was not used: its metadata file is
a pickle, and nbgpt never unpickles what it loads.

Mid-training samples and HellaSwag run through the sharded model itself, on every rank: each forward pass
gathers weights from all ranks, so every rank must run the same passes in the same order (a rank that skips
one leaves the others waiting in its gather for ever). Sampling keeps every rank in step by decoding the same
rows with rank 0's tokens (from_rank_zero); HellaSwag's ranks score their own examples and pad with dummy
batches up to the most any rank has (most_on_any_rank).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Replicate

from .device import DTYPES


def shard(model: nn.Module, precision: str) -> None:
    """Shard `model` (a GPT) in place over the process group: each block a unit of its own, then the root,
    which takes what is left (embeddings, the tied head, the final LayerNorm).

    The mixed-precision policy gathers weights in the run's 16-bit dtype (half the traffic and the memory
    of a gathered block) and reduces gradients in fp32 into the fp32 shards the optimizers update, as DDP
    all-reduces fp32 gradients of fp32 weights. nbgpt's autocast stays on around the forward pass: it
    still decides, op by op, what runs in fp32 (LayerNorm, softmax, the loss) as it does under DDP; the
    policy only sets the dtype the weights arrive in."""
    dtype = DTYPES[precision]
    policy = MixedPrecisionPolicy(param_dtype=None if dtype is torch.float32 else dtype, reduce_dtype=torch.float32)
    for block in model.h:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)


def claim_root(model: nn.Module) -> None:
    """Run one token through a sharded model's forward. FSDP takes the first of its modules to run for the
    root, which alone gathers the embeddings and the head and prepares every rank's pass: a block called
    first (hidden_states outside forward) would take that part and break every later forward."""
    model(torch.zeros(1, 1, dtype=torch.long, device=next(model.parameters()).device), keep_logits=1)


@contextmanager
def root_gathered(model: nn.Module):
    """Under FSDP, the root's own weights (embeddings, final LayerNorm, the tied head) gathered whole for the
    duration, so that methods besides forward (hidden_states, head) may use them once claim_root has run;
    the blocks still gather and free theirs as they run. A plain model: nothing to do."""
    if not is_sharded(model):
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


def from_rank_zero(tensor: torch.Tensor) -> torch.Tensor:
    """Rank 0's `tensor` on every rank (a broadcast, in place). Decoding a sharded model: every rank computes
    the same logits and draws the same tokens from the same seed, but one GPU's kernels rounding differently
    would end one rank's rows at another step and leave the rest waiting; rank 0's tokens keep them in step."""
    dist.broadcast(tensor, src=0)
    return tensor


def most_on_any_rank(count: int, device: torch.device) -> int:
    """The largest `count` of any rank (an all-reduce): the forward passes each rank of a sharded model runs
    when each has its own number of batches to score."""
    value = torch.tensor(count, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return int(value)


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor a shard belongs to (an all-gather: every rank gets all of it); a plain tensor as is."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def like(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A whole tensor, identical on every rank, cut to `param`'s shard (no communication: each rank keeps its
    own slice); for a plain parameter, the tensor itself."""
    if not isinstance(param, DTensor):
        return value
    replicated = DTensor.from_local(value, param.device_mesh, [Replicate()] * param.device_mesh.ndim, run_check=False)
    return replicated.redistribute(param.device_mesh, param.placements)


def full_state(model: nn.Module, optimizers: list[torch.optim.Optimizer]) -> tuple[dict, list[dict]]:
    """(model state dict, each optimizer's state dict), whole, as an unsharded model gives them. Under FSDP
    every rank joins the gathers and rank 0 alone receives them, in CPU memory; the others get empty dicts."""
    if not is_sharded(model):
        return model.state_dict(), [optimizer.state_dict() for optimizer in optimizers]
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options), [gathered(optimizer) for optimizer in optimizers]


def gathered(optimizer: torch.optim.Optimizer) -> dict:
    """Optimizer.state_dict with every shard (AdamW's moments, Muon's momentum) gathered whole, one tensor at a
    time, to rank 0's CPU memory: the numbered layout of an unsharded optimizer. (torch's
    get_optimizer_state_dict keys the state by parameter name instead, and its name lookup fails for an
    optimizer that holds only some of the model's parameters, as Muon's AdamW does.)"""
    state = optimizer.state_dict()
    main = torch.distributed.get_rank() == 0

    def kept(value):  # every rank joins each gather; only rank 0 copies the result out and keeps it
        full = whole(value)
        return full.cpu() if main else None

    whole_state = {index: {key: kept(value) if isinstance(value, DTensor) else value
                           for key, value in entries.items()} for index, entries in state["state"].items()}
    return {**state, "state": whole_state} if main else {}


def load_full_state(model: nn.Module, optimizers: list[torch.optim.Optimizer], model_state: dict,
                    optimizer_states: list[dict]) -> None:
    """Put whole state dicts (every rank has read the checkpoint) back; under FSDP each rank keeps its shard."""
    if is_sharded(model):
        set_model_state_dict(model, model_state, options=StateDictOptions(full_state_dict=True))
    else:
        model.load_state_dict(model_state)
    for optimizer, state in zip(optimizers, optimizer_states):
        optimizer.load_state_dict(sharded_like(optimizer, state))


def sharded_like(optimizer: torch.optim.Optimizer, state: dict) -> dict:
    """A whole optimizer state dict cut to the shards of the optimizer's parameters: every tensor shaped like
    its parameter (moments, momentum) keeps this rank's slice; scalars (AdamW's step) stay as they are."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    cut = {index: {key: like(value.to(params[index].device), params[index])
                   if isinstance(value, torch.Tensor) and value.shape == params[index].shape else value
                   for key, value in entries.items()} for index, entries in state["state"].items()}
    return {**state, "state": cut}
