"""The memory plan (nbgpt.memory) against the real peak of the real training step, on this CPU.

For each configuration, nbgpt.memory traces the training step on fake tensors as a CPU runs it (CPU autocast,
the CPU's attention path) and predicts its peak; then a fresh process builds nbgpt's Trainer with the same
configuration and takes two real optimizer steps of two micro-steps each. The real peak is that process's
resident-memory high-water mark (ru_maxrss) less its resident memory just before the first step, plus the
weights, which were resident already: everything the steps added (gradients, optimizer state, activations,
the kernels' own buffers and malloc's slack), with the weights the plan counts too.

Usage: python bench/memory_check.py [--configs adamw-fp32 muon-bf16 fp16-scaler]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ROOT, report

from nbgpt.memory import GIB, trace
from nbgpt.run_config import PrepareConfig
from nbgpt.shards import TokenStore
from nbgpt.run_config import TrainConfig

# Four layers of 256 over 256 characters, 16 sequences per micro-step: ~0.5 GiB of activations, big enough that
# the interpreter's own allocations are noise, small enough for seconds per step on 2 cores.
COMMON = dict(model="mini", n_layer=4, n_head=4, n_embd=256, block_size=256, micro_batch=16,
              total_batch_tokens=2 * 16 * 256, max_steps=2, warmup_steps=1, eval_interval=0, checkpoint_interval=0,
              progress=False)
CONFIGS = {
    "adamw-fp32": dict(optimizer="adamw", precision="fp32"),
    "muon-bf16": dict(optimizer="muon", precision="bf16"),
    "fp16-scaler": dict(optimizer="adamw", precision="fp16"),  # autocast fp16 + GradScaler, as on a T4
}

CHILD = r"""
import json, resource, sys
from nbgpt.train import Trainer
from nbgpt.run_config import TrainConfig
trainer = Trainer(TrainConfig.from_dict(json.loads(sys.argv[1])), echo=lambda line: None)
resident = lambda: int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
weights = sum(p.numel() * p.element_size() for p in trainer.model.parameters())
before = resident()
for _ in range(2):
    trainer.train_step()
high = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"peak": high - before + weights, "weights": weights}))
"""


def real_peak(values: dict) -> dict:
    """The measured peak bytes of two training steps, in a fresh process."""
    # A fixed mmap threshold: glibc then maps every block of 64 KiB or more on its own and unmaps it when freed,
    # so resident memory follows the live tensors (by default freed blocks up to 32 MiB stay in the heap).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}
    result = subprocess.run([sys.executable, "-c", CHILD, json.dumps(values)], capture_output=True, text=True,
                            cwd=ROOT, check=True, timeout=900, env=env)
    return json.loads(result.stdout.strip().splitlines()[-1])


def predicted_peak(values: dict) -> int:
    """The plan's training-step peak (bytes) for the same configuration, traced as this CPU runs it."""
    train = TrainConfig.from_dict(values)
    config = train.model_config(TokenStore(values["data_dir"]).tokenizer().vocab_size)
    seq_len, _ = train.batch_layout(config.block_size, 1)
    traced = trace(train, config, train.precision, seq_len, target="cpu")
    return max(traced.train(train.micro_batch), traced.optimizer)


def check(names: list[str], work: Path) -> list[dict]:
    data = work / "data"
    PrepareConfig(source="shakespeare", tokenizer="char", max_tokens=1_000_000).run(data, progress=False)
    rows = []
    for name in names:
        values = {**COMMON, **CONFIGS[name], "data_dir": str(data), "out_dir": str(work / name)}
        predicted, real = predicted_peak(values), real_peak(values)
        rows.append({"config": name, "predicted_gib": round(predicted / GIB, 3),
                     "measured_gib": round(real["peak"] / GIB, 3), "ratio": round(predicted / real["peak"], 3)})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=list(CONFIGS))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        rows = check(args.configs, Path(work))
    report("memory_check", rows, {"shapes": COMMON})
    return 0


if __name__ == "__main__":
    sys.exit(main())
