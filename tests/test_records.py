"""What the notebooks show is what happened: evaluation points under a time budget, the schedule as logged,
no empty charts, attention weights that are the model's own, the optimizer's real parameter groups."""

import gc
import json
from dataclasses import replace

import matplotlib
import pytest
import torch

from conftest import tiny_train_config
from nbgpt.generate import Generator
from nbgpt.model import GPT, GPTConfig, attention_weights, causal_mask
from nbgpt.optim import param_groups
from nbgpt.metrics import read_metrics
from nbgpt.run import summarize
from nbgpt.schedule import evaluation_interval
from nbgpt.train import Trainer
from nbgpt.run_config import TrainConfig

matplotlib.use("Agg")


@pytest.mark.parametrize("max_seconds, max_steps, expected", [
    (None, 3152, 500),   # no budget: eval_interval as configured
    (180.0, 3152, 100),  # ~31 points over a 3,152-step run
    (180.0, 205, 10),    # ~20 points where the same budget only allows 205 steps
    (180.0, 30, 1),
    (180.0, 100_000, 500),  # eval_interval stays the upper bound
])
def test_evaluation_interval_follows_the_budget(max_seconds, max_steps, expected):
    config = TrainConfig(max_seconds=max_seconds, eval_interval=500)
    assert evaluation_interval(config, max_steps) == expected
    assert evaluation_interval(TrainConfig(max_seconds=max_seconds, eval_interval=0), max_steps) == 0


@pytest.fixture(scope="module")
def budget_run(char_data, tmp_path_factory):
    """A time-budgeted run whose budget is never the limit: max_steps ends it, eval_interval is far too big."""
    out = tmp_path_factory.mktemp("budget")
    trainer = Trainer(tiny_train_config(char_data, out, max_steps=40, max_seconds=3600.0, eval_interval=1000))
    trainer.fit()
    trainer.close()
    return out, trainer


def test_a_budgeted_run_evaluates_often_enough_to_draw_a_curve(budget_run):
    out, _ = budget_run
    assert [r["step"] for r in read_metrics(out, "eval")] == list(range(0, 40, 2)) + [40]


def test_schedule_figure_draws_the_logged_learning_rate_and_clip(budget_run):
    from nbgpt.plots import schedule_figure

    out, _ = budget_run
    train = read_metrics(out, "train")
    lr_axes, norm_axes = schedule_figure(out, grad_clip=1.0).axes
    assert list(lr_axes.get_lines()[0].get_ydata()) == [r["lr"] for r in train]
    assert list(norm_axes.get_lines()[0].get_ydata()) == [r["grad_norm"] for r in train]
    assert norm_axes.get_lines()[1].get_ydata()[0] == 1.0


def test_a_run_on_a_gpu_of_unknown_peak_logs_and_plots_without_mfu(budget_run, tmp_path):
    """A GPU missing from the peak table writes "mfu": null; progress lines and figures take that."""
    from nbgpt.metrics import MetricsLog
    from nbgpt.plots import loss_figure, schedule_figure
    from nbgpt.metrics import format_record

    out, _ = budget_run
    log = MetricsLog(tmp_path / "metrics.jsonl")
    for record in read_metrics(out):
        log.write({**record, "mfu": None} if record["kind"] == "train" else record)
    train = read_metrics(tmp_path, "train")
    assert train and all(r["mfu"] is None for r in train)
    line = format_record(train[-1], 40, 12.0, 0.3)
    assert " | MFU n/a | " in line and line.startswith("step     39/40 | loss ")
    assert format_record({**train[-1], "mfu": 0.1234}, 40, 12.0, 0.3).count(" | MFU 12.3% | ") == 1
    assert len(loss_figure(tmp_path).axes[0].get_lines()) >= 1
    assert list(schedule_figure(tmp_path).axes[0].get_lines()[0].get_ydata()) == [r["lr"] for r in train]


def test_evaluation_figure_has_no_empty_hellaswag_chart(budget_run):
    from nbgpt.plots import evaluation_figure

    out, _ = budget_run
    skipped = evaluation_figure(out, {"skipped": "no HellaSwag data offline"})
    assert len(skipped.axes) == 1
    assert any("no HellaSwag data offline" in t.get_text() for t in skipped.texts)
    assert len(evaluation_figure(out, {"acc_norm": 0.3, "count": 20}).axes) == 2


def test_param_groups_decay_matrices_only(budget_run):
    _, trainer = budget_run
    rows = param_groups(trainer.model, trainer.optimizers)
    assert [(r["dims"], r["weight_decay"]) for r in rows] == [("2-D", 0.1), ("1-D", 0.0)]
    assert sum(r["parameters"] for r in rows) == trainer.model.num_params()


