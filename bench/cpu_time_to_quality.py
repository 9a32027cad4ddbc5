"""Time to quality on a 2-core CPU: char-level tiny-shakespeare, nanoGPT's 90/10 split.

Goal: validation loss <= 1.70 within 100 s of wall time, counted from this process's start (the kernel's
record of it, so interpreter start-up and imports count) to the end of the final evaluation, which covers
the whole validation split. Training gets whatever the budget leaves and fits its cosine schedule to it.
Usage: python bench/cpu_time_to_quality.py [--budget 100] [--set key=value ...] [--runs 3]
"""

import os
import time


def process_start_time() -> float:
    """Wall-clock time at which this process started, from /proc (falls back to now)."""
    try:
        ticks = os.sysconf("SC_CLK_TCK")
        start_ticks = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19])
        uptime = float(open("/proc/uptime").read().split()[0])
        return time.time() - uptime + start_ticks / ticks
    except (OSError, ValueError, IndexError):
        return time.time()


STARTED = process_start_time()

import argparse  # noqa: E402
import ast  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

from common import ROOT, report  # noqa: E402

# The winning settings (see bench/RESULTS.md); the cpu-demo preset uses the same model and schedule.
DEFAULTS = dict(model="cpu-char", micro_batch=32, total_batch_tokens=32 * 64, optimizer="muon", max_lr=1e-2,
                min_lr_ratio=0.0, warmup_steps=30, weight_decay=0.1, precision="bf16", eval_interval=200,
                eval_batches=4, final_eval_batches=0)


def one_run(budget: float, settings: dict, data: str, threads: int) -> dict:
    import torch

    from nbgpt.metrics import read_metrics
    from nbgpt.shards import prepare
    from nbgpt.train import TrainConfig, Trainer

    torch.set_num_threads(threads)
    work = tempfile.mkdtemp()
    prepare(data, "char", f"{work}/ds", val_fraction=0.1, progress=False)
    final_eval_reserve = 4.0  # seconds kept for the final full-split evaluation
    remaining = budget - (time.time() - STARTED) - final_eval_reserve
    config = TrainConfig.from_dict(dict(data_dir=f"{work}/ds", out_dir=f"{work}/run", max_steps=1_000_000,
                                        max_seconds=remaining, checkpoint_interval=0, progress=False, seed=1337,
                                        **settings))
    trainer = Trainer(config)
    summary = trainer.fit()
    wall = time.time() - STARTED
    train = read_metrics(f"{work}/run", "train")
    return {"wall_s": wall, "steps": summary["step"], "val_loss": summary["val_loss"],
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in train),
            "curve": [(r["step"], round(r["val_loss"], 4)) for r in read_metrics(f"{work}/run", "eval")]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budget", type=float, default=100.0)
    parser.add_argument("--set", nargs="*", default=[], help="TrainConfig overrides, key=value")
    parser.add_argument("--runs", type=int, default=1, help="fresh processes to run (the median is reported)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    settings = dict(DEFAULTS)
    for item in args.set:
        key, _, value = item.partition("=")
        try:
            settings[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            settings[key] = value
    if args.child:
        print("RESULT " + json.dumps(one_run(args.budget, settings, args.data, args.threads)))
        return
    rows = []
    for _ in range(args.runs):  # each run in a fresh process, so its start-up is counted too
        cmd = [sys.executable, __file__, "--child", "--budget", str(args.budget), "--threads", str(args.threads),
               "--data", args.data, "--set", *args.set]
        output = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(next(line[7:] for line in output.splitlines() if line.startswith("RESULT "))))
    for row in rows:
        print(f"wall {row['wall_s']:.1f} s · steps {row['steps']} · {row['tokens_per_s']:,.0f} tokens/s · "
              f"final val {row['val_loss']:.4f} · curve {row['curve']}")
    median = sorted(rows, key=lambda r: r["val_loss"])[len(rows) // 2]
    report("cpu_time_to_quality", [{k: v for k, v in r.items() if k != "curve"} for r in rows],
           {"settings": settings, "budget_s": args.budget, "median_val_loss": median["val_loss"],
            "median_wall_s": statistics.median(r["wall_s"] for r in rows), "curves": [r["curve"] for r in rows]})


if __name__ == "__main__":
    main()
