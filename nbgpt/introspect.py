"""Looking inside a trained model and its optimizer: attention weights, the causal mask, parameter groups.

Read-only views for the notebooks; nothing here changes a model or an optimizer.
"""

from __future__ import annotations

import torch

from .model import GPT, attention_probs


@torch.no_grad()
def attention_weights(model: GPT, idx: torch.Tensor, layer: int = 0) -> torch.Tensor:
    """softmax(q kᵀ / √D) with the causal mask, for one sequence idx (1, T) at `layer`: (H, T, T).

    The model runs forward once while a hook catches what the layer's attention receives (the LayerNorm'd
    residual stream and the rotary tables); the layer's own `qkv` then gives its queries and keys.
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
            q, k, _ = attn.qkv(caught["x"], caught["rope"])  # each (1, H, T, D)
    finally:
        hook.remove()
    return attention_probs(q.float(), k.float())[0].cpu()  # the future is invisible: zero weight above the diagonal


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
