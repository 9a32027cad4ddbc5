"""What FSDP's extras cost (nbgpt.distributed), on 2 gloo processes of this CPU:

- a training step with Muon against one with AdamW, both sharded: Muon all-gathers every block matrix's
  update direction to orthogonalise it whole, AdamW works on its shards alone;
- a checkpoint: gathering the whole model and optimizer state to rank 0 and serialising it, per parameter,
  from which the cost at GPT-3 XL's size is extrapolated.

    python -m torch.distributed.run --standalone --nproc_per_node=2 bench/fsdp_cost.py
"""

from __future__ import annotations

import io
import os

import common  # noqa: F401  (puts the repository on sys.path)
import torch
import torch.distributed as dist

from common import median_time, report
from nbgpt.model import GPT, GPTConfig
from nbgpt.distributed import full_state, shard
from nbgpt.run_config import TrainConfig
from nbgpt.train_setup import build_optimizers

SHAPE = dict(n_layer=4, n_head=8, n_embd=512, block_size=128, vocab_size=8192)
BATCH = 8  # sequences per step per rank


def sharded_trainer(optimizer: str):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**SHAPE))
    shard(model, "fp32")
    optimizers = build_optimizers(model, TrainConfig(optimizer=optimizer), "cpu")
    x = torch.randint(0, SHAPE["vocab_size"], (BATCH, SHAPE["block_size"]))

    def step() -> None:
        model(x, x)[1].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)

    return model, optimizers, step


def main() -> None:
    dist.init_process_group("gloo")
    rows = []
    for optimizer in ("adamw", "muon"):
        model, optimizers, step = sharded_trainer(optimizer)
        seconds, _ = median_time(step, repeats=5, warmup=2)
        rows.append({"what": f"fsdp step, {optimizer}", "seconds": seconds})
    params = sum(p.numel() for p in model.parameters())

    def checkpoint() -> None:
        model_state, optimizer_states = full_state(model, optimizers)
        if dist.get_rank() == 0:
            torch.save({"model": model_state, "optimizer": optimizer_states}, io.BytesIO())

    seconds, _ = median_time(checkpoint, repeats=3, warmup=1)
    rows.append({"what": "checkpoint gather + serialise (muon)", "seconds": seconds,
                 "us_per_parameter": seconds / params * 1e6})
    if dist.get_rank() == 0:
        report("fsdp_cost", rows, {"shape": SHAPE, "batch": BATCH, "parameters": params,
                                   "world_size": dist.get_world_size(), "omp_threads": os.environ.get("OMP_NUM_THREADS")})
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
