import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict

import pytest
import torch

from conftest import tiny_train_config
from nbgpt.checkpoint import CheckpointError, load_latest, save_checkpoint, saved_cuda_state
from nbgpt.device import DTYPES, GPU_PEAK_FLOPS, cpu_matmul_speedup, gpu_peak_flops, peak_flops
from nbgpt.metrics import read_metrics
from nbgpt.model import ConfigError, GPT
from nbgpt.stop import TrainingDiverged
from nbgpt.train import Trainer, lr_at
from nbgpt.run_config import TrainConfig


def train_losses(run_dir):
    return [r["loss"] for r in read_metrics(run_dir, "train")]


def test_loss_falls_on_fixed_batch_and_held_out(char_data, tmp_path):
    trainer = Trainer(tiny_train_config(char_data, tmp_path / "run", max_steps=60, eval_interval=60))
    x, y = trainer.train_loader.next_batch()
    model, [opt] = trainer.model, trainer.optimizers
    first = model(x, y)[1].item()
    for _ in range(80):  # overfit one batch
        opt.zero_grad()
        model(x, y)[1].backward()
        opt.step()
    assert model(x, y)[1].item() < 0.5 * first

    fresh = Trainer(tiny_train_config(char_data, tmp_path / "run2", max_steps=60, eval_interval=60))
    before = fresh.evaluate()
    fresh.fit()
    evals = read_metrics(tmp_path / "run2", "eval")
    assert evals[0]["val_loss"] == pytest.approx(before) and evals[-1]["step"] == 60
    assert evals[-1]["val_loss"] < before - 0.8  # ln(vocab) ~ 4.3 -> well under 3.5 on unseen text


def test_lr_schedule():
    config = TrainConfig(max_lr=6e-4, warmup_steps=10, max_steps=100, min_lr_ratio=0.1)
    assert lr_at(0, config) == pytest.approx(6e-5)
    assert lr_at(9, config) == pytest.approx(6e-4)
    assert lr_at(55, config) == pytest.approx(3.3e-4)  # half way through the cosine
    assert lr_at(100, config) == pytest.approx(6e-5) == lr_at(500, config)


def test_trapezoid_schedule_warms_up_holds_then_cools_down():
    config = TrainConfig(max_lr=1e-2, warmup_steps=10, max_steps=100, min_lr_ratio=0.0, schedule="trapezoid",
                         cooldown_fraction=0.4)
    assert lr_at(0, config) == pytest.approx(1e-3) and lr_at(9, config) == pytest.approx(1e-2)
    assert [lr_at(step, config) for step in (10, 35, 60)] == pytest.approx([1e-2] * 3)  # flat until step 60
    assert lr_at(80, config) == pytest.approx(5e-3)  # half way down the last 40 steps
    assert lr_at(99, config) == pytest.approx(1e-2 / 40) and lr_at(100, config) == 0.0
    # a horizon fitted to a time budget moves the cooldown with it: 50 steps cool down from step 30
    assert lr_at(29, config, max_steps=50) == pytest.approx(1e-2) and lr_at(40, config, max_steps=50) == pytest.approx(5e-3)
    cosine = TrainConfig(max_lr=1e-2, warmup_steps=10, max_steps=100, min_lr_ratio=0.0)
    assert lr_at(35, cosine) < 1e-2 * 0.9  # the cosine is already decaying there


