"""Recipes: named bundles of settings that together make one way of training a GPT.

    gpt2       GPT-2 as OpenAI trained it (2019), as build-nanogpt reproduces it: learned positions, GELU, tied
               embeddings, AdamW, warmup + cosine to 10 % at GPT-3's 124M learning rate.
    speedrun   the early modded-nanogpt speedrun records (2024), which reached GPT-2 124M's FineWeb loss in a
               fraction of the tokens: rotary positions, QK-norm, ReLU², zero-initialised output projections,
               an untied, soft-capped LM head, Muon for the blocks' matrices, and a trapezoidal schedule.

A recipe is chosen with `recipe` (a TrainConfig field) and is one row of RECIPES: nothing else in nbgpt asks
which recipe is in use, every technique is a field of its own. What wins, the same for every entry point
(TrainConfig(...), presets and `-p`, `nbgpt train` flags):

    dataclass defaults  <  the preset's values  <  the named recipe's bundle  <  values given explicitly

TrainConfig applies a recipe, once, in __post_init__: the knobs a recipe may set start unset (nbgpt.config.knob)
and those still unset take the named recipe's values; a model preset's own architecture (small-char's rotary
positions) stands too. `under_recipe` drops a run preset's values of the named recipe's knobs, so
`-p recipe speedrun` on the gpt2-124m preset replaces the preset's 2019 learning rate too, and
`-p recipe speedrun -p qk_norm false` is the speedrun without QK-norm: how an ablation is spelled. A recipe
that nobody names applies no bundle: the preset's values stand (cpu-demo's Muon stays).
"""

from __future__ import annotations

from .config import ConfigError, did_you_mean, field_types
from .model import GPTConfig

RECIPES: dict[str, dict] = {
    "gpt2": dict(
        position="absolute", activation="gelu", qk_norm=False, zero_init_proj=False, tie_embeddings=True,
        logit_softcap=0.0, optimizer="adamw", schedule="cosine", max_lr=6e-4, min_lr_ratio=0.1,
        embedding_lr_scale=1.0, weight_decay=0.1,
    ),
    # Values from short CPU probes (bench/RESULTS.md, "The speedrun recipe's learning rates"). Muon scales its
    # updates to AdamW's size, so one max_lr serves both optimizers. No warm-up: an orthogonalised update has
    # the same size from the first step, so there are no noisy early statistics to wait out.
    "speedrun": dict(
        position="rope", activation="relu2", qk_norm=True, zero_init_proj=True, tie_embeddings=False,
        logit_softcap=30.0, optimizer="muon", schedule="trapezoid", max_lr=3e-3, min_lr_ratio=0.0,
        embedding_lr_scale=10.0, weight_decay=0.1, warmup_steps=0,
    ),
}


def check_recipe(name: str) -> None:
    if name not in RECIPES:
        raise ConfigError(f"unknown recipe {name!r}{did_you_mean(name, RECIPES)}; choose one of {sorted(RECIPES)}")


def architecture(name: str) -> dict:
    """The GPTConfig fields of recipe `name`'s bundle: its model, to lay over any preset's shape."""
    check_recipe(name)
    return {field: value for field, value in RECIPES[name].items() if field in field_types(GPTConfig)}


def under_recipe(preset: dict, given: dict) -> dict:
    """A run preset's values under `given`, less those of the knobs that the recipe named by `given` (else by
    `preset`) sets: TrainConfig gives them the recipe's values."""
    bundle = RECIPES.get(given.get("recipe", preset.get("recipe")), {})  # an unknown name: TrainConfig says so
    return {**{name: value for name, value in preset.items() if name not in bundle}, **given}
