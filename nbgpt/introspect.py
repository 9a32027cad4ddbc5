"""Looking inside a trained model and its optimizer: attention weights, the causal mask, parameter groups.

Read-only views for the notebooks; nothing here changes a model or an optimizer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .model import GPT, apply_rotary


def causal_mask(T: int) -> torch.Tensor:
    """(T, T) booleans, True where query t may see key s: s <= t. Row t is everything up to token t."""
    return torch.ones(T, T, dtype=torch.bool).tril()


@torch.no_grad()
def attention_weights(model: GPT, idx: torch.Tensor, layer: int = 0) -> torch.Tensor:
    """softmax(q kᵀ / √D) with the causal mask, for one sequence idx (1, T) at `layer`: (H, T, T).

    The model runs forward once while a hook catches what the layer's attention receives (the LayerNorm'd
    residual stream); q and k are then recomputed from that layer's own c_attn weights, as its forward does.
    """
    attn = model.h[layer].attn
    device = next(model.parameters()).device
    # A Generator's inference copy keeps its Linear weights in bf16/fp16: run it under autocast as it does.
    low = ({p.dtype for p in model.parameters()} - {torch.float32} or {None}).pop()
    caught = {}
    hook = attn.register_forward_pre_hook(lambda module, args: caught.update(x=args[0], rope=args[1]))
    try:
        with torch.autocast(device.type, dtype=low or torch.bfloat16, enabled=low is not None):
            model.eval()
            model(idx.to(device))
            q, k, _ = attn.c_attn(caught["x"]).float().split(model.config.n_embd, dim=2)  # each (1, T, C)
    finally:
        hook.remove()
    B, T, C = q.shape
    q, k = (t.view(B, T, attn.n_head, C // attn.n_head).transpose(1, 2) for t in (q, k))  # (1, H, T, D)
    if attn.qk_norm:
        q, k = F.rms_norm(q, (q.size(-1),)), F.rms_norm(k, (k.size(-1),))
    if caught["rope"] is not None:
        q, k = apply_rotary(q, *caught["rope"]), apply_rotary(k, *caught["rope"])
    scores = q @ k.transpose(-2, -1) * q.size(-1) ** -0.5  # (1, H, T, T): how well each query matches each key
    scores = scores.masked_fill(~causal_mask(T).to(scores.device), float("-inf"))  # the future is invisible
    return scores.softmax(dim=-1)[0].cpu()


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