def test_gradient_accumulation_equals_one_big_batch(char_data, tmp_path):
    grads = []
    for micro in (8, 2):
        trainer = Trainer(tiny_train_config(char_data, tmp_path / f"m{micro}", micro_batch=micro))
        assert trainer.grad_accum_steps == 8 // micro
        trainer.optimizers[0].step = lambda: None  # keep the gradients of exactly one step to compare
        trainer.train_step()
        grads.append({n: p.grad.clone() for n, p in trainer.model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5)


def test_batch_not_divisible_is_named(char_data, tmp_path):
    with pytest.raises(ConfigError, match="total_batch_tokens=1000 is not a multiple of micro_batch × seq_len"):
        Trainer(tiny_train_config(char_data, tmp_path / "r", total_batch_tokens=1000))


@pytest.mark.parametrize("recipe", ["gpt2", "speedrun"])
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_paths_on_cpu(char_data, tmp_path, precision, recipe):
    trainer = Trainer(tiny_train_config(char_data, tmp_path / "r", precision=precision, max_steps=30,
                                        eval_interval=30, recipe=recipe, max_lr=1e-2 if recipe == "speedrun" else 3e-3))
    assert trainer.scaler.is_enabled() == (precision == "fp16")
    trainer.fit()
    records = read_metrics(tmp_path / "r", "train")
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    assert records[-1]["loss"] < records[0]["loss"] - 0.5
    if precision == "fp16":
        assert "grad_scale" in records[0]
    # train.log opens with what the run runs on; a precision this CPU only emulates gets a warning there, and
    # MFU is then measured against the fp32 peak (against the emulated one it would read far over 100 %)
    log = (tmp_path / "r" / "train.log").read_text().splitlines()
    assert log[0].startswith(f"device cpu · precision {precision} (asked: {precision}) · ")
    assert log[0].endswith("starting at step 0")
    emulated = cpu_matmul_speedup(DTYPES[precision]) < 1.0
    assert any(line.startswith(f"warning: precision='{precision}' runs this CPU's matmuls at") for line in log) == emulated
    assert trainer.peak == peak_flops(trainer.device, "fp32" if emulated else precision)


def test_gpu_peaks_are_matched_by_exact_name_and_unknown_is_none():
    """Datasheet dense peaks by the exact name torch gives; a similar name borrows nothing (MFU unknown)."""
    assert gpu_peak_flops("NVIDIA H100 80GB HBM3", "bf16") == 989e12  # SXM
    assert gpu_peak_flops("NVIDIA H100 PCIe", "bf16") == 756e12
    assert gpu_peak_flops("NVIDIA H100 NVL", "bf16") == 835e12
    assert gpu_peak_flops("NVIDIA L40S", "bf16") == 362e12 and gpu_peak_flops("NVIDIA L4", "bf16") == 121e12
    assert gpu_peak_flops("NVIDIA A100-SXM4-40GB", "fp32") == gpu_peak_flops("NVIDIA A100 80GB PCIe", "fp32") == 156e12
    assert gpu_peak_flops("Tesla T4", "fp16") == 65e12 and gpu_peak_flops("Tesla T4", "fp32") == 8.1e12
    for name in GPU_PEAK_FLOPS:  # dense figures, every one of them below the densest card's
        assert all(0 < peak <= 989e12 for peak in GPU_PEAK_FLOPS[name].values()), name
    for unknown in ("NVIDIA H100", "NVIDIA L40", "NVIDIA A100-SXM4-40GB MIG 1g.5gb", "NVIDIA GeForce RTX 4090",
                    "Tesla T4 "):
        assert gpu_peak_flops(unknown, "bf16") is None and gpu_peak_flops(unknown, "fp16") is None, unknown
    assert gpu_peak_flops("Tesla T4", "bf16") is None  # no native bf16 on a T4


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
@pytest.mark.parametrize("where", ["wte.weight", "lm_head.weight", "h.0.mlp.c_fc.weight"])
def test_fp16_overflow_anywhere_skips_the_whole_step(char_data, tmp_path, optimizer, where):
    """An inf in any one gradient (under Muon + AdamW: in either optimizer's share) changes no parameter in
    any optimizer, and the scaler still halves its scale; the next step goes through."""
    trainer = Trainer(tiny_train_config(char_data, tmp_path / "r", precision="fp16", optimizer=optimizer,
                                        tie_embeddings=False))
    trainer.train_step()
    trainer.train_step()  # the untied head starts at zero: give every parameter a nonzero gradient first
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    param = trainer.model.get_parameter(where)
    handle = param.register_hook(lambda g: torch.full_like(g, float("inf")))
    scale = trainer.scaler.get_scale()
    record = trainer.train_step()
    handle.remove()
    assert record["skipped"] and record["loss"] == record["loss"]  # loss finite, step skipped
    assert record["grad_scale"] == scale and trainer.scaler.get_scale() == scale / 2
    for name, p in trainer.model.named_parameters():
        assert torch.equal(p, before[name]), name
    assert not trainer.train_step()["skipped"]  # the next step, with a lower scale, goes through
    assert any(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())


def test_nan_loss_stops_and_keeps_last_checkpoint(char_data, tmp_path):
    trainer = Trainer(tiny_train_config(char_data, tmp_path / "r", max_steps=10))
    trainer.fit()
    with torch.no_grad():
        trainer.model.h[0].mlp.c_fc.weight[0, 0] = float("nan")
    trainer.max_steps = 20
    trainer.config.checkpoint_interval = 1  # a checkpoint is due after every step: none may be written
    with pytest.raises(TrainingDiverged, match=r"not finite for 3 steps in a row \(up to step 12\).*the last good "
                                               r"checkpoint is .*ckpt_0000010.pt"):
        trainer.fit()
    assert load_latest(tmp_path / "r" / "checkpoints")["step"] == 10
    skipped = read_metrics(tmp_path / "r", "train")[-3:]
    assert [(r["step"], r["loss"], r["nonfinite"]) for r in skipped] == [(10, None, True), (11, None, True),
                                                                         (12, None, True)]
    assert "NaN" not in (tmp_path / "r" / "metrics.jsonl").read_text()  # strict JSON


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_is_bit_exact(char_data, tmp_path, optimizer):
    kwargs = dict(max_steps=16, checkpoint_interval=8, eval_interval=4, shuffle=True, optimizer=optimizer)
    Trainer(tiny_train_config(char_data, tmp_path / "straight", **kwargs)).fit()
    Trainer(tiny_train_config(char_data, tmp_path / "split", **kwargs)).fit(until=8)
    resumed = Trainer(tiny_train_config(char_data, tmp_path / "split", **kwargs))
    assert resumed.step == 8
    resumed.fit()
    assert train_losses(tmp_path / "split") == train_losses(tmp_path / "straight")
    assert len(train_losses(tmp_path / "split")) == 16
    evals = lambda d: [(r["step"], r["val_loss"]) for r in read_metrics(d, "eval")]
    assert evals(tmp_path / "split") == evals(tmp_path / "straight")


def test_resume_with_another_micro_batch_reads_the_same_data_and_continues_the_schedule(char_data, tmp_path):
    """Stopped at micro_batch 8 (one micro-step), continued at micro_batch 2 (four): the same windows per step
    (the loader's position counts windows of the run), the same learning rates, the loss within float noise."""
    kwargs = dict(max_steps=8, checkpoint_interval=4, eval_interval=0, shuffle=True, warmup_steps=3)
    straight = Trainer(tiny_train_config(char_data, tmp_path / "straight", **kwargs))
    straight.fit()
    straight.close()
    first = Trainer(tiny_train_config(char_data, tmp_path / "split", **kwargs))
    first.fit(until=4)
    first.close()
    lines = []
    resumed = Trainer(tiny_train_config(char_data, tmp_path / "split", micro_batch=2, **kwargs), echo=lines.append)
    assert (resumed.step, resumed.grad_accum_steps) == (4, 4)
    moved = [line for line in lines if line.startswith("trained so far on 1 process(es) x micro_batch 8, now 1 x 2 "
                                                       "in 4 micro-step(s)")]
    assert len(moved) == 1 and moved[0].endswith(  # eval_batches 2: of 8 × 2 sequences, now of 2 × 2, said with the fix
        "validation now averages 4 sequences (2 batches of 2 on 1 process(es)), it averaged 16; -p eval_batches 8 "
        "keeps it comparable")
    resumed.fit()
    resumed.close()
    records = [read_metrics(tmp_path / run, "train") for run in ("straight", "split")]
    assert [(r["step"], r["lr"]) for r in records[1]] == [(r["step"], r["lr"]) for r in records[0]]
    assert [r["loss"] for r in records[1][:4]] == [r["loss"] for r in records[0][:4]]
    assert [r["loss"] for r in records[1]] == pytest.approx([r["loss"] for r in records[0]], rel=1e-5)
    positions = [{k: load_latest(tmp_path / run / "checkpoints")["loader"][k] for k in ("epoch", "sequence")}
                 for run in ("straight", "split")]
    assert positions[0] == positions[1] == {"epoch": 0, "sequence": 8 * 8}
    with pytest.raises(CheckpointError, match=r"other settings \(total_batch_tokens 256 there, 512 here\)"):
        Trainer(tiny_train_config(char_data, tmp_path / "split", micro_batch=2, total_batch_tokens=512, **kwargs))


def test_muon_owns_block_matrices_and_learns(char_data, tmp_path):
    # fp16: the GradScaler unscales and steps both optimizers (the Kaggle T4 path)
    trainer = Trainer(tiny_train_config(char_data, tmp_path / "r", optimizer="muon", precision="fp16", max_steps=30,
                                        eval_interval=30))
    muon, adamw = trainer.optimizers
    owned = [{id(p) for g in o.param_groups for p in g["params"]} for o in (muon, adamw)]
    assert not owned[0] & owned[1]
    assert owned[0] | owned[1] == {id(p) for p in trainer.model.parameters()}
    for name, p in trainer.model.named_parameters():
        assert (id(p) in owned[0]) == (name.startswith("h.") and p.dim() == 2), name
    trainer.fit()
    records = read_metrics(tmp_path / "r", "train")
    assert records[-1]["loss"] < records[0]["loss"] - 0.5 and all("grad_scale" in r for r in records)
    with pytest.raises(CheckpointError, match=r"other settings \(optimizer 'muon' there, 'adamw' here\); resume with "):
        Trainer(tiny_train_config(char_data, tmp_path / "r", max_steps=40))
    with pytest.raises(ConfigError, match="optimizer must be 'adamw' or 'muon', got 'sgd'"):
        Trainer(tiny_train_config(char_data, tmp_path / "other", optimizer="sgd"))


def test_corrupt_checkpoint_falls_back(char_data, tmp_path):
    run = tmp_path / "r"
    Trainer(tiny_train_config(char_data, run, max_steps=20, keep_checkpoints=3)).fit()
    newest = run / "checkpoints" / "ckpt_0000020.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    messages = []
    trainer = Trainer(tiny_train_config(char_data, run, max_steps=20), echo=messages.append)
    assert trainer.step == 10
    assert any("ckpt_0000020.pt is damaged: it does not match the sha256 recorded" in m for m in messages)
    (run / "checkpoints" / "ckpt_0000010.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        Trainer(tiny_train_config(char_data, run, max_steps=20))


def test_compiled_training_evaluates_and_samples_without_recompiling(char_data, tmp_path):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    trainer = Trainer(tiny_train_config(char_data, tmp_path / "r", compile=True, max_steps=3,
                                        eval_interval=0, checkpoint_interval=0))
    trainer.fit()
    trainer.evaluate()
    graphs_after_first_eval = counters["stats"]["unique_graphs"]
    for _ in range(3):
        trainer.train_step()
        trainer.evaluate()
    text = trainer.sample()
    assert isinstance(text, str) and len(text) > 0
    # One graph for training and one for no-grad evaluation; more steps, evals and sampling add none.
    assert counters["stats"]["unique_graphs"] == graphs_after_first_eval <= 2


def run_cli_train(config: TrainConfig, **popen):
    path = os.path.join(config.out_dir + ".json")
    with open(path, "w") as f:
        json.dump(asdict(config), f)
    cmd = [sys.executable, "-m", "nbgpt", "train", "--config-json", path]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, **popen)


@pytest.mark.parametrize("recipe", ["gpt2", "speedrun"])  # speedrun: rotary tables (buffers) and Muon
def test_ddp_two_gloo_processes_match_one(char_data, tmp_path, monkeypatch, recipe):
    """2 ranks × micro_batch 4 == 1 process × micro_batch 8 on the same global batch; the two ranks are
    started by the notebook launcher (torchrun as a subprocess, its output streamed back)."""
    from nbgpt.distributed import launch

    common = dict(max_steps=2, eval_interval=0, checkpoint_interval=0, total_batch_tokens=8 * 32, recipe=recipe)
    process = run_cli_train(tiny_train_config(char_data, tmp_path / "one", micro_batch=8, **common))
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    lines = []
    launch(tiny_train_config(char_data, tmp_path / "two", micro_batch=4, **common), nproc=2, echo=lines.append)
    assert any('"step": 2' in line for line in lines)  # rank 0's summary reached the caller
    one = load_latest(tmp_path / "one" / "checkpoints")
    two = load_latest(tmp_path / "two" / "checkpoints")
    assert one["step"] == two["step"] == 2
    # every rank's CUDA generator is gathered into the checkpoint (gloo ranks have none)
    assert one["rng"]["cuda_per_rank"] == [None] and two["rng"]["cuda_per_rank"] == [None, None]
    # Muon normalises each update: the speedrun's zero-initialised projections get near-zero first gradients,
    # whose rounding-level differences (two partial sums instead of one) it scales up to ~lr/30 in a few entries
    atol = 2e-4 if recipe == "speedrun" else 2e-6
    for name, tensor in one["model"].items():
        torch.testing.assert_close(tensor, two["model"][name], atol=atol, rtol=1e-5)
    assert train_losses(tmp_path / "one") == pytest.approx(train_losses(tmp_path / "two"), abs=1e-5)


def test_ddp_keeps_gradients_in_its_buckets_and_resends_no_buffers(char_data, tmp_path):
    """DDP as the trainer builds it (a one-process gloo group here): the gradients are views into the
    all-reduce buckets (no second copy of them), and the rotary tables are not re-sent before each forward."""
    from nbgpt.distributed import DistInfo
    from nbgpt.train_setup import Runtime, wrap_model

    config = tiny_train_config(char_data, tmp_path / "r", recipe="speedrun")
    model = GPT(config.model_config(vocab_size=65))
    assert {name for name, _ in model.named_buffers()} == {"rope_cos", "rope_sin"}
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0,
                                         world_size=1)
    try:
        ddp = wrap_model(model, config, Runtime(torch.device("cpu"), DistInfo(world_size=2), "fp32"))
        assert not ddp.broadcast_buffers
        for _ in range(2):  # the gradients become bucket views from the second iteration on
            model.zero_grad(set_to_none=True)
            x = torch.randint(0, 65, (2, 32))
            ddp(x, x)[1].backward()
        storages = {p.grad.untyped_storage().data_ptr() for p in model.parameters()}
        assert len(storages) < len(list(model.parameters())) / 4  # a few buckets, not one buffer per gradient
    finally:
        torch.distributed.destroy_process_group()


