"""Named runs of the five-notebook pipeline: every papermill parameter, by preset.

Keys are the flat knob names of nbgpt.run_config (fields of its step dataclasses, TrainConfig and GPTConfig);
anything a preset leaves out keeps its knob's default, or its recipe's value where it names one (a preset that
names a recipe sets none of the recipe's knobs: the recipe would overrule them).
"""

from __future__ import annotations

from typing import Callable

import torch

from .knobs import ConfigError, did_you_mean
from .device import choose_precision

RUN_PRESETS: dict[str, dict] = {
    # Seconds, not minutes: every notebook end to end on a tiny model (used by the test suite).
    "tiny": dict(
        source="shakespeare", tokenizer="char", shard_tokens=2_000_000, val_fraction=0.1,
        model="tiny", bigram_steps=30, total_batch_tokens=16 * 64, micro_batch=16, max_steps=30, max_lr=3e-3,
        warmup_steps=5, eval_interval=10, checkpoint_interval=10, eval_batches=4, precision="auto",
        hellaswag_limit=20, prompt="ROMEO:", max_new_tokens=60, num_return_sequences=2,
    ),
    # The laptop demo: Shakespeare's complete works, character level, the small GPT and schedule that won the
    # CPU time-to-quality sweep (bench/RESULTS.md): 4 layers x 128, context 64, Muon + AdamW at peak LR 1e-2
    # and a cosine to zero; precision and batch from `cpu_settings`. A fixed number of steps, so that the result
    # does not depend on how busy the machine is: 3,000 steps end at ~1.53 (bf16) and ~1.65 (fp32), taking
    # ~3 minutes on 2 quiet cores. max_seconds is a cap for a slow or busy machine: the cosine is then fitted
    # to it, and the run says how much slower it was and what budget would give the full result.
    "cpu-demo": dict(
        source="shakespeare", tokenizer="char", shard_tokens=10_000_000, val_fraction=0.1,
        model="cpu-char", bigram_steps=200, max_steps=3_000, max_seconds=600.0, optimizer="muon", max_lr=1e-2,
        min_lr_ratio=0.0, warmup_steps=30, eval_interval=500, eval_batches=8, final_eval_batches=0,
        checkpoint_interval=1000, log_interval=100, weight_decay=0.1, prompt="ROMEO:\n", max_new_tokens=400,
        num_return_sequences=2, temperature=0.8, top_k=40,
    ),
    # build-nanogpt's GPT-2 (124M) recipe on FineWeb-Edu 10B tokens, one 8×A100/H100 node.
    "gpt2-124m": dict(
        recipe="gpt2", source="fineweb-edu", tokenizer="gpt2", shard_tokens=100_000_000, val_tokens=100_000_000,
        prepare_workers=8, model="gpt2", vocab_multiple=64, bigram_steps=200, total_batch_tokens=524_288,
        micro_batch="auto", max_steps=19_073, warmup_steps=715, eval_interval=250, eval_batches=20,
        hellaswag_interval=250, checkpoint_interval=1000, keep_checkpoints=3, precision="auto", compile=True,
        nproc=8, prompt="Hello, I'm a language model,", max_new_tokens=64, num_return_sequences=4, top_k=50,
    ),
    # The same recipe on Kaggle's free 2×T4 (16 GB each, no bf16): fp16 + GradScaler, both GPUs through the
    # launcher, as many 1024-token sequences per micro-batch as fit a T4 (nbgpt plan: 8, with 32 accumulation
    # steps), and a checkpoint every ~30 minutes
    # so a 12-hour session limit costs little; `nbgpt run --preset gpt2-124m-t4x2 --resume` continues.
    "gpt2-124m-t4x2": dict(
        recipe="gpt2", source="fineweb-edu", tokenizer="gpt2", shard_tokens=100_000_000, val_tokens=100_000_000,
        prepare_workers=4, model="gpt2", vocab_multiple=64, bigram_steps=200, total_batch_tokens=524_288,
        micro_batch="auto", max_steps=19_073, warmup_steps=715, eval_interval=250, eval_batches=10,
        hellaswag_interval=1000, hellaswag_limit=2000, checkpoint_interval=100, keep_checkpoints=2,
        precision="fp16", compile=False, nproc=2, prompt="Hello, I'm a language model,", max_new_tokens=64,
        num_return_sequences=4, top_k=50,
    ),
    # The speedrun recipe (nbgpt.run_config) at GPT-2 124M's size on one 8×A100/H100 node, same data and batch as
    # gpt2-124m. The token budget is provisional: 3.0B tokens (5,722 steps of 0.5M), 30 % of gpt2-124m's 10B,
    # because the modded-nanogpt records that reached GPT-2's FineWeb loss with these techniques trained on a
    # few billion tokens; it is to be replaced by a measured time-to-loss. Learning rates, optimizer, schedule
    # (warm-up included) and architecture come from the recipe, so this entry sets none of them. It prepares
    # the whole sample (no max_tokens): while the budget is provisional a longer trial should find fresh
    # tokens, and such a node has the disk.
    "gpt2-124m-speedrun": dict(
        recipe="speedrun", source="fineweb-edu", tokenizer="gpt2", shard_tokens=100_000_000,
        val_tokens=100_000_000, prepare_workers=8, model="gpt2", vocab_multiple=64, bigram_steps=200,
        total_batch_tokens=524_288, micro_batch="auto", max_steps=5_722, eval_interval=250,
        eval_batches=20, hellaswag_interval=250, checkpoint_interval=1000, keep_checkpoints=3, precision="auto",
        compile=True, nproc=8, prompt="Hello, I'm a language model,", max_new_tokens=64, num_return_sequences=4,
        top_k=50,
    ),
    # The speedrun recipe on Kaggle's 2×T4, laid out as gpt2-124m-t4x2 (fp16 + GradScaler; Muon
    # orthogonalises in fp32 there, nbgpt.device.fast_dtype). Sized for at most 30 hours of 2×T4: at the
    # projected ~17 s per 0.5M-token step (bench/t4_plan.py: no T4 measured yet), 5,000 steps (2.6B tokens)
    # take ~24 h; max_seconds caps the run at 30 h of training wherever the time goes, the trapezoid's
    # cooldown fitted to it. A checkpoint every 100 steps is ~30 minutes, so a 12-hour session limit costs
    # little. max_tokens prepares
    # only what the run reads: 100 M validation + 5,000 × 524,288 training tokens = 2,721,440,000, rounded up
    # to 28 whole shards of 100 M: 2.8 B tokens, 5.6 GB of uint16, where the whole 10 B sample (~20 GB) is more
    # than the 20 GB Kaggle keeps. A longer run (-p max_steps) needs a larger -p max_tokens, or it reads the
    # same tokens twice (the loader starts a second epoch).
    "gpt2-124m-speedrun-t4x2": dict(
        recipe="speedrun", source="fineweb-edu", tokenizer="gpt2", shard_tokens=100_000_000,
        val_tokens=100_000_000, max_tokens=2_800_000_000, prepare_workers=4, model="gpt2", vocab_multiple=64,
        bigram_steps=200, total_batch_tokens=524_288, micro_batch="auto", max_steps=5_000, max_seconds=30 * 3600.0,
        eval_interval=250, eval_batches=10, hellaswag_interval=1000, hellaswag_limit=2000,
        checkpoint_interval=100, keep_checkpoints=2, precision="fp16", compile=False, nproc=2,
        prompt="Hello, I'm a language model,", max_new_tokens=64, num_return_sequences=4, top_k=50,
    ),
    # GPT-3 Small (125M) as the GPT-3 paper trained it (Table 2.1), on build-nanogpt's data: a 2048-token
    # context, 0.5M-token steps (2^19 = 256 sequences), peak LR 6e-4, AdamW (0.9, 0.95), weight decay 0.1,
    # clipping at 1.0, warmup over 375M tokens (715 steps of 2^19) and a cosine to 10 % of the peak. The paper
    # trained on 300B tokens and decayed over 260B; this runs FineWeb-Edu's 10B sample (19,073 steps), about
    # what gpt2-124m costs, with the cosine over the whole run. Dense attention in every layer (the paper
    # alternated dense and locally banded sparse layers), as build-nanogpt does. One 8×A100/H100 node.
    "gpt3-small": dict(
        source="fineweb-edu", tokenizer="gpt2", shard_tokens=100_000_000, val_tokens=100_000_000,
        prepare_workers=8, model="gpt3-small", vocab_multiple=64, bigram_steps=200, total_batch_tokens=524_288,
        micro_batch="auto", max_steps=19_073, max_lr=6e-4, min_lr_ratio=0.1, warmup_steps=715, eval_interval=250,
        eval_batches=20, hellaswag_interval=250, checkpoint_interval=1000, keep_checkpoints=3, precision="auto",
        compile=True, nproc=8, prompt="Hello, I'm a language model,", max_new_tokens=64, num_return_sequences=4,
        top_k=50,
    ),
    # GPT-3 XL (1.3B), Table 2.1's recipe: 1M-token steps (2^20 = 512 sequences of 2048), peak LR 2e-4, warmup
    # over 375M tokens (358 steps of 2^20), cosine to 10 %, dense attention as above. 10B tokens of FineWeb-Edu
    # (9,537 steps; about 7 hours of an 8×H100 node at 40 % MFU) where the paper trained on 300B. Weights,
    # gradients and AdamW moments (16 bytes per parameter, ~20 GiB) are sharded over the 8 GPUs (parallel
    # fsdp, nbgpt.distributed). HellaSwag is scored on the final checkpoint (notebook 04); -p hellaswag_interval
    # scores it during training too, through the shards.
    "gpt3-xl": dict(
        source="fineweb-edu", tokenizer="gpt2", shard_tokens=100_000_000, val_tokens=100_000_000,
        prepare_workers=8, model="gpt3-xl", vocab_multiple=64, bigram_steps=200, total_batch_tokens=1_048_576,
        micro_batch="auto", max_steps=9_537, max_lr=2e-4, min_lr_ratio=0.1, warmup_steps=358, eval_interval=250,
        eval_batches=40, hellaswag_interval=0, checkpoint_interval=500, keep_checkpoints=2, precision="auto",
        compile=True, parallel="fsdp", nproc=8, prompt="Hello, I'm a language model,", max_new_tokens=64,
        num_return_sequences=4, top_k=50,
    ),
}


