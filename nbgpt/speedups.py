"""The lecture's speed-ups, each timed on this machine at the run's own shapes: what it buys, here and now.

Every row times a baseline and the same work with one speed-up, a few repetitions each (the best is kept:
the least disturbed by other work on the machine). A speed-up that this hardware cannot show says why.

On a GPU the table runs in the notebook's kernel, before training starts in processes of its own on the same
GPUs: it times at most SPEEDUP_MICRO_BATCH sequences, gives back all it allocated before it returns, and times
the model the memory plan says fits the card (nbgpt.memory.speedup_cell_for, which traces this very work on
fake tensors). An fp32 model with its gradients and two AdamWs' moments needs ~24 bytes per parameter in one
process, whatever `parallel` the run trains with: ~35 GiB for GPT-2 XL. Where the whole model does not fit, a
stand-in of the same width, heads and vocabulary with fewer layers is timed instead, and every row says so
("timed on"): the speed-ups act layer by layer (each matmul, attention, optimizer update), so their ratios stay
meaningful.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F

from .device import DTYPES, choose_precision, cpu_has_native_bf16, resolve_device, synchronize
from .model import GPT, GPTConfig, attention_probs
from .shards import TokenStore

if TYPE_CHECKING:
    from .run_config import TrainConfig

# The micro-batch the cell times on a GPU at most: the speed-ups show at any size, and the cell must leave the
# GPU's memory to training (an fp32 eager step of GPT-2 at its micro-batch of 64 would need ~86 GiB).
SPEEDUP_MICRO_BATCH = 4


def timing_micro_batch(micro_batch: int | str, device_type: str) -> int:
    """The sequences per timed step: the run's micro-batch, at most SPEEDUP_MICRO_BATCH on a GPU. The cell runs
    before the trainer resolves micro_batch="auto", which times SPEEDUP_MICRO_BATCH sequences."""
    if not isinstance(micro_batch, int):
        return SPEEDUP_MICRO_BATCH
    return min(micro_batch, SPEEDUP_MICRO_BATCH) if device_type == "cuda" else micro_batch


def forward_backward(model: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype | None
                     ) -> Callable[[], None]:
    """One forward + backward of `model` on x (B, T), in fp32 (dtype None) or under autocast to `dtype`."""
    def step() -> None:
        with torch.autocast(x.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            _, loss = model(x, x)
        loss.backward()
    return step


def attention_pair(config: GPTConfig, batch: int, T: int, device: torch.device, dtype: torch.dtype):
    """(explicit, fused) causal attention, forward + backward, over one layer's (B, H, T, D) queries."""
    shape = (batch, config.n_head, T, config.head_size)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(3))

    def explicit() -> None:  # the (B, H, T, T) score matrix is built, stored for backward, and read again
        (attention_probs(q, k).to(v.dtype) @ v).sum().backward()

    def fused() -> None:
        F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
    return explicit, fused


def adamw_pair(model: torch.nn.Module):
    """(per-tensor loop, fused) AdamW steps over the model's parameters, which get small random gradients."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    loop = torch.optim.AdamW(params, lr=1e-4, foreach=False)
    fused = torch.optim.AdamW(params, lr=1e-4, fused=True)
    return loop.step, fused.step


@dataclass(frozen=True)
class SpeedupCell:
    """The model notebook 03's speed-up cell times on a GPU, and what it needs there."""

    n_layer: int  # the run's model's blocks
    layers: int  # the blocks of the model the cell times: n_layer (the whole model), fewer, or 0 (nothing fits)
    whole_gib: float  # the cell's peak on the whole model
    peak_gib: float  # its peak as it runs (0: it times nothing)
    budget_gib: float  # what the plan lets torch use on that GPU

    @property
    def timed_on(self) -> str:
        """One line for the table: what was timed and, for a stand-in, why."""
        if self.layers == self.n_layer:
            return f"the whole model ({self.n_layer} layers)"
        need = f"the whole model would need {self.whole_gib:.2f} GiB of the {self.budget_gib:.2f} GiB usable"
        if not self.layers:
            return f"skipped: not even 1 layer of this width fits ({need})"
        return (f"a stand-in: {self.layers} of {self.n_layer} layers, same width, heads and vocabulary "
                f"({self.peak_gib:.2f} GiB; {need}): speed-ups act per layer, so the ratios hold")


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


