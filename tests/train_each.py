"""Train each TrainConfig JSON file named on the command line, one after another, in this process: run by
torchrun, several small runs share one start-up of its workers (see tests/test_sharding.py).

A Trainer leaves the process group when it closes, and torchrun's rendezvous serves one group per worker:
here the group is left once, after the last run."""

import json
import sys

import torch

import nbgpt.train
from nbgpt.distributed import shutdown
from nbgpt.train import TrainConfig, Trainer

nbgpt.train.shutdown = lambda info: None
for path in sys.argv[1:]:
    with open(path) as f:
        trainer = Trainer(TrainConfig.from_dict(json.load(f)), echo=lambda line: None)
    trainer.fit()
    trainer.close()
torch.distributed.barrier()  # no rank leaves the group while another still uses it
shutdown(trainer.dist)
