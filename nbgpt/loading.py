"""One loader for every model nbgpt evaluates or prompts, whatever it was saved as.

    runs/mine                        the newest good checkpoint of a run (its checkpoints.json), even
                                     when an export of an older step sits beside them
    runs/mine/checkpoints/ckpt_0000500.pt   one nbgpt checkpoint file
    path/to/export                   a folder in nbgpt's own format (nbgpt_model.json + model.safetensors)
    path/to/folder                   an HF-format GPT-2 folder (config.json + model.safetensors)
    gpt2, openai-community/gpt2      OpenAI's weights: the Hugging Face cache, else the hub when online

`nbgpt sample`, `nbgpt eval`, the notebooks and the prompt panel all load through `load_model`, so each of
them accepts all five (nbgpt.export writes the two folder formats).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch.nn as nn

from .checkpoint import checkpoint_folder, resolve_checkpoint, warn
from .device import resolve_device
from .export import MODEL_FILES, NBGPT_FILE, load_nbgpt
from .hf import HFFormatError, load_hf
from .model import GPT, GPTConfig
from .tokenizer import GPT2Tokenizer, Tokenizer, tokenizer_from_spec


@dataclass
class LoadedModel:
    model: nn.Module  # in eval mode, on the requested device
    tokenizer: Tokenizer
    source: str  # what was asked for
    step: int | None = None  # the training step, for nbgpt checkpoints
    val_loss: float | None = None  # the validation loss recorded with that checkpoint
    format: str = "GPT-2"  # of weights that are no checkpoint: "GPT-2" (HF folders, hub names) or "nbgpt"

    def describe(self) -> str:
        if self.step is None:
            return f"{self.format}-format weights from {self.source}"
        loss = "not measured" if self.val_loss is None else f"{self.val_loss:.4f}"
        return f"nbgpt checkpoint of step {self.step} from {self.source} (validation loss {loss})"


def load_model(source: str | os.PathLike, device: str = "cpu") -> LoadedModel:
    """The model and tokenizer of a run, checkpoint file, exported folder or hub name (see the module docstring)."""
    path = Path(source)
    if path.is_dir() and checkpoint_folder(path) is not None:
        # A run's checkpoints win over an export beside them: the export is a snapshot of some earlier step.
        loaded = _from_checkpoint(path)
        if exported := sorted(name for name in MODEL_FILES if (path / name).is_file()):
            warn(f"{path} holds checkpoints and an exported model ({', '.join(exported)}): loaded its newest "
                 f"checkpoint, step {loaded.step}, not the export; move the export to a folder of its own")
    elif (path / NBGPT_FILE).is_file():
        loaded = LoadedModel(*load_nbgpt(path), str(path), format="nbgpt")
    elif path.is_file() or (path.is_dir() and not (path / "config.json").is_file()):
        loaded = _from_checkpoint(path)
    else:
        loaded = _from_hf(source)
    loaded.model.to(resolve_device(device)).eval()
    return loaded


def _from_checkpoint(path: Path) -> LoadedModel:
    payload = resolve_checkpoint(path)
    model = GPT(GPTConfig.from_dict(payload["model_config"]))
    model.load_state_dict(payload["model"])
    return LoadedModel(model, tokenizer_from_spec(payload["tokenizer"]), str(path), payload["step"],
                       payload.get("val_loss"))


def _from_hf(source: str | os.PathLike) -> LoadedModel:
    """HF folders carry no tokenizer nbgpt can rebuild; GPT-2's BPE is the one their vocabulary was made for."""
    model = load_hf(source)
    tokenizer = GPT2Tokenizer()
    if model.config.vocab_size < tokenizer.vocab_size:
        raise HFFormatError(f"{source} has vocab_size {model.config.vocab_size}, fewer than GPT-2 BPE's "
                            f"{tokenizer.vocab_size} tokens, so it was trained with another tokenizer; nbgpt reads "
                            f"HF folders as GPT-2 BPE models only")
    return LoadedModel(model, tokenizer, str(source))
