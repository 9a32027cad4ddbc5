"""Train each TrainConfig JSON file named on the command line (FILE@N: only up to step N), one after another,
in this process: run by torchrun, several small runs share one start-up of its workers (tests/test_distributed.py).

A Trainer leaves the process group when it closes, and torchrun's rendezvous serves one group per worker:
here the group is left once, after the last run."""

import gc
import json
import sys

import torch

import nbgpt.train
from nbgpt.distributed import shutdown
from nbgpt.train import Trainer
from nbgpt.run_config import TrainConfig

nbgpt.train.shutdown = lambda info: None
for argument in sys.argv[1:]:
    path, _, until = argument.partition("@")  # config.json@N: stop at step N with a checkpoint, as if preempted
    with open(path) as f:
        trainer = Trainer(TrainConfig.from_dict(json.load(f)), echo=lambda line: None)
    trainer.fit(until=int(until) if until else None)
    trainer.close()
torch.distributed.barrier()  # no rank leaves the group while another still uses it
shutdown(trainer.dist)
del trainer  # freed before the interpreter's exit, as `nbgpt train` does (nbgpt/cli.py)
gc.collect()
