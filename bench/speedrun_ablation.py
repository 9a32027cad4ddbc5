"""The speedrun recipe on the CPU, technique by technique (issue 19).

Shakespeare's complete works in GPT-2 tokens (the `shakespeare` source, last 5 % of tokens for validation), a
small GPT (4 layers × 256, 4 heads, context 128), one seed, the same data order, and the same wall-clock
training budget (`max_seconds`) for every row; each row is a fresh process (its start-up is counted in
`wall_s`), run under the bench lock, and ends with an evaluation over the whole validation split.

Rows: the GPT-2 recipe (AdamW, cosine, absolute positions, GELU, tied head) at each learning rate of
--gpt2-lrs; the full speedrun recipe; the speedrun recipe with one technique switched back at a time. Then the
token claim: the speedrun recipe with its own complete schedule on a fixed number of steps, --fractions of the
best GPT-2 row's tokens, against that row's final validation loss (not a mid-run evaluation of the
time-budgeted speedrun row, whose learning rate has not cooled down there).

With --reference-steps N the GPT-2 rows (and the full speedrun row) train N steps instead of the wall-clock
budget. Their results then do not depend on how busy the machine is (a loaded machine makes fewer steps in
the same seconds, which moved the reference by 0.7 nats between two seeds' runs): the token claim needs that.
The per-technique rows keep the wall-clock budget: equal time is what they compare.

The GPT-2 tokenizer's 50,257-row LM head dominates a step at this width (a 128-wide model is only ~30 % faster
per token), so the model is as wide as the budget comfortably allows.
Usage: python bench/speedrun_ablation.py [--budget 100] [--gpt2-lrs 1e-3 3e-3 6e-3] [--fractions 0.4] [--log rows.jsonl]
       [--seed 1337] [--techniques "QK-norm" "zero-init projections" ...]
"""

import os
import time

from cpu_time_to_quality import process_start_time

STARTED = process_start_time()

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from common import OUT, report  # noqa: E402

MODEL = dict(model="gpt2", n_layer=4, n_head=4, n_embd=256, block_size=128, vocab_multiple=64)
# Every row: 8 × 128 tokens per step, no evaluation until the final one over the whole validation split, no
# checkpoints.
COMMON = dict(micro_batch=8, total_batch_tokens=8 * 128, eval_interval=0, final_eval_batches=0,
              checkpoint_interval=0, progress=False, seed=1337, precision="auto", shuffle=False, **MODEL)
# The recipe bundles live in nbgpt.run_config; the GPT-2 rows add a warm-up of 10 steps (~7 % of 150 steps;
# build-nanogpt's is 715 of 19,073) and change only the peak learning rate (a small sweep around GPT-2's
# 6e-4; its best row is the reference). The speedrun's bundle has no warm-up.
GPT2 = dict(recipe="gpt2", warmup_steps=10)
SPEEDRUN = dict(recipe="speedrun")
# Each technique switched back to GPT-2's choice, one at a time (user values beat the recipe's bundle).
WITHOUT = {  # in the order they are run: the ones expected to matter most first
    "Muon (AdamW instead)": dict(optimizer="adamw"),
    "untied head + softcap (tied, no cap)": dict(tie_embeddings=True, logit_softcap=0.0),
    "trapezoid (cosine)": dict(schedule="cosine"),
    "QK-norm": dict(qk_norm=False),
    "ReLU² (GELU)": dict(activation="gelu"),
    "rotary (absolute positions)": dict(position="absolute"),
    "zero-init projections": dict(zero_init_proj=False),
    "no warm-up (a 10-step warm-up instead)": dict(warmup_steps=10),
}


def prepare_data(work: Path) -> Path:
    from nbgpt.shards import prepare

    data = work / "shakespeare-gpt2"
    prepare("shakespeare", "gpt2", data, val_fraction=0.05, progress=False)  # reused when already built
    return data


