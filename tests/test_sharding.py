"""FSDP (parallel="fsdp", nbgpt.sharding) on the CPU with gloo: the same training as DDP, checkpoints in the
same format, and the gather Muon needs."""

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from conftest import tiny_train_config
from nbgpt.checkpoint import load_latest
from nbgpt.loading import load_model
from nbgpt.metrics import read_metrics

HERE = Path(__file__).parent


def torchrun_each(configs: list, nproc: int, tmp_path: Path, script: str = "train_each.py", *extra) -> None:
    """Run every config in one torchrun of `nproc` gloo processes (tests/train_each.py: train each). A
    (config, N) pair trains it up to step N, where the same config listed next resumes it."""
    paths = []
    for config in configs:
        config, until = config if isinstance(config, tuple) else (config, None)
        path = tmp_path / f"{Path(config.out_dir).name}.json"
        path.write_text(json.dumps(asdict(config)))
        paths.append(f"{path}@{until}" if until else str(path))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(HERE / script), *paths, *map(str, extra)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]


CASES = [(optimizer, precision) for optimizer in ("adamw", "muon") for precision in ("fp32", "bf16")]


def test_fsdp_trains_as_ddp_does(char_data, tmp_path):
    """2 ranks under FSDP == 2 ranks under DDP, step for step: the losses, the gradient norm clipping saw (the
    whole model's, from the sharded gradients), the final weights and every optimizer state (AdamW's moments,
    Muon's momentum, gathered from the shards into the checkpoint's format) for AdamW and Muon in fp32; in
    bf16 the losses, norms and the weights as a whole.
    Two micro-steps per step: the first accumulates without reducing. Eval runs through the sharded model. The
    fp32 FSDP runs stop at step 1 and resume: the weights, moments and momentum go back into their shards."""
    common = dict(max_steps=3, warmup_steps=1, eval_interval=3, checkpoint_interval=3, total_batch_tokens=16 * 32,
                  micro_batch=4, block_size=32)
    configs = []
    for optimizer, precision in CASES:
        for parallel in ("ddp", "fsdp"):
            config = tiny_train_config(char_data, tmp_path / f"{parallel}-{optimizer}-{precision}", parallel=parallel,
                                       optimizer=optimizer, precision=precision, **common)
            configs += [(config, 1), config] if (parallel, precision) == ("fsdp", "fp32") else [config]
    torchrun_each(configs, 2, tmp_path)
    for optimizer, precision in CASES:
        ddp, fsdp = (tmp_path / f"{parallel}-{optimizer}-{precision}" for parallel in ("ddp", "fsdp"))
        tol = dict(rtol=1e-5, atol=2e-6) if precision == "fp32" else dict(rtol=2e-2, atol=2e-3)
        ours, theirs = read_metrics(fsdp, "train"), read_metrics(ddp, "train")
        assert [r["step"] for r in ours] == [0, 1, 2]
        assert ("resumed from step 1" in (fsdp / "train.log").read_text()) == (precision == "fp32")
        for key in ("loss", "grad_norm"):
            torch.testing.assert_close(torch.tensor([r[key] for r in ours]), torch.tensor([r[key] for r in theirs]),
                                       **tol, msg=f"{optimizer} {precision} {key}")
        assert [r["val_loss"] for r in read_metrics(fsdp, "eval")] == pytest.approx(
            [r["val_loss"] for r in read_metrics(ddp, "eval")], rel=tol["rtol"] * 10)
        a, b = load_latest(fsdp / "checkpoints"), load_latest(ddp / "checkpoints")
        assert a["step"] == b["step"] == 3 and a["model"].keys() == b["model"].keys()
        loaded = load_model(fsdp)  # what export, sample, eval and the panel load
        assert loaded.step == 3 and all(torch.equal(t, a["model"][k]) for k, t in loaded.model.state_dict().items())
        if precision == "bf16":
            # FSDP computes with bf16 copies of every weight, DDP's autocast casts per op: AdamW's normalised
            # steps turn the rounding differences of near-zero gradients (the key bias, whose exact gradient
            # is 0) into steps of ±lr in a few entries, so the weights agree as a whole, not entry by entry.
            difference = sum(((a["model"][k] - t) ** 2).sum() for k, t in b["model"].items()).sqrt()
            assert difference / sum((t ** 2).sum() for t in b["model"].values()).sqrt() < 1e-2
            continue
        for name, tensor in b["model"].items():
            torch.testing.assert_close(a["model"][name], tensor, **tol, msg=f"{optimizer} {name}")
        for mine, reference in zip(a["optimizer"], b["optimizer"], strict=True):
            assert mine["param_groups"] == reference["param_groups"] and mine["state"].keys() == reference["state"].keys()
            for index, state in reference["state"].items():
                for key, value in state.items():
                    torch.testing.assert_close(mine["state"][index][key].cpu(), value.cpu(), **tol,
                                               msg=f"{optimizer} state {index} {key}")


def test_fsdp_refuses_what_needs_the_whole_model_on_one_process():
    from nbgpt.model import ConfigError
    from nbgpt.run_config import RunConfig

    assert RunConfig.from_preset("gpt3-xl").train.parallel == "fsdp"
    with pytest.raises(ConfigError, match="hellaswag_interval=500 cannot run with parallel='fsdp' on 8 processes"):
        RunConfig.from_preset("gpt3-xl", {"hellaswag_interval": 500})
    assert RunConfig.from_preset("gpt3-xl", {"hellaswag_interval": 500, "nproc": 1}).nproc == 1  # nothing sharded
    with pytest.raises(ConfigError, match="parallel must be 'ddp' .* or 'fsdp' .*, got 'zero3'"):
        RunConfig.from_preset("tiny", {"parallel": "zero3"})


def test_fsdp_fp16_overflow_in_one_ranks_shard_skips_the_whole_step_on_every_rank(char_data, tmp_path):
    """GradScaler over sharded gradients: an inf in rank 0's shard alone is seen by every rank (the clipped
    norm is the whole model's), so no rank moves any parameter, under Muon + AdamW or AdamW alone, and both
    halve their loss scale alike; the next step goes through."""
    configs = [tiny_train_config(char_data, tmp_path / optimizer, parallel="fsdp", precision="fp16",
                                 optimizer=optimizer, micro_batch=4) for optimizer in ("adamw", "muon")]
    torchrun_each(configs, 2, tmp_path, "fsdp_overflow.py", tmp_path / "results.json")
    for result in json.loads((tmp_path / "results.json").read_text()):
        assert result["skipped"] and result["moved"] == [False, False] and not result["next_skipped"]
        (before, after), other = result["scales"]
        assert after == before / 2 and other == [before, after]