def test_attention_weights_are_the_layers_own():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=16)).eval()
    idx = torch.randint(0, 50, (1, 12))
    caught = {}
    model.h[1].attn.c_proj.register_forward_pre_hook(lambda m, args: caught.update(y=args[0]))
    weights = attention_weights(model, idx, layer=1)  # (H, T, T)
    assert weights.shape == (2, 12, 12)
    assert torch.allclose(weights.sum(-1), torch.ones(2, 12))
    assert (weights[:, ~causal_mask(12)] == 0).all()  # nothing from the future
    # Re-weighting the layer's values with these weights gives exactly what the layer produced.
    x = model.h[0](model.wte(idx) + model.wpe(torch.arange(12)), None, None)
    v = model.h[1].attn.c_attn(model.h[1].ln_1(x)).split(16, dim=2)[2].view(1, 12, 2, 8).transpose(1, 2)
    y = (weights[None] @ v).transpose(1, 2).reshape(1, 12, 16)
    assert torch.allclose(y, caught["y"], atol=1e-5)
    # A Generator's inference copy (transposed fp32 weights) gives the same map.
    from nbgpt.tokenizer import CharTokenizer

    copy = Generator(model, CharTokenizer.from_text("abcdefghijklmnopqrstuvwxyz"), precision="fp32").model
    assert torch.allclose(attention_weights(copy, idx, layer=1), weights, atol=1e-5)


def test_speedup_table_times_what_this_machine_can_show(budget_run):
    from nbgpt.speedups import speedup_table

    out, trainer = budget_run
    models = lambda: sum(isinstance(o, GPT) for o in gc.get_objects())
    before = models()
    rows = {r["speed-up"]: r for r in speedup_table(trainer.config)}
    gc.collect()
    assert models() == before  # its model (and what it holds) is gone with the call
    assert set(rows) >= {"TF32 matmuls", "torch.compile", "flash attention", "fused AdamW", "vocab 50257 → 50304"}
    for name in ("flash attention", "fused AdamW", "vocab 50257 → 50304"):
        assert float(rows[name]["baseline ms"]) > 0 and float(rows[name]["speed-up ×"]) > 0
    if not torch.cuda.is_available():
        assert rows["TF32 matmuls"]["speed-up ×"].startswith("needs a GPU")


def test_speedup_table_times_a_small_micro_batch_on_gpus_only():
    from nbgpt.speedups import SPEEDUP_MICRO_BATCH, timing_micro_batch

    assert SPEEDUP_MICRO_BATCH == 4
    assert timing_micro_batch(64, "cuda") == 4 and timing_micro_batch(2, "cuda") == 2
    assert timing_micro_batch(64, "cpu") == 64  # a CPU times the run's own shapes
    assert timing_micro_batch("auto", "cuda") == 4


def timed_models(fn) -> tuple[object, list[int]]:
    """fn()'s result and the depth (n_layer) of every GPT that ran a forward pass on real tensors while it ran
    (the memory plan's traces run on fake ones)."""
    from torch._subclasses.fake_tensor import FakeTensor

    seen = []
    hook = torch.nn.modules.module.register_module_forward_pre_hook(
        lambda module, args: seen.append(module.config.n_layer)
        if isinstance(module, GPT) and not isinstance(args[0], FakeTensor) else None)
    try:
        return fn(), seen
    finally:
        hook.remove()


def test_speedup_table_times_a_stand_in_that_fits_the_gpu_it_is_sized_for(char_data, tmp_path):
    """A GPU too small for the whole model (its size given, as on a CPU it must be): the table times fewer
    layers of the same width, the deepest the memory plan says fit, and says so in every row; with no room
    for even one layer every row says why it was skipped and no model runs; sized for no GPU (a CPU), the
    whole model is timed as before."""
    from nbgpt.memory import MARGIN, NON_TORCH_GIB, speedup_cell, speedup_cell_for
    from nbgpt.speedups import speedup_table

    config = tiny_train_config(char_data, tmp_path, n_layer=6, micro_batch=2)
    model = config.model_config(256)
    rows, depths = timed_models(lambda: speedup_table(config))
    assert set(depths) == {6} and {r["timed on"] for r in rows} == {"the whole model (6 layers)"}
    whole = speedup_cell(model, 32, "bf16", 2, 1000.0)
    assert whole.layers == 6 and whole.peak_gib == whole.whole_gib > 0
    memory = 0.6 * whole.whole_gib / (1 - MARGIN) + NON_TORCH_GIB  # leaves torch 60 % of the whole model's peak
    cell = speedup_cell(model, 32, "bf16", 2, memory)
    assert 0 < cell.layers < 6 and cell.peak_gib <= cell.budget_gib < cell.whole_gib
    assert speedup_cell(replace(model, n_layer=cell.layers + 1), 32, "bf16", 2, 1000.0).peak_gib > cell.budget_gib
    rows, depths = timed_models(lambda: speedup_table(config, speedup_cell_for(config, memory)))
    assert depths and set(depths) == {cell.layers}  # the stand-in is what ran
    assert {r["timed on"] for r in rows} == {cell.timed_on}
    assert cell.timed_on.startswith(f"a stand-in: {cell.layers} of 6 layers, same width, heads and vocabulary")
    need = f"the whole model would need {cell.whole_gib:.2f} GiB of the {cell.budget_gib:.2f} GiB usable"
    assert need in cell.timed_on
    assert float(next(r for r in rows if r["speed-up"] == "fused AdamW")["speed-up ×"]) > 0
    rows, depths = timed_models(lambda: speedup_table(config, speedup_cell_for(config, NON_TORCH_GIB + 1e-6)))
    assert not depths and len(rows) == 6
    assert all(r["speed-up ×"].startswith("skipped: not even 1 layer of this width fits") for r in rows)


