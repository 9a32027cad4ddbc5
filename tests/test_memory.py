"""The memory plan (nbgpt.memory, `nbgpt plan`) and micro_batch="auto": traced on fake tensors, checked
against real peaks of the real training step on this CPU, and resolved by the trainer."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_train_config

from nbgpt.cli import PHASE_NAMES
from nbgpt.knobs import ConfigError
from nbgpt.memory import (CPU_AUTO_MICRO_BATCH, KNOWN_GPUS, MARGIN, NON_TORCH_GIB, CudaAutocast, find_gpu,
                          plan_memory, refuse_unfit, speedup_cell)
from nbgpt.run_config import RunConfig, TrainConfig
from nbgpt.train import Trainer

ROOT = Path(__file__).resolve().parents[1]


def nbgpt(*args):
    return subprocess.run([sys.executable, "-m", "nbgpt", *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ})


def test_plan_prices_every_phase_and_chooses_the_largest_micro_batch_that_fits():
    """gpt2-124m-t4x2 on a T4: micro_batch=auto is a divisor of the 256 sequences per GPU per step that fits
    the T4's budget, and forcing the next divisor up is refused as not fitting (exit status 1)."""
    result = nbgpt("plan", "--preset", "gpt2-124m-t4x2", "--gpu", "t4", "--json")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert (plan["gpu"], plan["nproc"], plan["precision"], plan["sequences_per_rank"]) == ("T4", 2, "fp16", 256)
    assert set(plan["phases"]) == set(PHASE_NAMES) and all(gib > 0 for gib in plan["phases"].values())
    assert plan["fits"] and plan["budget_gib"] < KNOWN_GPUS["T4"][0]
    assert plan["speedup_layers"] == 12  # GPT-2 124M: notebook 03 times the whole model, as it always did
    batch = plan["micro_batch"]
    assert 256 % batch == 0 and plan["phases"]["train_eager"] <= plan["budget_gib"]
    assert plan["phases"]["train_eager"] > plan["phases"]["eval"] > 1.85  # more than the weights and their state
    larger = nbgpt("plan", "--preset", "gpt2-124m-t4x2", "--gpu", "t4", "-p", "micro_batch", str(2 * batch))
    assert larger.returncode == 1 and "fits: NO" in larger.stdout, larger.stdout + larger.stderr
    assert f"micro_batch: {2 * batch} sequences per GPU" in larger.stdout
    assert "training step, eager" in larger.stdout and "upper bound" in larger.stdout  # the compiled figure's caveat


def test_plan_targets_known_gpus_by_alias_or_any_size():
    assert find_gpu("a100-40gb") == find_gpu("A100 40GB") == "A100 40GB" and find_gpu("H100") == "H100 80GB"
    # the names torch.cuda.get_device_name gives, as a user copies them from nvidia-smi or a log
    assert [find_gpu(name) for name in ("NVIDIA A100-SXM4-40GB", "NVIDIA A100 80GB PCIe", "NVIDIA H100 80GB HBM3",
                                        "Tesla T4", "NVIDIA L4")] == ["A100 40GB", "A100 80GB", "H100 80GB", "T4", "L4"]
    unknown = nbgpt("plan", "--preset", "tiny", "--gpu", "a100-20gb")
    assert unknown.returncode == 2 and len(unknown.stderr.strip().splitlines()) == 1
    assert "unknown GPU 'a100-20gb'; known: a100-40gb, a100-80gb, h100" in unknown.stderr
    sized = nbgpt("plan", "--preset", "tiny", "--gpu-memory", "6", "--nproc", "1", "--json")
    plan = json.loads(sized.stdout)
    assert (plan["gpu"], plan["gpu_memory_gib"], plan["micro_batch"], plan["fits"]) == ("6 GiB GPU", 6.0, 16, True)


def test_a_model_that_cannot_fit_at_micro_batch_one_is_refused():
    run = RunConfig.from_preset("tiny", {"micro_batch": "auto"})
    refuse_unfit(run, gpu_memory_gib=4.0)  # fits: nothing to say
    with pytest.raises(ConfigError, match=r"does not fit a 1.001 GiB GPU \(1 GiB\) even at micro_batch=1: "):
        refuse_unfit(run, gpu_memory_gib=1.001)  # ~1 MiB left for torch: less than the weights and their state
    with pytest.raises(ConfigError, match=r"micro_batch=1: \d+\.\d GiB in \w+ needed"):  # names the phase
        refuse_unfit(run, gpu_memory_gib=1.001)
    refuse_unfit(run)  # no GPU here, none named: nothing to judge by


