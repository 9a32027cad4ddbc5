"""Training throughput levers on the CPU: precision (fp32/bf16), eager vs torch.compile, model shape, optimizer.

Tokens/s and MFU of full optimizer steps (forward, backward, AdamW or Muon) on char-level tiny-shakespeare;
MFU is against the measured matmul peak of the same precision (bench/RESULTS.md lists both peaks).
Usage: python bench/cpu_train_throughput.py [--steps 15] [--batch 32] [--data input.txt]
"""

import argparse
import statistics
import tempfile
import time

import torch
from common import ROOT, cpu_precisions, report

from nbgpt.device import measured_matmul_flops
from nbgpt.shards import prepare
from nbgpt.train import Trainer
from nbgpt.run_config import TrainConfig

SHAPES = {
    "cpu-char (4x128, T=64)": dict(model="cpu-char", block_size=64),
    "cpu-char (4x128, T=64), Muon": dict(model="cpu-char", block_size=64, optimizer="muon"),
    "mini (4x128, T=128)": dict(model="mini"),
    "small-char (4x256, T=128, rope)": dict(model="small-char"),
    "6x384 (T=256, nanoGPT baby GPT)": dict(model="small", n_layer=6, n_embd=384, n_head=6, block_size=256),
}


def measure(data_dir: str, shape: dict, precision: str, compile_model: bool, batch: int, steps: int) -> dict:
    with tempfile.TemporaryDirectory() as out:
        config = TrainConfig.from_dict(dict(
            data_dir=data_dir, out_dir=out, precision=precision, compile=compile_model, micro_batch=batch,
            total_batch_tokens=batch * shape.get("block_size", 128), max_steps=10_000, warmup_steps=10,
            eval_interval=0, checkpoint_interval=0, progress=False, **shape))
        trainer = Trainer(config)
        for _ in range(3):  # warmup (and compilation)
            trainer.train_step()
        times = [trainer.train_step()["dt"] for _ in range(steps)]
        trainer.close()
    step = statistics.median(times)
    tokens_per_s = config.total_batch_tokens / step
    return {"tokens_per_s": tokens_per_s, "flops_per_token": trainer.flops_per_token,
            "mfu": tokens_per_s * trainer.flops_per_token / measured_matmul_flops("cpu", precision),
            "params": trainer.model.num_params()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    work = tempfile.mkdtemp()
    prepare(args.data, "char", f"{work}/ds", val_fraction=0.1, progress=False)
    rows = []
    for name, shape in SHAPES.items():
        for precision in cpu_precisions():
            for compiled in (False, True):
                start = time.perf_counter()
                result = measure(f"{work}/ds", shape, precision, compiled, args.batch, args.steps)
                rows.append({"model": name, "precision": precision, "compile": compiled,
                             "params": result["params"], "tokens_per_s": result["tokens_per_s"],
                             "mfu": result["mfu"], "bench_s": time.perf_counter() - start})
    report("cpu_train_throughput", rows, {f"peak_{p}": measured_matmul_flops("cpu", p) for p in cpu_precisions()})


if __name__ == "__main__":
    main()
