"""The optimizers: AdamW (as GPT-2 was trained) and Muon for the transformer blocks' matrices.

nbgpt carries its own small Muon rather than torch.optim.Muon because torch's always orthogonalises in bf16:
on a CPU without native bf16 matmuls (AVX2) that one cast made the optimizer step many times slower than the
forward and backward passes together (bench/RESULTS.md). Here the orthogonalisation runs in the dtype the
device is fast at (`nbgpt.device.fast_dtype`).
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn as nn

from .device import fast_dtype
from .distributed import like, whole

# Coefficients (a, b, c) of the quintic f(x) = a x + b x³ + c x⁵ that Newton–Schulz applies to every singular
# value (Jordan et al., 2024). f has a steep slope at 0 (a = 3.4445), so small singular values grow quickly,
# and it maps [0, 1] into roughly [0.7, 1.2] after five rounds instead of exactly onto 1: "roughly
# orthogonal" trains as well as exactly orthogonal and needs far fewer iterations.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def orthogonalise(update: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.float32,
                  eps: float = 1e-7) -> torch.Tensor:
    """The matrix U Vᵀ nearest to `update` = U S Vᵀ (approximately): every singular value pushed toward 1.

    Odd polynomials act on singular values alone: X Xᵀ X = U S³ Vᵀ. So each round X <- a X + (b A + c A²) X
    with A = X Xᵀ applies f to every singular value at once, using only matmuls (no SVD).
    """
    X = update.to(dtype)
    tall = X.size(0) > X.size(1)
    if tall:
        X = X.T  # work with the wide orientation, so the Gram matrix X Xᵀ is the smaller square
    X = X / X.norm().clamp(min=eps)  # Frobenius norm >= spectral norm: all singular values now in [0, 1]
    a, b, c = NS_COEFFICIENTS
    for _ in range(steps):
        A = X @ X.T  # (m, m), m = the smaller side
        B = torch.addmm(A, A, A, beta=b, alpha=c)  # b A + c A², one fused call
        X = torch.addmm(X, B, X, beta=a)  # a X + (b A + c A²) X
    return X.T if tall else X


class Muon(torch.optim.Optimizer):
    """Momentum, orthogonalised: SGD with Nesterov momentum whose update for each 2-D weight is replaced by
    the nearest (semi-)orthogonal matrix, so every direction of the update moves at the same rate instead
    of the few directions that dominate the raw gradient.

    Per step, for a weight W (m × n) with gradient G, momentum μ and learning rate η:
        M <- μ M + (1 - μ) G              an exponential average of the gradients (the momentum buffer)
        D <- μ M + (1 - μ) G              Nesterov: look one momentum step ahead (plain: D = M)
        O <- orthogonalise(D)             singular values ~1, computed in `ns_dtype`
        W <- W (1 - η λ) - η s O          decoupled weight decay λ, then the step
    with s = 0.2 √max(m, n): an orthogonal m × n matrix has RMS entry 1/√max(m, n), and an AdamW update's RMS
    is typically ~0.2, so this scale lets Muon share AdamW's learning rate and schedule (Liu et al., 2025).
    The state, one `momentum_buffer` per weight, has the layout torch.optim.Muon uses.
    """

    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0.1, momentum: float = 0.95,
                 nesterov: bool = True, ns_steps: int = 5, ns_dtype: torch.dtype = torch.float32):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps)
        super().__init__(params, defaults)
        self.ns_dtype = ns_dtype
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() != 2:
                    raise ValueError(f"Muon updates 2-D weights only, got a parameter of shape {tuple(p.shape)}; "
                                     f"give vectors and embeddings to AdamW")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, mu = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - mu)  # M <- μ M + (1 - μ) G
                direction = p.grad.lerp(buf, mu) if group["nesterov"] else buf
                # Orthogonalising needs the whole matrix: under FSDP each rank holds rows of it, so the
                # direction is all-gathered (one extra all-gather per matrix per step, the size of the weight
                # in fp32), every rank orthogonalises it, and each keeps the rows of its own shard. The
                # momentum buffer stays sharded like the weight.
                update = like(orthogonalise(whole(direction), group["ns_steps"], self.ns_dtype), p)
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(update.to(p.dtype), alpha=-lr * 0.2 * math.sqrt(max(p.shape)))
        return loss


def build_adamw(model: nn.Module | list[nn.Parameter], weight_decay: float, learning_rate: float,
                betas: tuple[float, float], device_type: str, fused: bool | None = None,
                embeddings: list[nn.Parameter] = (), embedding_lr_scale: float = 1.0) -> torch.optim.AdamW:
    """AdamW over a model's (or a list of) parameters that decays only matrices (>= 2-D: weights,
    embeddings), never biases or LayerNorm gains.

    Decay pulls weights toward zero; for gains and biases that only shifts or rescales features, which
    hurts rather than regularises. `fused` (one kernel for all parameters) is used where the device has it.
    The `embeddings` get a group of their own, at `embedding_lr_scale` times the learning rate, when that
    differs from 1 (every group's "lr_scale" is what the trainer multiplies the schedule's rate by).
    """
    params = [p for p in (model.parameters() if isinstance(model, nn.Module) else model) if p.requires_grad]
    own = {id(p) for p in embeddings} if embedding_lr_scale != 1.0 else set()
    groups = [{"params": [p for p in params if p.dim() >= 2 and id(p) not in own], "weight_decay": weight_decay},
              {"params": [p for p in params if id(p) in own], "weight_decay": weight_decay,
               "lr_scale": embedding_lr_scale},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    if fused is None:
        fused = device_type in ("cuda", "cpu") and "fused" in inspect.signature(torch.optim.AdamW).parameters
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=learning_rate, betas=betas, eps=1e-8,
                             fused=fused)


def build_muon(model: nn.Module, weight_decay: float, learning_rate: float, betas: tuple[float, float],
               device_type: str, embedding_lr_scale: float = 1.0) -> list[torch.optim.Optimizer]:
    """Muon for the matrices inside the transformer blocks, AdamW for everything else.

    Muon is defined for 2-D weights that map features to features: embeddings, the LM head (tied or not),
    biases and LayerNorm gains stay with AdamW. Both share one learning rate and schedule (see Muon's RMS
    scale); the embeddings may have a multiple of it (`embedding_lr_scale`).
    """
    matrices = [p for p in model.get_submodule("h").parameters() if p.requires_grad and p.dim() == 2]
    chosen = {id(p) for p in matrices}
    rest = [p for p in model.parameters() if id(p) not in chosen]
    muon = Muon(matrices, lr=learning_rate, weight_decay=weight_decay, ns_dtype=fast_dtype(torch.device(device_type)))
    return [muon, build_adamw(rest, weight_decay, learning_rate, betas, device_type,
                              embeddings=model.embedding_parameters(), embedding_lr_scale=embedding_lr_scale)]


def param_groups(model: torch.nn.Module, optimizers: list[torch.optim.Optimizer]) -> list[dict]:
    """One row per optimizer parameter group: which tensors it holds, their shapes' rank, and its decay."""
    names = {id(p): n for n, p in model.named_parameters()}
    rows = []
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            params = group["params"]
            listed = [names.get(id(p), "?") for p in params]
            rows.append({"optimizer": type(optimizer).__name__, "tensors": len(params),
                         "parameters": sum(p.numel() for p in params),
                         "dims": "/".join(sorted({f"{p.dim()}-D" for p in params})),
                         "weight_decay": group.get("weight_decay", 0.0),
                         "lr_scale": group.get("lr_scale", 1.0),
                         "e.g.": ", ".join(listed[:3]) + (", …" if len(listed) > 3 else "")})
    return rows
