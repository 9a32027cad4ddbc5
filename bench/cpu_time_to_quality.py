"""Time to quality on a 2-core CPU: char-level tiny-shakespeare, nanoGPT's 90/10 split.

Goal: validation loss <= 1.70 within 100 s of wall time, counted from this process's start (the kernel's
record of it, so interpreter start-up and imports count) to the end of the final evaluation, which covers
the whole validation split. Training gets whatever the budget leaves and fits its cosine schedule to it.
Usage: python bench/cpu_time_to_quality.py [--recipe demo|nanogpt] [--budget 100] [--set key=value ...] [--runs 3]

--recipe demo (default) trains with the `cpu-demo` preset's model and schedule, precision and batch as
`cpu_settings` picks them for this CPU. --recipe nanogpt is nanoGPT's CPU recipe for shakespeare_char, rebuilt on
nbgpt's model: 4 layers × 128, 4 heads, context 64, batch 12, no dropout, AdamW at 1e-3 (warm-up 100, cosine
to 1e-4 at 2,000 iterations, beta2 0.99), fp32, 2,000 iterations whatever the time they take.
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

# The cpu-demo preset's model and schedule (see bench/RESULTS.md); precision and batch come from cpu_settings.
DEMO = dict(model="cpu-char", optimizer="muon", max_lr=1e-2, min_lr_ratio=0.0, warmup_steps=30, weight_decay=0.1)
NANOGPT = dict(model="cpu-char", n_layer=4, n_head=4, n_embd=128, block_size=64, dropout=0.0, micro_batch=12,
               total_batch_tokens=12 * 64, optimizer="adamw", max_lr=1e-3, min_lr_ratio=0.1, warmup_steps=100,
               beta2=0.99, weight_decay=0.1, precision="fp32", max_steps=2000)


def recipe_settings(recipe: str) -> dict:
    """TrainConfig fields of `recipe` on this machine (measured here, in the process that trains)."""
    from nbgpt.presets import cpu_settings

    common = dict(eval_interval=200, eval_batches=4, final_eval_batches=0)
    if recipe == "nanogpt":
        return {**common, **NANOGPT}
    return {**common, **DEMO, **cpu_settings()}


def one_run(budget: float, settings: dict, data: str, threads: int) -> dict:
    import torch

    from nbgpt.metrics import read_metrics
    from nbgpt.shards import prepare
    from nbgpt.train import Trainer
    from nbgpt.run_config import TrainConfig

    torch.set_num_threads(threads)
    work = tempfile.mkdtemp()
    prepare(data, "char", f"{work}/ds", val_fraction=0.1, progress=False)
    final_eval_reserve = 4.0  # seconds kept for the final full-split evaluation
    remaining = budget - (time.time() - STARTED) - final_eval_reserve
    if "max_steps" not in settings:  # a fixed number of steps (nanoGPT) or whatever the budget allows
        settings = dict(settings, max_steps=1_000_000, max_seconds=remaining)
    config = TrainConfig.from_dict(dict(data_dir=f"{work}/ds", out_dir=f"{work}/run", checkpoint_interval=0,
                                        progress=False, seed=1337, **settings))
    trainer = Trainer(config)
    summary = trainer.fit()
    wall = time.time() - STARTED
    train = read_metrics(f"{work}/run", "train")
    return {"wall_s": wall, "steps": summary["step"], "val_loss": summary["val_loss"], "settings": settings,
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in train),
            "curve": [(r["step"], round(r["val_loss"], 4)) for r in read_metrics(f"{work}/run", "eval")]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--recipe", choices=("demo", "nanogpt"), default="demo")
    parser.add_argument("--budget", type=float, default=100.0)
    parser.add_argument("--set", nargs="*", default=[], help="TrainConfig overrides, key=value")
    parser.add_argument("--runs", type=int, default=1, help="fresh processes to run (the median is reported)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        try:
            overrides[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            overrides[key] = value
    if args.child:
        settings = {**recipe_settings(args.recipe), **overrides}
        print("RESULT " + json.dumps(one_run(args.budget, settings, args.data, args.threads)))
        return
    rows = []
    for _ in range(args.runs):  # each run in a fresh process, so its start-up is counted too
        cmd = [sys.executable, __file__, "--child", "--recipe", args.recipe, "--budget", str(args.budget),
               "--threads", str(args.threads), "--data", args.data, "--set", *args.set]
        output = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(next(line[7:] for line in output.splitlines() if line.startswith("RESULT "))))
    for row in rows:
        print(f"wall {row['wall_s']:.1f} s · steps {row['steps']} · {row['tokens_per_s']:,.0f} tokens/s · "
              f"final val {row['val_loss']:.4f} · curve {row['curve']}")
    median = sorted(rows, key=lambda r: r["val_loss"])[len(rows) // 2]
    report(f"cpu_time_to_quality-{args.recipe}", [{k: v for k, v in r.items() if k not in ("curve", "settings")}
                                                  for r in rows],
           {"recipe": args.recipe, "settings": rows[0]["settings"], "budget_s": args.budget, "median_val_loss": median["val_loss"],
            "median_wall_s": statistics.median(r["wall_s"] for r in rows), "curves": [r["curve"] for r in rows]})


if __name__ == "__main__":
    main()
