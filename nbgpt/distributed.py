"""One code path for 1 or N processes: torchrun's environment decides, a launcher starts it from a notebook.

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE. With them, each process joins a process group (NCCL on GPUs,
gloo on CPU) and drives one device; without them this is a plain single process.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from .runlock import RunLock
from .stop import StopSignals, TrainingStopped


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
        said = re.search(r"stopped by (SIG[A-Z]+) after step \d+ with a checkpoint", line)
        signum = stop.signum or signum or (signal.Signals[said.group(1)] if said else None)
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
    Raises RuntimeError if the workers fail. GPU memory this process holds, the workers lack: it says so first."""
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
        raise RuntimeError(f"torchrun with {nproc} processes exited with code {code}: {' '.join(cmd)}")
    return code
