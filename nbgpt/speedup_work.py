"""The work notebook 03's speed-up cell times, apart from the timing (nbgpt.speedups): the memory plan
(nbgpt.memory) traces these very calls on fake tensors to price the cell, and sizes the model it times.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .model import GPTConfig, attention_probs

# The micro-batch the cell times on a GPU at most: the speed-ups show at any size, and the cell must leave the
# GPU's memory to training (an fp32 eager step of GPT-2 at its micro-batch of 64 would need ~86 GiB).
SPEEDUP_MICRO_BATCH = 4


def timing_micro_batch(micro_batch: int | str, device_type: str) -> int:
    """The sequences per timed step: the run's micro-batch, at most SPEEDUP_MICRO_BATCH on a GPU. The cell runs
    before the trainer resolves micro_batch="auto", which times SPEEDUP_MICRO_BATCH sequences."""
    if not isinstance(micro_batch, int):
        return SPEEDUP_MICRO_BATCH
    return min(micro_batch, SPEEDUP_MICRO_BATCH) if device_type == "cuda" else micro_batch


def train_step(model: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype | None) -> Callable[[], None]:
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