def test_each_rank_takes_back_its_own_cuda_generator_state():
    """Checkpoints list every rank's CUDA state; a rank takes its own, and one the checkpoint did not have
    (another world size, a CPU run) keeps its seeded generator. Older checkpoints held rank 0's GPUs only."""
    first, second = torch.full((16,), 1, dtype=torch.uint8), torch.full((16,), 2, dtype=torch.uint8)
    per_rank = {"cuda_per_rank": [first, second]}
    assert saved_cuda_state(per_rank, 0) is first and saved_cuda_state(per_rank, 1) is second
    assert saved_cuda_state(per_rank, 2) is None  # saved by 2 ranks, resumed by 3
    assert saved_cuda_state({"cuda_per_rank": [None, None]}, 1) is None  # saved on gloo/CPU
    old = {"cuda": [first, second]}  # rank 0's view: its own cuda:0, and cuda:1 it never drew from
    assert saved_cuda_state(old, 0) is first and saved_cuda_state(old, 1) is None
    assert saved_cuda_state({}, 0) is None


def test_workers_get_expandable_segments_unless_the_user_chose_allocator_settings():
    from nbgpt.distributed import worker_environment

    env = worker_environment({"PATH": "/bin"})
    assert env == {"PATH": "/bin", "PYTHONUNBUFFERED": "1", "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    mine = {"PYTORCH_CUDA_ALLOC_CONF": "backend:cudaMallocAsync"}
    assert worker_environment(mine)["PYTORCH_CUDA_ALLOC_CONF"] == "backend:cudaMallocAsync"
    newer = worker_environment({"PYTORCH_ALLOC_CONF": "expandable_segments:False"})  # torch's newer name wins
    assert "PYTORCH_CUDA_ALLOC_CONF" not in newer and newer["PYTORCH_ALLOC_CONF"] == "expandable_segments:False"


def test_kill9_mid_run_then_resume_matches_uninterrupted(char_data, tmp_path):
    kwargs = dict(max_steps=40, checkpoint_interval=5, eval_interval=10)
    reference = run_cli_train(tiny_train_config(char_data, tmp_path / "ref", **kwargs))  # same threads as below
    assert reference.wait(timeout=300) == 0
    victim = tiny_train_config(char_data, tmp_path / "victim", **kwargs)
    process = run_cli_train(victim)
    index = tmp_path / "victim" / "checkpoints" / "checkpoints.json"
    deadline = time.time() + 120
    while time.time() < deadline:
        if index.is_file() and json.loads(index.read_text())["checkpoints"][-1]["step"] >= 15:
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = json.loads(index.read_text())["checkpoints"][-1]["step"]
    assert 15 <= killed_at < 40, "the run finished before it could be killed"
    finisher = run_cli_train(victim)
    output, _ = finisher.communicate(timeout=300)
    assert finisher.returncode == 0, output
    assert f"resumed from step {killed_at}" in output
    assert train_losses(tmp_path / "victim") == train_losses(tmp_path / "ref")
    final = lambda d: load_latest(d / "checkpoints")["model"]
    for name, tensor in final(tmp_path / "ref").items():
        assert torch.equal(tensor, final(tmp_path / "victim")[name]), name


def test_hellaswag_that_cannot_be_scored_is_said_once_and_training_goes_on(char_data, tmp_path):
    lines = []
    trainer = Trainer(tiny_train_config(char_data, tmp_path / "run", max_steps=6, hellaswag_interval=2,
                                        eval_interval=0), echo=lines.append)
    trainer.fit()
    trainer.close()
    assert trainer.step == 6 and load_latest(tmp_path / "run" / "checkpoints")["step"] == 6
    skipped = [line for line in lines if line.startswith("HellaSwag skipped for this run")]
    assert len(skipped) == 1 and "char tokenizer" in skipped[0]
    assert read_metrics(tmp_path / "run", "hellaswag") == []


@pytest.mark.parametrize("change, message", [
    (dict(n_layer=1), r"other settings \(n_layer 2 there, 1 here\); resume with the checkpoint's settings \(nproc "
                      r"and micro_batch may change\), or use another out_dir"),
    (dict(recipe="speedrun"), r"other settings \(recipe None there, 'speedrun' here, optimizer 'adamw' there, 'muon' "
                              r"here, .*position 'absolute' there, 'rope' here.*\)"),
    (dict(recipe="gpt2"), r"other settings \(recipe None there, 'gpt2' here\)"),  # same model: still another run
    # the same test as `nbgpt run --resume` makes (TrainConfig.bound_settings): another batch reads other windows
    (dict(total_batch_tokens=16 * 32), r"other settings \(total_batch_tokens 256 there, 512 here\)"),
])
def test_resuming_with_another_model_or_recipe_is_refused(char_data, tmp_path, change, message):
    trainer = Trainer(tiny_train_config(char_data, tmp_path / "run", max_steps=2, checkpoint_interval=2))
    trainer.fit()
    trainer.close()
    with pytest.raises(CheckpointError, match=message):
        Trainer(tiny_train_config(char_data, tmp_path / "run", max_steps=4, **change))
    assert not (tmp_path / "run" / ".lock").exists()
    resumed = Trainer(tiny_train_config(char_data, tmp_path / "run", max_steps=4))  # the same settings continue
    assert resumed.step == 2
    resumed.close()


def test_a_checkpoint_saved_before_its_bound_settings_resumes_whatever_its_recipe_label(char_data, tmp_path):
    """Checkpoints written before "bound" was saved labelled a run that named no recipe 'gpt2'; such a run resumes
    with recipe=None (the label is not compared), and its model and optimizer still are."""
    trainer = Trainer(tiny_train_config(char_data, tmp_path / "run", max_steps=2, checkpoint_interval=2))
    trainer.fit()
    trainer.close()
    payload = load_latest(tmp_path / "run" / "checkpoints")
    assert payload["bound"]["recipe"] is None
    del payload["bound"]
    payload["train_config"]["recipe"] = "gpt2"
    save_checkpoint(tmp_path / "run" / "checkpoints", payload["step"], payload)
    resumed = Trainer(tiny_train_config(char_data, tmp_path / "run", max_steps=4))
    assert resumed.step == 2
    resumed.close()
    with pytest.raises(CheckpointError, match=r"other settings \(optimizer 'adamw' there, 'muon' here\)"):
        Trainer(tiny_train_config(char_data, tmp_path / "run", max_steps=4, optimizer="muon"))


def test_speedrun_recipe_trains_and_its_checkpoint_decodes_with_the_kv_cache(char_data, tmp_path):
    from nbgpt.generate import Generator, SamplingConfig
    from nbgpt.model_files import load_model
    from nbgpt.optim import Muon

    # a tiny char-level model takes a higher rate than the recipe's (given explicitly, it wins over the recipe)
    config = tiny_train_config(char_data, tmp_path / "run", recipe="speedrun", max_lr=1e-2, max_steps=40,
                               eval_interval=40, checkpoint_interval=40)
    trainer = Trainer(config)
    model_config = trainer.model_config
    assert (model_config.position, model_config.activation, model_config.qk_norm, model_config.zero_init_proj,
            model_config.tie_embeddings, model_config.logit_softcap) == ("rope", "relu2", True, True, False, 30.0)
    assert isinstance(trainer.optimizers[0], Muon) and config.schedule == "trapezoid"
    summary = trainer.fit()
    trainer.close()
    evals = read_metrics(tmp_path / "run", "eval")
    assert evals[0]["val_loss"] > 4.0 and summary["val_loss"] < evals[0]["val_loss"] - 1.0  # ln 65 = 4.17
    loaded = load_model(tmp_path / "run")
    assert loaded.model.config == model_config
    prompts, sampling = ["ROMEO:", "To be"], SamplingConfig(max_new_tokens=20, temperature=0.0, stop_at_eot=False)
    cached = Generator(loaded.model, loaded.tokenizer).generate(prompts, sampling)
    uncached = [Generator(loaded.model, loaded.tokenizer, use_cache=False).complete(p, sampling) for p in prompts]
    assert cached == uncached and all(len(text) == 20 for text in cached)


def test_embedding_lr_scale_gives_the_embeddings_their_own_rate(char_data, tmp_path):
    trainer = Trainer(tiny_train_config(char_data, tmp_path / "run", optimizer="muon", embedding_lr_scale=5.0))
    record = trainer.train_step()
    trainer.close()
    rates = {id(p): group["lr"] for o in trainer.optimizers for group in o.param_groups for p in group["params"]}
    assert rates[id(trainer.model.wte.weight)] == pytest.approx(5 * record["lr"])
    assert rates[id(trainer.model.h[0].attn.c_attn.weight)] == pytest.approx(record["lr"])
    assert rates[id(trainer.model.ln_f.weight)] == pytest.approx(record["lr"])


def test_a_signal_to_one_worker_stops_the_launch_as_a_signal_to_the_launcher_does(char_data, tmp_path, monkeypatch):
    """SIGTERM to one torchrun worker alone (a scheduler's, `kill PID`): the ranks agree, stop together with a
    checkpoint, and launch raises TrainingStopped naming the signal, not torchrun's failure of its workers."""
    import threading

    from nbgpt.distributed import launch
    from nbgpt.files import children
    from nbgpt.stop import TrainingStopped

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    run = tmp_path / "run"
    config = tiny_train_config(char_data, run, micro_batch=4, total_batch_tokens=8 * 32, max_steps=2000,
                               eval_interval=0, checkpoint_interval=0)

    def kill_one_worker_once_training() -> None:
        metrics = run / "metrics.jsonl"
        while not (metrics.is_file() and '"kind": "train"' in metrics.read_text()):
            time.sleep(0.1)
        workers = [pid for launcher in children(os.getpid()) for pid in children(launcher)]
        os.kill(max(workers), signal.SIGTERM)

    killer = threading.Thread(target=kill_one_worker_once_training, daemon=True)
    killer.start()
    with pytest.raises(TrainingStopped) as stopped:
        launch(config, nproc=2, echo=lambda line: None)
    assert stopped.value.signum == signal.SIGTERM and "stopped by SIGTERM with a checkpoint" in str(stopped.value)
    assert 1 <= load_latest(run / "checkpoints")["step"] < 2000