def one_run(settings: dict, data: str, threads: int) -> dict:
    """Train one row in this (fresh) process and return its figures."""
    import tempfile

    import torch

    from nbgpt.metrics import read_metrics
    from nbgpt.train import Trainer
    from nbgpt.run_config import TrainConfig

    torch.set_num_threads(threads)
    load_start = os.getloadavg()[0]
    out = tempfile.mkdtemp(prefix="speedrun-ablation-")
    config = TrainConfig.from_dict(dict(data_dir=data, out_dir=out, **settings))
    trainer = Trainer(config, echo=lambda _: None)
    summary = trainer.fit()
    trainer.close()
    train = read_metrics(out, "train")
    shutil.rmtree(out, ignore_errors=True)
    steps = summary["step"]
    return {"steps": steps, "tokens": steps * config.total_batch_tokens, "max_lr": config.max_lr,
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in train[1:] or train),
            "train_s": sum(r["dt"] for r in train), "val_loss": summary["val_loss"], "wall_s": time.time() - STARTED,
            "precision": trainer.precision, "load": f"{load_start:.1f} → {os.getloadavg()[0]:.1f}"}


def run_row(name: str, settings: dict, args) -> dict:
    """One row in a fresh process (run the bench alone on the machine: other work skews the budget). A row already
    in --log (a JSON line per row, as this prints them) with the same name, settings and recipe bundle (the
    values `recipe` expands to, which change as the recipe is tuned) is read back instead."""
    from nbgpt.run_config import RECIPES

    bundle = RECIPES[settings["recipe"]]
    for line in args.log.read_text().splitlines() if args.log and args.log.is_file() else []:
        known = json.loads(line) if line.startswith('{"row"') else {}
        if (known.get("row"), known.get("settings"), known.get("bundle")) == (name, settings, bundle):
            return known
    cmd = [sys.executable, __file__, "--child", json.dumps(settings), "--data", str(args.data),
           "--threads", str(args.threads)]
    output = subprocess.run(cmd, capture_output=True, text=True)
    if output.returncode:
        raise SystemExit(f"row {name!r} failed:\n{output.stderr[-3000:]}")
    row = {"row": name, **json.loads(next(line[7:] for line in output.stdout.splitlines() if line.startswith("RESULT "))),
           "settings": settings, "bundle": bundle}
    print(json.dumps(row), flush=True)
    if args.log:
        with open(args.log, "a") as log:
            log.write(json.dumps(row) + "\n")
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budget", type=float, default=100.0, help="training seconds of every time-budgeted row")
    parser.add_argument("--gpt2-lrs", type=float, nargs="+", default=[1e-3, 3e-3, 6e-3])
    parser.add_argument("--adamw-lr", type=float, default=None, help="the no-Muon row's LR (default: GPT-2's best)")
    parser.add_argument("--fractions", type=float, nargs="*", default=[0.4], help="token budgets, of GPT-2's")
    parser.add_argument("--claim-without", nargs="*", choices=sorted(WITHOUT), default=[],
                        help="also run each token-claim row with these techniques switched back, one at a time")
    parser.add_argument("--reference-steps", type=int, default=None,
                        help="train the GPT-2 rows and the full speedrun row this many steps, not --budget seconds")
    parser.add_argument("--skip-ablations", action="store_true", help="only the GPT-2 rows, full and token rows")
    parser.add_argument("--techniques", nargs="*", choices=sorted(WITHOUT), default=list(WITHOUT),
                        help="which techniques to switch off, one row each (default: all)")
    parser.add_argument("--seed", type=int, default=COMMON["seed"], help="initialisation seed of every row")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--log", type=Path, default=None, help="append each row here; rows found in it are reused")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print("RESULT " + json.dumps(one_run(json.loads(args.child), str(args.data), args.threads)))
        return
    args.data = args.data or prepare_data(OUT / "speedrun_ablation")
    common = dict(COMMON, seed=args.seed)
    timed = dict(common, max_steps=1_000_000, max_seconds=args.budget)
    rows, gpt2, claims = token_claim(args, common, timed)
    if not args.skip_ablations:  # after the token claim: on a shared machine these may not all fit the time
        # Without --reference-steps the full speedrun row of the token claim ran on the wall-clock budget.
        full = None if args.reference_steps else next(r for r in rows if r["row"].startswith("speedrun recipe"))
        rows += ablations(args, timed, gpt2, full)
    rows = [{**{k: v for k, v in row.items() if k != "settings"}, "seed": row["settings"]["seed"]} for row in rows]
    report("speedrun_ablation", rows, {"budget_s": args.budget, "reference_steps": args.reference_steps,
                                       "model": MODEL, "common": common, "gpt2_reference": gpt2["row"],
                                       "token_claims": claims})


