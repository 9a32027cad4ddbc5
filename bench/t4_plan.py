"""The Kaggle 2×T4 plan, computed: how many 12-hour sessions a token budget needs, and the disk it takes.

From a training throughput (tokens/s over both GPUs) it prints tokens per session, the sessions and GPU hours
a token budget needs against Kaggle's weekly quota, the size of the token shards (uint16: 2 bytes a token)
and of one checkpoint (fp32 weights + optimizer state) of the preset's model.

Where the throughput comes from, in order (each row of the report names it):
  --tokens-per-s       a figure you measured yourself, over both GPUs
  bench/out/gpu_check.json, section "speedrun", measured on a T4 by `make gpu-check` (one GPU: the plan
                       doubles it and takes off --ddp-loss for the gradient all-reduce over PCIe — a projection)
  otherwise            a PROJECTION: the T4's fp16 tensor-core peak (65 TFLOP/s, nbgpt.device.GPU_PEAK_FLOPS)
                       × an assumed MFU (--mfu, default 0.20) × 2 GPUs / the model's training FLOPs per token
Usage: python bench/t4_plan.py [--preset gpt2-124m-speedrun-t4x2] [--tokens 2.67e9] [--tokens-per-s N] [--mfu 0.2]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from common import OUT, report
from nbgpt.device import GPU_PEAK_FLOPS

SESSION_H = 12.0  # Kaggle's limit on one notebook session (README, "Kaggle 2×T4", for the sources)
WEEKLY_H = 30.0  # Kaggle's weekly GPU quota, as the issue and Kaggle users report it
SESSION_OVERHEAD_H = 0.25  # assumed: start-up, pip install, copying checkpoints back in, evaluations
GPU_PEAK = GPU_PEAK_FLOPS["Tesla T4"]["fp16"]  # the T4's fp16 tensor-core peak (NVIDIA's datasheet)
SAMPLE_TOKENS = 10e9  # FineWeb-Edu's sample-10BT: what `prepare` writes when a preset sets no max_tokens
# Tokens to 3.28 validation loss on FineWeb in the modded-nanogpt speedrun, for the records whose techniques
# nbgpt's speedrun recipe shares (the README of KellerJordan/modded-nanogpt at each record, October 2024):
# records 5-7 (Muon, rotary, QK-norm, ReLU², zero-init projections): 5,100 steps × 524,288 tokens;
# record 8 (+ untied head): 4,768 steps; llm.c's AdamW baseline: 10 B tokens (build-nanogpt: 19,073 steps).
PUBLISHED_TOKENS = {"speedrun records 5-7": 5100 * 524_288, "speedrun record 8": 4768 * 524_288,
                    "GPT-2 recipe (build-nanogpt)": 19_073 * 524_288}


def preset_run(preset: str):
    from nbgpt.run_config import RunConfig

    return RunConfig.from_preset(preset)


def model_bytes(train) -> dict:
    """Parameters and checkpoint bytes of the preset's model, built on the meta device (no memory used).

    fp32 weights (autocast keeps the master copy in fp32); optimizer state: Muon keeps one momentum buffer per
    block matrix, AdamW two moments for every other parameter (all of them when the optimizer is AdamW)."""
    import torch

    from nbgpt.model import GPT

    with torch.device("meta"):
        model = GPT(train.model_config(vocab_size=50257))
    params = list(model.parameters())  # a tied head is counted once
    muon = {id(p) for p in model.get_submodule("h").parameters() if p.dim() == 2} if train.optimizer == "muon" else set()
    n_muon = sum(p.numel() for p in params if id(p) in muon)
    n_all = sum(p.numel() for p in params)
    state = n_muon + 2 * (n_all - n_muon)
    return {"params": n_all, "muon_params": n_muon, "weights_gb": 4 * n_all / 1e9, "optimizer_gb": 4 * state / 1e9,
            "checkpoint_gb": 4 * (n_all + state) / 1e9, "non_embedding": model.num_params(non_embedding=True)}


def throughput(args, flops: float, nproc: int) -> tuple[float, str]:
    """Tokens/s over all GPUs and where the figure comes from."""
    if args.tokens_per_s:
        return args.tokens_per_s, "MEASURED (given with --tokens-per-s)"
    check = Path(args.gpu_check)
    if check.is_file():
        payload = json.loads(check.read_text())
        device = payload.get("environment", {}).get("device", "")
        rows = [r for r in payload.get("sections", {}).get("speedrun", {}).get("rows", []) if "tokens_per_s" in r]
        if rows and "T4" in device:
            one = rows[0]["tokens_per_s"]
            return (one * nproc * (1 - args.ddp_loss),
                    f"PROJECTION from a MEASURED {one:,.0f} tokens/s on one {device} ({payload['environment']['date']}) "
                    f"× {nproc} GPUs − {args.ddp_loss:.0%} for DDP")
    peak = GPU_PEAK
    return (peak * args.mfu * nproc / flops,
            f"PROJECTION: T4 fp16 peak {peak / 1e12:.0f} TFLOP/s × assumed MFU {args.mfu:.0%} × {nproc} GPUs "
            f"/ {flops / 1e6:.0f} MFLOP per token (no T4 measurement yet)")


def plan(tokens: float, tokens_per_s: float) -> dict:
    train_h = tokens / tokens_per_s / 3600
    per_session = tokens_per_s * 3600 * (SESSION_H - SESSION_OVERHEAD_H)
    sessions = math.ceil(tokens / per_session)
    quota_h = train_h + sessions * SESSION_OVERHEAD_H
    return {"tokens": tokens, "train_hours": train_h, "tokens_per_session": per_session, "sessions": sessions,
            "quota_hours": quota_h, "weeks_of_quota": quota_h / WEEKLY_H, "fits_one_week": quota_h <= WEEKLY_H,
            "fits_one_session": sessions == 1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gpt2-124m-speedrun-t4x2")
    parser.add_argument("--tokens", type=float, default=None,
                        help="token budget (default: the preset's max_steps × total_batch_tokens)")
    parser.add_argument("--tokens-per-s", type=float, default=None, help="measured training tokens/s, both GPUs")
    parser.add_argument("--mfu", type=float, default=0.20, help="assumed MFU of the projection")
    parser.add_argument("--ddp-loss", type=float, default=0.05, help="assumed share lost to the all-reduce")
    parser.add_argument("--gpu-check", default=str(OUT / "gpu_check.json"))
    args = parser.parse_args()
    from nbgpt.model import flops_per_token

    run = preset_run(args.preset)
    train, nproc = run.train, run.nproc
    config = train.model_config(vocab_size=50257)
    sizes = model_bytes(train)
    flops = flops_per_token(config, train.seq_len, non_embedding_params=sizes["non_embedding"])
    tokens_per_s, basis = throughput(args, flops, nproc)
    budgets = {f"{args.preset} (max_steps × batch)": args.tokens or train.max_steps * train.total_batch_tokens,
               **PUBLISHED_TOKENS}
    rows = [{"budget": name, **plan(tokens, tokens_per_s)} for name, tokens in budgets.items()]
    read = rows[0]["tokens"] + (run.prepare.val_tokens or 0)  # the budget's training tokens + validation
    prepared = run.prepare.max_tokens or SAMPLE_TOKENS  # what `prepare` writes: the cap, or the whole sample
    disk = {"tokens_read": read, "tokens_prepared": prepared, "shards_gb": 2 * prepared / 1e9,
            "full_sample_10bt_gb": 2 * SAMPLE_TOKENS / 1e9, "checkpoints_kept": train.keep_checkpoints,
            "checkpoints_gb": train.keep_checkpoints * sizes["checkpoint_gb"]}
    print(f"throughput: {tokens_per_s:,.0f} tokens/s — {basis}")
    print(f"per optimizer step of {train.total_batch_tokens:,} tokens: {train.total_batch_tokens / tokens_per_s:.1f} s")
    report("t4_plan", rows, {"preset": args.preset, "tokens_per_s": tokens_per_s, "basis": basis,
                             "flops_per_token": flops, "model": sizes, "disk": disk,
                             "assumptions": {"session_h": SESSION_H, "weekly_quota_h": WEEKLY_H,
                                             "session_overhead_h": SESSION_OVERHEAD_H, "mfu": args.mfu}})
    print(f"model: {sizes['params']:,} parameters; one checkpoint {sizes['checkpoint_gb']:.2f} GB "
          f"(weights {sizes['weights_gb']:.2f} + optimizer {sizes['optimizer_gb']:.2f}); "
          f"{train.keep_checkpoints} kept: {disk['checkpoints_gb']:.1f} GB")
    one_session = rows[0]["tokens"] / (3600 * (SESSION_H - SESSION_OVERHEAD_H))
    print(f"to fit the preset's budget in one session: {one_session:,.0f} tokens/s, an MFU of "
          f"{one_session * flops / (GPU_PEAK * nproc):.0%} on {nproc} T4s")
    if train.max_seconds and rows[0]["train_hours"] > train.max_seconds / 3600:
        capped = tokens_per_s * train.max_seconds
        print(f"the preset's max_seconds ({train.max_seconds / 3600:.0f} h of training) ends the run first, at "
              f"{capped / 1e9:.2f} B tokens (~{capped / train.total_batch_tokens:,.0f} of {train.max_steps:,} steps; "
              f"the cooldown is fitted to it): fewer tokens than the budget, so a higher final loss")
    if run.prepare.max_tokens is None:
        print(f"shards: the whole 10 B-token sample (no max_tokens) = {disk['shards_gb']:.0f} GB")
        return
    print(f"shards: {prepared / 1e9:.2f} B tokens (max_tokens) = {disk['shards_gb']:.1f} GB, for the "
          f"{read / 1e9:.2f} B the budget reads with validation (the whole 10 B-token sample: "
          f"{disk['full_sample_10bt_gb']:.0f} GB)")
    if prepared < read:
        print(f"the budget reads more than the preset prepares: raise max_tokens to at least {read:,.0f}, or the "
              f"run reads some tokens twice")


if __name__ == "__main__":
    main()