def test_micro_batch_takes_a_positive_number_or_auto():
    assert TrainConfig.from_dict({"micro_batch": "auto"}).micro_batch == "auto"
    assert TrainConfig.from_dict({"micro_batch": "12"}).micro_batch == 12
    for bad in ("0", "big", -3):
        with pytest.raises(ConfigError, match=r"micro_batch must be a positive integer or 'auto'"):
            TrainConfig.from_dict({"micro_batch": bad})
    gpu_presets = ("gpt2-124m", "gpt2-124m-t4x2", "gpt2-124m-speedrun", "gpt2-124m-speedrun-t4x2")
    assert {RunConfig.from_preset(name).train.micro_batch for name in gpu_presets} == {"auto"}


def test_auto_on_a_cpu_keeps_the_batch_by_accumulating_and_says_why(char_data, tmp_path):
    config = tiny_train_config(char_data, tmp_path, micro_batch="auto", total_batch_tokens=24 * 32, max_steps=2,
                                eval_interval=2, warmup_steps=1)
    trainer = Trainer(config, echo=lambda line: None)
    try:
        assert (trainer.micro_batch, trainer.grad_accum_steps) == (12, 2)  # 24 sequences: 12 is the largest <= 16
        x, _ = trainer.train_loader.next_batch()
        assert tuple(x.shape) == (12, 32)
        assert trainer.train_step()["loss"] > 0
    finally:
        trainer.close()
    log = (tmp_path / "train.log").read_text()
    assert (f"micro_batch=auto on cpu: 12, the largest divisor of the 24 sequences per process per step up to "
            f"{CPU_AUTO_MICRO_BATCH}") in log


def test_the_trace_casts_as_cuda_autocast_does():
    """On a GPU, QK-norm's rms_norm and the softmax run in fp32 under autocast; on a CPU they stay in bf16."""
    x, w = torch.randn(4, 8), torch.randn(8, 8)
    with CudaAutocast(torch.bfloat16):
        h = F.linear(x, w)
        assert h.dtype == torch.bfloat16 and (h @ w.bfloat16()).dtype == torch.bfloat16
        assert F.rms_norm(h, (8,)).dtype == torch.float32 and h.softmax(-1).dtype == torch.float32
        assert torch.tanh(h).dtype == torch.bfloat16  # not on CUDA's lists: the dtype it is given
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert F.rms_norm(F.linear(x, w), (8,)).dtype == torch.bfloat16


@pytest.mark.registry
def test_the_plan_is_within_15_percent_of_the_real_peak_on_this_cpu():
    """bench/memory_check.py: the plan's training-step peak beside the resident-memory growth of the real
    Trainer's steps in a fresh process (AdamW fp32, Muon + AdamW bf16, AdamW fp16 + GradScaler)."""
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "memory_check.py")], capture_output=True,
                            text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    payload = json.loads(next(line for line in result.stdout.splitlines() if line.startswith('{"bench"')))
    ratios = {row["config"]: row["ratio"] for row in payload["rows"]}
    assert set(ratios) == {"adamw-fp32", "muon-bf16", "fp16-scaler"}
    assert all(0.85 <= ratio <= 1.15 for ratio in ratios.values()), payload["rows"]


# A model whose training state (16 bytes per parameter under AdamW) outweighs its activations, as GPT-2 XL's does.
WIDE = dict(model="mini", n_layer=4, n_head=4, n_embd=512, block_size=64, micro_batch=1, total_batch_tokens=4 * 64,
            optimizer="adamw")


def wide_plan(nproc: int, parallel: str, gpu_memory_gib: float = 24.0):
    return plan_memory(RunConfig.from_preset("tiny", {**WIDE, "nproc": nproc, "parallel": parallel}),
                       gpu_memory_gib=gpu_memory_gib)


