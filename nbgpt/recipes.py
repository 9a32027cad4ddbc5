"""Recipes: named bundles of settings that together make one way of training a GPT.

    gpt2       GPT-2 as OpenAI trained it (2019), as build-nanogpt reproduces it: learned positions, GELU, tied
               embeddings, AdamW, warmup + cosine to 10 % at GPT-3's 124M learning rate.
    speedrun   the early modded-nanogpt speedrun records (2024), which reached GPT-2 124M's FineWeb loss in a
               fraction of the tokens: rotary positions, QK-norm, ReLU², zero-initialised output projections,
               an untied, soft-capped LM head, Muon for the blocks' matrices, and a trapezoidal schedule.

A recipe is chosen with `recipe` (a TrainConfig field) and is one row of RECIPES: nothing else in nbgpt asks
which recipe is in use, every technique is a field of its own. `with_recipe` decides what wins, the same way
for every entry point (presets and `-p`, `nbgpt train` flags, TrainConfig.from_dict):

    dataclass defaults  <  the preset's values  <  the named recipe's bundle  <  values given explicitly

so `-p recipe speedrun` on the gpt2-124m preset replaces the preset's 2019 learning rate too, and
`-p recipe speedrun -p qk_norm false` is the speedrun without QK-norm: how an ablation is spelled. A recipe
that nobody names applies no bundle: the preset's values stand (cpu-demo's Muon stays).
"""

from __future__ import annotations

from .config import ConfigError, did_you_mean

RECIPES: dict[str, dict] = {
    "gpt2": dict(
        position="absolute", activation="gelu", qk_norm=False, zero_init_proj=False, tie_embeddings=True,
        logit_softcap=0.0, optimizer="adamw", schedule="cosine", max_lr=6e-4, min_lr_ratio=0.1,
        embedding_lr_scale=1.0, weight_decay=0.1,
    ),
    # Probes (not the ablation, which is bench/speedrun_ablation.py's): 90 steps of 1024 tokens (warmup 10) of a
    # 4 × 256 model on Shakespeare in GPT-2 BPE, bf16 on 2 AVX-512 cores, one seed. Validation loss:
    #   max_lr 3e-3 5.99, 5e-3 5.98, 1e-2 6.07, 3e-2 6.22 (the gpt2 recipe at 3e-3: 6.56);
    #   at 3e-3, embedding_lr_scale 1: 5.99, 3: 5.97, 10: 5.93 (the speedrun, too, gives its embedding by far
    #   the largest rate); logit_softcap 30: 5.99, 0: 6.01.
    # Muon's updates are scaled to AdamW's RMS, so one rate serves the blocks (Muon) and the head (AdamW); of
    # the two good rates the lower is kept for the 124M presets. The cap of 30 is the speedrun's.
    # No warm-up, as in the speedrun records: an orthogonalised update has the same size from the first step,
    # so Muon has no noisy early statistics to wait out. Session 5 (complete schedules of 60 steps, seed 1337):
    # warmup_steps 0 5.37, 10 5.62 (bench/RESULTS.md, "Speedrun recipe on the CPU").
    "speedrun": dict(
        position="rope", activation="relu2", qk_norm=True, zero_init_proj=True, tie_embeddings=False,
        logit_softcap=30.0, optimizer="muon", schedule="trapezoid", max_lr=3e-3, min_lr_ratio=0.0,
        embedding_lr_scale=10.0, weight_decay=0.1, warmup_steps=0,
    ),
}


def check_recipe(name: str) -> None:
    if name not in RECIPES:
        raise ConfigError(f"unknown recipe {name!r}{did_you_mean(name, RECIPES)}; choose one of {sorted(RECIPES)}")


def with_recipe(preset: dict, given: dict) -> dict:
    """The flat values of a run: `preset` < the bundle of the recipe that `given` or else `preset` names <
    `given`. Without a named recipe, `given` over `preset`."""
    name = given.get("recipe", preset.get("recipe"))
    if name is None:
        return {**preset, **given}
    check_recipe(name)
    return {**preset, **RECIPES[name], **given, "recipe": name}