def cell_shapes(train: TrainConfig) -> tuple[GPTConfig, int, int, str, torch.device]:
    """(model, sequences, seq_len, fast 16-bit precision, device) of the table for a run: the run's model on its
    device (fresh weights: speed does not depend on what was learned), one micro-batch at the run's seq_len."""
    device = resolve_device(train.device)
    config = train.model_config(TokenStore(train.data_dir).tokenizer().vocab_size)
    batch = timing_micro_batch(train.micro_batch, device.type)
    return config, batch, train.seq_len or config.block_size, choose_precision(device, "auto"), device


def speedup_table(train: TrainConfig, cell: SpeedupCell | None = None) -> list[dict]:
    """Rows of {speed-up, what it does, baseline ms, with it ms, speed-up ×, timed on} for one micro-batch of
    the run's model (cell_shapes), or of the model `cell` says fits the GPU (nbgpt.memory.speedup_cell_for;
    None: the whole model). Returns holding nothing on the device: the GPU memory it used is back with the
    driver, for the training processes."""
    config, batch, seq_len, fast, device = cell_shapes(train)
    timed_on = cell.timed_on if cell else f"the whole model ({config.n_layer} layers)"
    if cell and not cell.layers:
        return [_row(name, what, device, why_not=timed_on) | {"timed on": timed_on} for name, what in _described(fast)]
    try:
        rows = _timed_rows(replace(config, n_layer=cell.layers) if cell else config, batch, seq_len, device, fast)
        return [row | {"timed on": timed_on} for row in rows]
    finally:  # the rows' model, batch, optimizers and compiled code went out of scope with _timed_rows
        if device.type == "cuda":
            torch.compiler.reset()  # compiled code keeps what it was compiled for alive
            gc.collect()
            torch.cuda.empty_cache()


def _described(fast: str) -> tuple[tuple[str, str], ...]:
    """(name, what it does) of every row, in the table's order."""
    return (("TF32 matmuls", "fp32 matmuls on tensor cores with a 10-bit mantissa"),
            (f"{fast if fast != 'fp32' else 'bf16'} autocast", "matmuls in 16 bits, weights and sums kept in fp32"),
            ("torch.compile", "fuses the elementwise ops between matmuls into fewer kernels"),
            ("flash attention", "softmax(qkᵀ)v in one fused kernel, never storing the T×T scores"),
            ("fused AdamW", "one kernel updates every parameter instead of one loop per tensor"),
            ("vocab 50257 → 50304", "the LM head's matmul at GPT-2's vocabulary, padded to a multiple of 64"))


def _timed_rows(config: GPTConfig, micro_batch: int, seq_len: int, device: torch.device, fast: str) -> list[dict]:
    cuda = device.type == "cuda"
    model = GPT(config).to(device)
    x = torch.randint(0, config.vocab_size, (micro_batch, seq_len), device=device)
    gpu_only = "needs a GPU"
    # Each pair is built just before it is timed and dropped after: never two rows' tensors at once.
    pairs = (lambda: _tf32(model, x),
             lambda: (forward_backward(model, x, None), forward_backward(model, x, DTYPES[fast])),
             lambda: _compiled(model, x),
             lambda: attention_pair(config, micro_batch, seq_len, device, DTYPES[fast]),
             lambda: adamw_pair(model),
             lambda: _vocab_pair(config.n_embd, min(micro_batch * seq_len, 512), device))
    why_not = ("" if cuda and _ampere(device) else gpu_only + " (Ampere+)",
               "" if fast != "fp32" else _no_fast_precision(device),
               "" if cuda else "skipped on a CPU: compiling takes minutes here (compile=True still compiles training)",
               "", "", "")
    return [_row(name, what, device, *(() if why else pair()), why_not=why)
            for (name, what), pair, why in zip(_described(fast), pairs, why_not)]


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
                forward_backward(model, x, None)()
            finally:
                torch.set_float32_matmul_precision("high")
        return step
    return with_precision("highest"), with_precision("high")


def _compiled(model, x):
    return forward_backward(model, x, None), forward_backward(torch.compile(model), x, None)


def _vocab_pair(n_embd: int, tokens: int, device: torch.device):
    x = torch.randn(tokens, n_embd, device=device)
    weights = {v: torch.randn(v, n_embd, device=device) for v in (50257, 50304)}
    return (lambda: x @ weights[50257].t()), (lambda: x @ weights[50304].t())