# Sequences of 64 tokens per optimizer step for the CPU demo model, by the precision the CPU runs fastest.
# bf16: 32, the winner of the time-to-quality sweep. fp32, two to three times slower: half that, so a CPU without
# fast bf16 still makes about as many updates in its budget; not less, because Muon's per-step cost does not
# shrink with the batch (bench/RESULTS.md, "Every CPU", has the measurements).
CPU_BATCH = {"bf16": 32, "fp32": 16}


def cpu_settings(precision: str = "auto") -> dict:
    """The CPU demo's precision and batch for this machine: "auto" resolves to what a measured matmul says
    the CPU is fast at (see `nbgpt.device.choose_precision`), and the batch follows that precision."""
    precision = choose_precision(torch.device("cpu"), precision)
    micro_batch = CPU_BATCH[precision if precision in CPU_BATCH else "fp32"]
    return dict(precision=precision, micro_batch=micro_batch, total_batch_tokens=micro_batch * 64)


# Presets completed at lookup time by a function of this machine's measured speed.
MEASURED_PRESETS: dict[str, Callable[[], dict]] = {"cpu-demo": cpu_settings}


def get_preset(name: str) -> dict:
    """The flat values of run preset `name`: the table's, completed by this machine's measurements."""
    if name not in RUN_PRESETS:
        raise ConfigError(f"unknown run preset {name!r}{did_you_mean(name, RUN_PRESETS)}; choose one of "
                          f"{sorted(RUN_PRESETS)}")
    measured = MEASURED_PRESETS.get(name)
    return {**RUN_PRESETS[name], **(measured() if measured else {})}