def nbgpt_cli(*args, cwd=None):
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "nbgpt", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=env, cwd=cwd)


TINY_FLAGS = ("--model", "tiny", "--block-size", 32, "--micro-batch", 8, "--total-batch-tokens", 256,
              "--warmup-steps", 3, "--eval-batches", 2, "--precision", "fp32", "--log-interval", 5)


def test_a_budget_that_ends_training_early_says_so_in_one_line(char_data, tmp_path):
    """A slow or busy machine reaches fewer of max_steps in max_seconds: the terminal and train.log say so
    once, with the share of the speed and the budget that would give the full run."""
    out = tmp_path / "short"
    done = nbgpt_cli("train", "--data-dir", char_data, "--out-dir", out, *TINY_FLAGS, "--max-steps", 1_000_000,
                     "--max-seconds", 2, "--eval-interval", 0)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line for line in done.stdout.splitlines() if "ended training after" in line]
    assert len(lines) == 1, done.stdout[-3000:]
    assert "of max_steps=1,000,000 steps" in lines[0] and "0% of the speed" in lines[0]
    assert "max_seconds=" in lines[0] and "make demo ARGS=" in lines[0]
    assert (out / "train.log").read_text().count(lines[0]) == 1
    assert summarize(out, []).warnings == [lines[0]]  # `nbgpt run` repeats it under its final summary


def test_a_budget_that_is_not_the_limit_says_nothing(budget_run):
    out, _ = budget_run
    assert "ended training after" not in (out / "train.log").read_text()


def test_redirected_output_is_whole_lines_and_a_resume_past_max_steps_says_it_trained_nothing(char_data, tmp_path):
    """`nbgpt train > log 2>&1`: no carriage-return bars glued onto the log's lines; the final evaluation over
    the whole split is labelled as such (record, line, plot); resuming a run already past max_steps says that
    nothing was trained and keeps the checkpoint's final evaluation as the last one."""
    import os
    import subprocess
    import sys

    from nbgpt.plots import loss_figure

    out, log = tmp_path / "run", tmp_path / "train.out"
    flags = ["--data-dir", str(char_data), "--out-dir", str(out), *map(str, TINY_FLAGS), "--eval-interval", "3",
             "--final-eval-batches", "0", "--checkpoint-interval", "3"]
    with open(log, "w") as f:
        first = subprocess.run([sys.executable, "-m", "nbgpt", "train", *flags, "--max-steps", "6"], stdout=f,
                               stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    text = log.read_text()
    assert first.returncode == 0, text[-2000:]
    assert "\r" not in text
    glued = [line for line in text.splitlines()
             if ("training:" in line and not line.startswith("training:"))
             or ("| loss" in line and not line.startswith("step "))]
    assert not glued, glued
    evals = read_metrics(out, "eval")
    assert [(r["step"], r["val_batches"], r["whole_split"]) for r in evals[:-1]] == [(0, 2, False), (3, 2, False)]
    final = evals[-1]
    assert final["step"] == 6 and final["whole_split"] and final["val_batches"] > 2
    scope = f"(whole validation split, {final['val_batches']} batches)"
    assert f"step      6 | val loss {final['val_loss']:.4f} {scope}" in text
    labels = [line.get_label() for line in loss_figure(out).axes[0].get_lines()]
    assert "validation loss (2 batches)" in labels
    assert f"validation loss (whole validation split, {final['val_batches']} batches)" in labels

    again = nbgpt_cli("train", *flags, "--max-steps", 4)
    assert again.returncode == 0, again.stderr[-2000:]
    said = [line for line in again.stdout.splitlines() if "nothing was trained" in line]
    assert len(said) == 1 and "step 6, already at or past max_steps=4" in said[0] and "-p max_steps 12" in said[0]
    assert (out / "train.log").read_text().count(said[0]) == 1
    assert read_metrics(out, "eval")[-1] == final  # the checkpoint's own final evaluation, not step 3's
    assert json.loads(again.stdout.splitlines()[-1])["val_loss"] == final["val_loss"]


def test_resuming_a_finished_budget_run_says_why_nothing_trains(char_data, tmp_path):
    """A time-budgeted run keeps the horizon its budget fitted: resumed with a larger max_steps it still ends
    where it ended, and says so (with what does train longer) rather than reporting an old loss silently."""
    lines = []
    done = Trainer(tiny_train_config(char_data, tmp_path, max_steps=6, max_seconds=3600.0, eval_interval=0))
    done.fit()
    done.close()
    again = Trainer(tiny_train_config(char_data, tmp_path, max_steps=12, max_seconds=3600.0, eval_interval=0),
                    echo=lines.append)
    assert again.fit()["step"] == 6
    again.close()
    said = [line for line in lines if "nothing was trained" in line]
    assert len(said) == 1 and "a resumed run keeps that schedule" in said[0] and "larger max_seconds" in said[0]
