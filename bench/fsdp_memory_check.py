"""The memory plan's FSDP pricing (nbgpt.memory.sharded) against the real peak of a two-rank gloo FSDP run on
this CPU.

The plan traces the step in one process (CPU autocast, as memory_check.py does) and prices one FSDP rank from
it; then torchrun starts 2 processes of nbgpt's Trainer with parallel="fsdp" and the same shapes, each taking
two optimizer steps of two micro-steps (gradient sync off for the first: the accumulating path). Each rank's
real peak is its resident-memory high-water mark less its resident memory just before the first step, plus the
weights shard it already held, as memory_check.py measures a single process.

Usage: python bench/fsdp_memory_check.py [--configs adamw-fp32 muon-fp32]
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
from memory_check import COMMON

from nbgpt.memory import GIB, rank_share, sharded, trace
from nbgpt.run_config import PrepareConfig
from nbgpt.shards import TokenStore
from nbgpt.run_config import TrainConfig

RANKS = 2
# memory_check.py's shapes; the same 2 micro-steps of 16 sequences per rank, so twice its batch in all
SHAPES = {**COMMON, "total_batch_tokens": RANKS * COMMON["total_batch_tokens"], "parallel": "fsdp"}
# and a wide model at 2 sequences per micro-step, where the training state (what FSDP shards) outweighs activations
WIDE = dict(n_embd=768, n_head=6, micro_batch=2, total_batch_tokens=RANKS * 2 * 2 * 256)
CONFIGS = {"adamw-fp32": dict(optimizer="adamw", precision="fp32"), "muon-fp32": dict(optimizer="muon", precision="fp32"),
           "adamw-fp32-wide": dict(optimizer="adamw", precision="fp32", **WIDE)}

CHILD = r"""
import json, os, resource, sys
from nbgpt.train import Trainer
from nbgpt.run_config import TrainConfig
trainer = Trainer(TrainConfig.from_dict(json.loads(sys.argv[1])), echo=lambda line: None)
resident = lambda: int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
local = lambda p: p.to_local() if hasattr(p, "to_local") else p
weights = sum(local(p).numel() * p.element_size() for p in trainer.model.parameters())
before = resident()
for _ in range(2):
    trainer.train_step()
high = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print("PEAK " + json.dumps({"rank": int(os.environ["RANK"]), "peak": high - before + weights}), flush=True)
trainer.close()
"""


def real_peaks(values: dict, work: Path) -> list[int]:
    """Each rank's measured peak bytes over two FSDP training steps."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(64 * 1024), "OMP_NUM_THREADS": "1"}
    script = work / "child.py"
    script.write_text(CHILD)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={RANKS}",
                             str(script), json.dumps(values)], capture_output=True, text=True, cwd=ROOT, check=True,
                            timeout=900, env=env)
    return [json.loads(line[5:])["peak"] for line in result.stdout.splitlines() if line.startswith("PEAK ")]


def predicted_peaks(values: dict) -> tuple[int, int]:
    """The plan's training-step peak (bytes) for one FSDP rank, traced as this CPU runs the step, and for one
    DDP rank (a whole replica) of the same run, for comparison."""
    train = TrainConfig.from_dict(values)
    config = train.model_config(TokenStore(values["data_dir"]).tokenizer().vocab_size)
    seq_len, accumulation = train.batch_layout(config.block_size, RANKS)
    whole = trace(train, config, train.precision, seq_len, target="cpu")
    traced = sharded(whole, rank_share(config, train.precision, RANKS, train.optimizer), accumulation > 1)
    peak = lambda t: max(t.train(train.micro_batch), t.optimizer)  # noqa: E731
    return peak(traced), peak(whole)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=list(CONFIGS))
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as work:
        data = Path(work) / "data"
        PrepareConfig(source="shakespeare", tokenizer="char", max_tokens=1_000_000).run(data, progress=False)
        for name in args.configs:
            values = {**SHAPES, **CONFIGS[name], "data_dir": str(data), "out_dir": str(Path(work) / name)}
            (predicted, replica), peaks = predicted_peaks(values), real_peaks(values, Path(work))
            rows.append({"config": name, "predicted_gib": round(predicted / GIB, 3), "ddp_gib": round(replica / GIB, 3),
                         "measured_gib_per_rank": [round(peak / GIB, 3) for peak in peaks],
                         "ratio": round(predicted / max(peaks), 3)})
    report("fsdp_memory_check", rows, {"shapes": SHAPES, "ranks": RANKS})
    return 0


if __name__ == "__main__":
    sys.exit(main())
