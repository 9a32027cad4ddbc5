"""One code path for 1 or N processes: torchrun's environment decides, a launcher starts it from a notebook;
DDP replicates the model on every rank, FSDP (below) shards it.

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE. With them, each process joins a process group (NCCL on GPUs,
gloo on CPU) and drives one device; without them this is a plain single process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Replicate

from .device import DTYPES
from .errors import NbgptError
from .files import RunLock
from .stop import StopSignals, TrainingStopped


class WorkersFailed(NbgptError):
    """torchrun's workers ended with an error (theirs is in the output above this one)."""


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_type: str) -> DistInfo:
    """Join torchrun's process group if launched by torchrun; otherwise a world of one."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ["WORLD_SIZE"]))
    if not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return info


def all_reduce_mean(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Average a tensor over ranks (gloo has no AVG op, so SUM then divide)."""
    if info.enabled:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= info.world_size
    return value


def all_reduce_sum(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def all_reduce_max(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value


def agreed_max(value: int, device: torch.device, info: DistInfo) -> int:
    """The largest of every rank's `value` (a count, a flag), so that all ranks take the same decision;
    -agreed_max(-value) is the smallest."""
    return int(all_reduce_max(torch.tensor(value, device=device), info).item())


def all_gather_objects(value, info: DistInfo) -> list:
    """Every rank's `value` (small, picklable), listed by rank; [value] in a world of one."""
    if not info.enabled:
        return [value]
    gathered = [None] * info.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def torchrun_command(nproc: int, module_args: list[str], nnodes: int = 1, node_rank: int = 0,
                     master_addr: str | None = None, master_port: int = 29500) -> list[str]:
    """`python -m torch.distributed.run ... -m nbgpt ...` for one node (standalone) or several."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
    if nnodes == 1:
        cmd.append("--standalone")
    else:  # every node runs the same command with its own node_rank; node 0's address is the rendezvous
        cmd += [f"--nnodes={nnodes}", f"--node_rank={node_rank}", f"--master_addr={master_addr}",
                f"--master_port={master_port}"]
    return cmd + ["-m", "nbgpt"] + module_args


def worker_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The environment of torchrun and its workers: this process's, with unbuffered output and, unless the
    user chose allocator settings, expandable segments. The CUDA caching allocator then grows a segment in
    place instead of reserving new fixed-size blocks, so memory freed by one phase (training, evaluation,
    HellaSwag, sampling use differently shaped tensors) serves the next rather than staying fragmented."""
    env = {**environ, "PYTHONUNBUFFERED": "1"}
    if "PYTORCH_CUDA_ALLOC_CONF" not in env and "PYTORCH_ALLOC_CONF" not in env:  # the latter: torch's newer name
        env["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    return env


def held_gpu_memory_warning() -> str | None:
    """A line for a launcher whose own process holds GPU memory (a notebook kernel that ran CUDA work): the
    workers cannot use what it keeps reserved. None when it holds none (or has no GPU)."""
    if not torch.cuda.is_available():
        return None
    held = sum(torch.cuda.memory_reserved(i) for i in range(torch.cuda.device_count()))  # no CUDA start-up
    if not held:
        return None
    return (f"warning: this process holds {held / 2**30:.2f} GiB of GPU memory that the training processes "
            f"cannot use; delete its models and tensors and call torch.cuda.empty_cache(), or restart the kernel")


def _stream(process: subprocess.Popen, stop: StopSignals, echo) -> int | None:
    """Echo torchrun's output until it ends; the signal that stopped the workers, if one did: sent here (and
    passed on), or to a worker directly, which then says so in its stop line (TrainingStopped.by_signal)."""
    signum, quiet = None, False
    for line in process.stdout:
        signum = stop.signum or signum or TrainingStopped.signal_in(line)
        # After a stop, torchrun ends with a traceback of its own (a SignalException, or its workers' exit
        # status 128 + signal): noise, since the workers have checkpointed and said so; it is read (so torchrun
        # never blocks on a full pipe) but not echoed.
        quiet = quiet or (signum is not None and line.startswith("Traceback"))
        if not quiet:
            echo(line.rstrip("\n"))
    return stop.signum or signum


def launch(config, nproc: int, echo=print, **node) -> int:
    """Train `config` (a TrainConfig) on `nproc` processes of this machine via torchrun, streaming output.

    From a notebook this is how a 2×T4 Kaggle box trains on both GPUs: the kernel stays a single process and
    torchrun's workers, admitted to the run directory this launcher locks, run beside it. SIGTERM/SIGINT are
    passed on to the workers, which stop together with a checkpoint; this then raises TrainingStopped, as it
    does when a signal reached one worker alone (a scheduler's, or `kill` on its pid)
    Raises WorkersFailed if the workers fail. GPU memory this process holds, the workers lack: it says so first."""
    if (warning := held_gpu_memory_warning()) is not None:
        echo(warning)
    with RunLock(config.out_dir):
        with tempfile.NamedTemporaryFile("w", suffix=".json", dir=config.out_dir, delete=False) as f:
            json.dump(asdict(config), f)
            config_file = f.name
        cmd = torchrun_command(nproc, ["train", "--config-json", config_file], **node)
        try:
            # Its own session: a Ctrl-C in a terminal or a Jupyter interrupt reaches torchrun once, from here,
            # not twice (directly and forwarded), which torchrun would take as "kill the workers now".
            process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                       env=worker_environment(os.environ), start_new_session=True)
            with StopSignals(forward=process.send_signal) as stop:
                signum = _stream(process, stop, echo)
                code = process.wait()
        finally:
            os.unlink(config_file)
    if signum is not None:
        raise TrainingStopped.by_signal(signum, Path(config.out_dir) / "checkpoints")
    if code != 0:
        raise WorkersFailed(f"torchrun with {nproc} processes exited with code {code} (the workers' errors are "
                            f"above): {' '.join(cmd)}")
    return code


# Fully sharded data parallel training (torch's FSDP2, `fully_shard`): each rank keeps 1/N of the weights,
# gradients and optimizer state instead of all of it.
#
# Under DDP every GPU holds the whole model, its gradients and AdamW's two moments: 16 bytes per parameter in
# fp32, ~20 GiB for GPT-3 XL (1.3B) before any activation. `fully_shard` turns every parameter into a DTensor
# sharded along its first dimension over the ranks; each transformer block gathers its weights just before it
# runs (forward and backward) and frees them after, and gradients are reduce-scattered, so each rank ends a
# step with the gradient of its own shard only. Per rank that is 16/N bytes per parameter, plus one block's
# gathered weights at a time and whatever the root module (embeddings, final LayerNorm, head) holds while it runs.
#
# Checkpoints stay what they are without sharding: full state dicts gathered to rank 0 (torch's
# `get_model_state_dict`, and the optimizers' shards gathered one tensor at a time, to its CPU memory), written
# as one verified file. So a run saved under FSDP resumes on any number of processes, under DDP or FSDP, and
# export, sample, eval and the panel read it like any other. torch's distributed checkpoint format was not
# used: its metadata file is a pickle, and nbgpt never unpickles what it loads.
#
# Mid-training samples and HellaSwag run through the sharded model itself, on every rank: each forward pass
# gathers weights from all ranks, so every rank must run the same passes in the same order (a rank that skips
# one leaves the others waiting in its gather for ever). Sampling keeps every rank in step by decoding the same
# rows with rank 0's tokens (from_rank_zero); HellaSwag's ranks score their own examples and pad with dummy
# batches up to the most any rank has (most_on_any_rank).


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
