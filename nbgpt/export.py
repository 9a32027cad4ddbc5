"""Handing a trained model to others: HF's GPT-2 format where it can express the model, else nbgpt's own.

    HF GPT-2        config.json + model.safetensors: `transformers.GPT2LMHeadModel.from_pretrained` loads it;
                    with GPT-2's tokenizer files (vocab.json, merges.txt...), so `AutoTokenizer` and
                    `pipeline("text-generation")` load the folder too.
                    For the gpt2 recipe, and any model without rotary positions, QK-norm or soft-capped logits.
    nbgpt's own     nbgpt_model.json (the GPTConfig and the tokenizer) + model.safetensors (the state_dict):
                    for everything else, the speedrun recipe included. `nbgpt.loading.load_model` (and so
                    `nbgpt sample`, `nbgpt eval`, the notebooks) loads it; outside nbgpt, `GPT(GPTConfig(...))`
                    and `safetensors.torch.load_file` are all it takes.

Neither format is a pickle: loading one never runs code.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

from .checkpoint import checkpoint_folder
from .config import ConfigError
from .files import atomic_write, atomic_write_json, read_json
from .hf import TOKENIZER_FILES, export_hf, hf_unrepresentable
from .model import GPT, GPTConfig
from .tokenizer import Tokenizer, tokenizer_from_spec, tokenizer_spec

NBGPT_FILE = "nbgpt_model.json"  # marks a folder in nbgpt's own format
FORMATS = ("auto", "hf", "nbgpt")
MODEL_FILES = ("config.json", "model.safetensors", NBGPT_FILE)  # what either format writes


def export_nbgpt(model: GPT, tokenizer: Tokenizer, out_dir: str | os.PathLike) -> Path:
    """Write `model` and what rebuilds it (its GPTConfig and tokenizer) into `out_dir`, atomically per file."""
    from safetensors.torch import save

    # safetensors stores no tensor twice: a tied head is left out and re-tied by GPT's constructor on load.
    state = {name: tensor.detach().to("cpu").contiguous() for name, tensor in model.state_dict().items()
             if not (name == "lm_head.weight" and model.config.tie_embeddings)}
    out = Path(out_dir)
    atomic_write(out / "model.safetensors", lambda f: f.write(save(state, metadata={"format": "nbgpt"})))
    # written last: a folder with this file is complete
    atomic_write_json(out / NBGPT_FILE, {"format": "nbgpt", "version": 1, "model_config": model.config.to_dict(),
                                         "tokenizer": tokenizer_spec(tokenizer)})
    return out


def load_nbgpt(directory: str | os.PathLike) -> tuple[GPT, Tokenizer]:
    """The model and tokenizer of a folder that export_nbgpt wrote."""
    from safetensors.torch import load_file

    directory = Path(directory)
    meta = read_json(directory / NBGPT_FILE)
    if meta.get("format") != "nbgpt" or meta.get("version") != 1:
        raise ConfigError(f"{directory / NBGPT_FILE} is not version 1 of nbgpt's model format; export it again "
                          f"with this version of nbgpt")
    model = GPT(GPTConfig.from_dict(meta["model_config"]))
    state = load_file(str(directory / "model.safetensors"))
    if model.config.tie_embeddings:
        state["lm_head.weight"] = state["wte.weight"]  # the same tensor in the model
    model.load_state_dict(state)
    return model, tokenizer_from_spec(meta["tokenizer"])


def check_export_folder(out_dir: str | os.PathLike) -> None:
    """An export goes into a new or empty folder of its own. Never over, or mixed with, files already there
    (a folder with both formats' files loads wrongly), and never in a run's folder, where the run's newer
    checkpoints and the export's older weights would claim the same path."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} is a file, not a folder; export into a new folder, e.g. {out.parent / 'export'}")
    run = next((p for p in (out, *out.absolute().parents) if p.is_dir() and checkpoint_folder(p) is not None), None)
    if run is not None:
        raise ConfigError(f"{out} is {'' if run == out else 'inside '}the run directory {run}, whose checkpoints "
                          f"its loaders read; export into a folder of its own, e.g. "
                          f"{run.parent / (run.name + '-export')}")
    if out.is_dir() and (held := sorted(p.name for p in out.iterdir())):
        raise ConfigError(f"{out} already holds {', '.join(held[:5])}{', ...' if len(held) > 5 else ''}; export "
                          f"into a new or empty folder, e.g. {out.parent / (out.name + '-export')}")


class Exported(NamedTuple):
    out: Path
    format: str  # "hf" or "nbgpt"
    why: str  # why that format
    tokenizer: str  # where the tokenizer went, and who can read it


def export_model(model: GPT, tokenizer: Tokenizer, out_dir: str | os.PathLike, format: str = "auto") -> Exported:
    """Export in `format`; "auto" is HF's GPT-2 format when it can express the model, else nbgpt's own."""
    if format not in FORMATS:
        raise ConfigError(f"export format must be one of {', '.join(FORMATS)}, got {format!r}")
    check_export_folder(out_dir)
    # HF folders are read (by nbgpt and by transformers users) as GPT-2 BPE models: other token ids would load
    # without complaint and decode to nonsense.
    obstacles = hf_unrepresentable(model.config)
    obstacles += [] if tokenizer.name == "gpt2" else [f"tokenizer {tokenizer.name!r} (HF GPT-2 means GPT-2's BPE)"]
    if format == "hf" and obstacles:
        raise ConfigError(f"HF's GPT-2 format cannot carry {', '.join(obstacles)}; export with --format nbgpt "
                          f"(or auto), nbgpt's own format, which nbgpt.loading.load_model reads")
    if format == "hf" or (format == "auto" and not obstacles):
        return Exported(export_hf(model, out_dir, tokenizer_files=True), "hf", "HF's GPT-2 expresses this model",
                        f"GPT-2's BPE in {', '.join(TOKENIZER_FILES)}: transformers' AutoTokenizer and "
                        f"pipeline('text-generation') load the folder")
    reason = "asked for" if format == "nbgpt" else f"HF's GPT-2 cannot carry {', '.join(obstacles)}"
    kept = ("the character vocabulary", "transformers has no tokenizer for nbgpt's character vocabulary") \
        if tokenizer.name == "char" else ("GPT-2's BPE, by name", "transformers cannot load an nbgpt-format model")
    return Exported(export_nbgpt(model, tokenizer, out_dir), "nbgpt", reason,
                    f"{kept[0]}, in {NBGPT_FILE} (nbgpt's loaders rebuild it); no HF tokenizer files: {kept[1]}")
