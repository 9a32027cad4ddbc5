"""The lecture's speed-ups, each timed on this machine at the run's own shapes: what it buys, here and now.

Every row times a baseline and the same work with one speed-up, a few repetitions each (the best is kept:
the least disturbed by other work on the machine). A speed-up that this hardware cannot show says why.

On a GPU the table runs in the notebook's kernel, before training starts in processes of its own on the same
GPUs: it times at most SPEEDUP_MICRO_BATCH sequences (an fp32 eager step at GPT-2's micro-batch of 64 would
need ~86 GiB), and gives back all it allocated before it returns.
"""

from __future__ import annotations

import gc
import time
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F

from .device import DTYPES, choose_precision, cpu_has_native_bf16, resolve_device, synchronize
from .model import GPT, GPTConfig, attention_probs
from .shards import TokenStore

if TYPE_CHECKING:
    from .run_config import TrainConfig

# The micro-batch the cell times on a GPU at most: the speed-ups show at any size, and the cell must leave the
# GPU's memory to training (nbgpt.memory plans this cell's peak at min(micro_batch, SPEEDUP_MICRO_BATCH)).
SPEEDUP_MICRO_BATCH = 4



def best_time(fn: Callable[[], object], device: torch.device, repeats: int = 3) -> float:
    """Seconds of the fastest of `repeats` calls, after one warm-up call (allocations, kernel choice)."""
    fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return min(times)


def _row(name: str, what: str, device: torch.device, baseline=None, faster=None, why_not: str = "") -> dict:
    row = {"speed-up": name, "what it does": what}
    if why_not:
        return {**row, "baseline ms": "", "with it ms": "", "speed-up ×": why_not}
    base, fast = best_time(baseline, device), best_time(faster, device)
    return {**row, "baseline ms": f"{1e3 * base:.2f}", "with it ms": f"{1e3 * fast:.2f}",
            "speed-up ×": f"{base / fast:.2f}"}


def train_step(model: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype | None) -> Callable[[], None]:
    """One forward + backward on x (autocast to `dtype` if given), to call: what the rows time and
    nbgpt.memory prices."""
    def step() -> None:
        with torch.autocast(x.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            _, loss = model(x, x)
        loss.backward()
    return step


def timing_micro_batch(micro_batch: int | str, device: torch.device) -> int:
    """The sequences per timed step: the run's micro-batch, at most SPEEDUP_MICRO_BATCH on a GPU. This cell runs
    before the trainer resolves micro_batch="auto", which times SPEEDUP_MICRO_BATCH sequences."""
    if not isinstance(micro_batch, int):
        return SPEEDUP_MICRO_BATCH
    return min(micro_batch, SPEEDUP_MICRO_BATCH) if device.type == "cuda" else micro_batch


def speedup_table(train: TrainConfig) -> list[dict]:
    """Rows of {speed-up, what it does, baseline ms, with it ms, speed-up ×} for one micro-batch of the
    run's model on its device (fresh weights: speed does not depend on what was learned). Returns holding
    nothing on the device: the GPU memory it used is back with the driver, for the training processes."""
    device = resolve_device(train.device)
    config = train.model_config(TokenStore(train.data_dir).tokenizer().vocab_size)
    try:
        return _timed_rows(config, timing_micro_batch(train.micro_batch, device), train.seq_len or config.block_size,
                           device)
    finally:  # the rows' model, batch, optimizers and compiled code went out of scope with _timed_rows
        if device.type == "cuda":
            torch.compiler.reset()  # compiled code keeps what it was compiled for alive
            gc.collect()
            torch.cuda.empty_cache()


def _timed_rows(config: GPTConfig, micro_batch: int, seq_len: int, device: torch.device) -> list[dict]:
    cuda = device.type == "cuda"
    model = GPT(config).to(device)
    x = torch.randint(0, config.vocab_size, (micro_batch, seq_len), device=device)
    fast = choose_precision(device, "auto")
    gpu_only = "needs a GPU"
    rows = [
        _row("TF32 matmuls", "fp32 matmuls on tensor cores with a 10-bit mantissa", device,
             *_tf32(model, x) if cuda else (), why_not="" if cuda and _ampere(device) else gpu_only + " (Ampere+)"),
        _row(f"{fast} autocast" if fast != "fp32" else "bf16 autocast",
             "matmuls in 16 bits, weights and sums kept in fp32", device,
             train_step(model, x, None), train_step(model, x, DTYPES[fast]),
             why_not="" if fast != "fp32" else _no_fast_precision(device)),
        _row("torch.compile", "fuses the elementwise ops between matmuls into fewer kernels", device,
             *_compiled(model, x) if cuda else (),
             why_not="" if cuda else gpu_only + " (compiling takes minutes on a CPU)"),
        _row("flash attention", "softmax(qkᵀ)v in one fused kernel, never storing the T×T scores", device,
             *attention_pair(config, micro_batch, seq_len, device, DTYPES[fast])),
        _row("fused AdamW", "one kernel updates every parameter instead of one loop per tensor", device,
             *adamw_pair(model)),
        _row("vocab 50257 → 50304", "the LM head's matmul at GPT-2's vocabulary, padded to a multiple of 64", device,
             *_vocab_pair(config.n_embd, min(micro_batch * seq_len, 512), device)),
    ]
    return rows


def _ampere(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device)[0] >= 8


def _no_fast_precision(device: torch.device) -> str:
    if device.type == "cpu" and not cpu_has_native_bf16():
        return "this CPU has no native bf16 (emulated: many times slower)"
    return "no fast 16-bit matmuls on this device"


def _tf32(model, x):
    def with_precision(level: str):
        def step() -> None:
            torch.set_float32_matmul_precision(level)
            try:
                train_step(model, x, None)()
            finally:
                torch.set_float32_matmul_precision("high")
        return step
    return with_precision("highest"), with_precision("high")


def _compiled(model, x):
    return train_step(model, x, None), train_step(torch.compile(model), x, None)


def attention_pair(config: GPTConfig, batch: int, T: int, device: torch.device, dtype: torch.dtype):
    """(explicit, fused): causal attention forward + backward over random (batch, H, T, D) q, k, v."""
    shape = (batch, config.n_head, T, config.head_size)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(3))

    def explicit() -> None:  # the (B, H, T, T) score matrix is built, stored for backward, and read again
        (attention_probs(q, k).to(v.dtype) @ v).sum().backward()

    def fused() -> None:
        F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
    return explicit, fused


def adamw_pair(model: torch.nn.Module):
    """(loop, fused): one AdamW step over `model`'s parameters, given random gradients."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    loop = torch.optim.AdamW(params, lr=1e-4, foreach=False)
    fused = torch.optim.AdamW(params, lr=1e-4, fused=True)
    return loop.step, fused.step


def _vocab_pair(n_embd: int, tokens: int, device: torch.device):
    x = torch.randn(tokens, n_embd, device=device)
    weights = {v: torch.randn(v, n_embd, device=device) for v in (50257, 50304)}
    return (lambda: x @ weights[50257].t()), (lambda: x @ weights[50304].t())