def token_claim(args, common: dict, timed: dict) -> tuple[list[dict], dict, list[dict]]:
    """The GPT-2 rows, the full speedrun row on the same budget, and the speedrun on --fractions of the best
    GPT-2 row's tokens: (rows, the best GPT-2 row, one claim per fraction)."""
    reference, suffix = timed, ""
    if args.reference_steps:
        reference, suffix = dict(common, max_steps=args.reference_steps), f", {args.reference_steps} steps"
    rows = [run_row(f"GPT-2 recipe, AdamW {lr:g}{suffix}", dict(reference, **GPT2, max_lr=lr), args)
            for lr in args.gpt2_lrs]
    gpt2 = min(rows, key=lambda r: r["val_loss"])
    full = run_row(f"speedrun recipe (all techniques){suffix}", dict(reference, **SPEEDRUN), args)
    rows.append(full)
    for row in rows:
        row["delta_vs_full"] = row["val_loss"] - full["val_loss"]
    claims = []
    for fraction in args.fractions:
        steps = max(1, round(fraction * gpt2["steps"]))
        row = run_row(f"speedrun, complete schedule, {fraction:.0%} of GPT-2's tokens",
                      dict(common, **SPEEDRUN, max_steps=steps), args)
        rows.append(row)
        claims.append({"fraction": row["tokens"] / gpt2["tokens"], "speedrun_val_loss": row["val_loss"],
                       "gpt2_val_loss": gpt2["val_loss"], "met": row["val_loss"] <= gpt2["val_loss"]})
        for technique in args.claim_without:  # the same tokens without one technique: what each is worth here
            switch = dict(WITHOUT[technique], max_steps=steps)
            if switch.get("optimizer") == "adamw":
                switch["max_lr"] = args.adamw_lr or gpt2["max_lr"]
            without = run_row(f"speedrun − {technique}, {fraction:.0%} of GPT-2's tokens",
                              dict(common, **SPEEDRUN, **switch), args)
            rows.append({**without, "delta_vs_claim": without["val_loss"] - row["val_loss"]})
    return rows, gpt2, claims


def ablations(args, timed: dict, gpt2: dict, full: dict | None) -> list[dict]:
    """One row per technique switched back, on the wall-clock budget, each with its difference from the full
    speedrun recipe on that budget: `full`, or run here first (and listed) when it is None."""
    rows = []
    if full is None:
        full = run_row("speedrun recipe (all techniques)", dict(timed, **SPEEDRUN), args)
        rows.append(full)
    adamw_lr = args.adamw_lr or gpt2["max_lr"]
    for technique in args.techniques:
        switch = WITHOUT[technique]
        extra = dict(max_lr=adamw_lr) if switch.get("optimizer") == "adamw" else {}
        rows.append(run_row(f"speedrun − {technique}", dict(timed, **SPEEDRUN, **switch, **extra), args))
    for row in rows:
        row["delta_vs_full"] = row["val_loss"] - full["val_loss"]
    return rows

if __name__ == "__main__":
    main()