def test_fsdp_is_priced_per_shard_and_the_plan_says_when_it_would_fit():
    """With 2 processes fsdp needs less per GPU than ddp (half the training state, plus the whole fp32
    gradients the 2 accumulating micro-steps keep); in one process there is nothing to shard: the same plan."""
    ddp, fsdp = wide_plan(2, "ddp"), wide_plan(2, "fsdp")
    assert (ddp.parallel, fsdp.parallel, ddp.micro_batch, fsdp.micro_batch) == ("ddp", "fsdp", 1, 1)
    assert fsdp.phases["train_eager"] < ddp.phases["train_eager"] and fsdp.phases["eval"] < ddp.phases["eval"]
    single = [wide_plan(1, parallel) for parallel in ("ddp", "fsdp")]
    assert single[0].phases == single[1].phases and single[0].parallel == single[1].parallel == "one process"
    # a card between the two peaks: ddp does not fit, and the plan names the setting that would, without taking it
    between = (ddp.peak_gib + fsdp.peak_gib) / 2 / (1 - MARGIN) + NON_TORCH_GIB
    assert not wide_plan(2, "ddp", between).fits and wide_plan(2, "fsdp", between).fits
    overrides = [arg for name, value in WIDE.items() for arg in ("-p", name, str(value))]
    text = nbgpt("plan", "--preset", "tiny", *overrides, "--nproc", "2", "--gpu-memory", f"{between:.3f}")
    assert text.returncode == 1 and ", ddp, " in text.stdout and "fits: NO" in text.stdout, text.stdout + text.stderr
    assert f"-p parallel fsdp fits: micro_batch 1, peak {fsdp.peak_gib:.2f} GiB of" in text.stdout


@pytest.mark.parametrize("model, layers", [("gpt2-xl", 48), ("gpt3-xl", 24)])
def test_the_speed_up_cell_times_a_stand_in_where_the_whole_model_does_not_fit(model, layers):
    """An fp32 XL model with its gradients and two AdamWs' moments in one process fits neither a T4 nor an
    A100 40GB: notebook 03's cell times a stand-in of fewer layers whose traced peak fits what the plan
    leaves torch, and the plan prices the cell so (one note says what it times). So the cell neither refuses
    a run nor shrinks micro_batch=auto: gpt2-xl under fsdp on 8 A100 40GB (refused before, the cell at 34.8
    GiB) fits at the micro-batch its training step allows. An H100 times the whole model."""
    for gpu in ("Tesla T4", "NVIDIA A100-SXM4-40GB", "NVIDIA H100 80GB HBM3"):
        run = RunConfig.from_preset("gpt3-xl", {"model": model, "micro_batch": "auto", "nproc": 2})
        plan = plan_memory(run, gpu)
        cell = speedup_cell(run.train.model_config(50257), 2048 if model == "gpt3-xl" else 1024,
                            "fp16" if gpu == "Tesla T4" else "bf16", 4, KNOWN_GPUS[find_gpu(gpu)][0])
        assert plan.speedup_layers == cell.layers and plan.phases["speedups"] == round(cell.peak_gib, 2)
        if "H100" in gpu:
            assert cell.layers == layers and not any("stand-in" in note for note in plan.notes)
            continue
        assert cell.whole_gib > plan.budget_gib and 0 < cell.layers < layers
        assert plan.phases["speedups"] <= plan.budget_gib
        assert f"notebook 03's speed-up cell times {cell.timed_on}" in plan.notes
    run = RunConfig.from_preset("gpt3-xl", {"model": "gpt2-xl", "micro_batch": "auto"})
    plan = plan_memory(run, "a100-40gb")
    assert (run.nproc, plan.parallel, plan.fits, plan.micro_batch) == (8, "fsdp", True, 4)
    assert "8 would need" in plan.why and "in train_eager" in plan.why  # the training step sets it, not the cell
    refuse_unfit(run, "a100-40gb")


@pytest.mark.parametrize("preset", ["gpt3-small", "gpt3-xl"])
def test_the_gpt3_presets_as_shipped_fit_the_a100_40gb_they_are_offered_for(preset):
    """The README offers both for an 8×A100/H100 node; a fixed micro-batch (8 for gpt3-xl, 32 for gpt3-small)
    needed an 80 GB card, while micro_batch="auto" takes what a 40 GB one holds."""
    plan = plan_memory(RunConfig.from_preset(preset), gpu="a100-40gb")
    assert plan.fits and plan.micro_batch is not None and plan.micro_batch < {"gpt3-small": 32, "gpt3-xl": 8}[preset]
