"""Run by torchrun from tests/test_distributed.py: for each TrainConfig JSON file (fp16, parallel="fsdp"), two
steps, then one in which rank 0 alone finds an inf in its shard of one gradient (a hook FSDP calls once the
reduce-scatter has written the shard). Writes, per config, whether that step was skipped, whether any rank's
parameters moved, and every rank's loss scale before and after, to the JSON file named last."""

import gc
import json
import sys

import torch

import nbgpt.train
from nbgpt.distributed import all_gather_objects, shutdown
from nbgpt.train import Trainer
from nbgpt.run_config import TrainConfig

nbgpt.train.shutdown = lambda info: None  # one process group for all the configs (see tests/train_each.py)
results = []
for path in sys.argv[1:-1]:
    with open(path) as f:
        trainer = Trainer(TrainConfig.from_dict(json.load(f)), echo=lambda line: None)
    trainer.train_step()
    trainer.train_step()
    before = [p.detach().to_local().clone() for p in trainer.model.parameters()]
    scale = trainer.scaler.get_scale()
    if trainer.dist.rank == 0:
        poison = trainer.model.get_parameter("h.0.mlp.c_fc.weight")
        handle = poison.register_post_accumulate_grad_hook(lambda p: p.grad.to_local()[0, 0].fill_(float("inf")))
    record = trainer.train_step()
    if trainer.dist.rank == 0:
        handle.remove()
    moved = any(not torch.equal(p.detach().to_local(), b) for p, b in zip(trainer.model.parameters(), before))
    results.append({"skipped": record["skipped"], "moved": all_gather_objects(moved, trainer.dist),
                    "scales": all_gather_objects((scale, trainer.scaler.get_scale()), trainer.dist),
                    "next_skipped": trainer.train_step()["skipped"]})
    trainer.close()
if trainer.dist.rank == 0:
    with open(sys.argv[-1], "w") as f:
        json.dump(results, f)
torch.distributed.barrier()  # no rank leaves the group while another still uses it
shutdown(trainer.dist)
del trainer  # freed before the interpreter's exit, as `nbgpt train` does (nbgpt/cli.py)
gc.collect()
