"""A trained model's files: written for others, and read back whatever they are.

Written (`export_model`, `nbgpt export`):
    HF GPT-2        config.json + model.safetensors: `transformers.GPT2LMHeadModel.from_pretrained` loads it;
                    with GPT-2's tokenizer files (vocab.json, merges.txt...), so `AutoTokenizer` and
                    `pipeline("text-generation")` load the folder too.
                    For the gpt2 recipe, and any model without rotary positions, QK-norm or soft-capped logits.
    nbgpt's own     nbgpt_model.json (the GPTConfig and the tokenizer) + model.safetensors (the state_dict):
                    for everything else, the speedrun recipe included. `nbgpt.model_files.load_model` (and so
                    `nbgpt sample`, `nbgpt eval`, the notebooks) loads it; outside nbgpt, `GPT(GPTConfig(...))`
                    and `safetensors.torch.load_file` are all it takes.

Neither format is a pickle: loading one never runs code.

Read (`load_model`: `nbgpt sample`, `nbgpt eval`, the notebooks and the prompt panel):
    runs/mine                        the newest good checkpoint of a run (its checkpoints.json), even
                                     when an export of an older step sits beside them
    runs/mine/checkpoints/ckpt_0000500.pt   one nbgpt checkpoint file
    path/to/export                   a folder in nbgpt's own format (nbgpt_model.json + model.safetensors)
    path/to/folder                   an HF-format GPT-2 folder (config.json + model.safetensors)
    gpt2, openai-community/gpt2      OpenAI's weights: the Hugging Face cache, else the hub when online
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn

from .assets import offline
from .checkpoint import checkpoint_folder, resolve_checkpoint, warn
from .knobs import ConfigError
from .device import resolve_device
from .errors import NbgptError
from .files import atomic_write, atomic_write_json, read_json
from .model import GPT, GPTConfig
from .tokenizer import ENDOFTEXT, GPT2Tokenizer, Tokenizer, gpt2_ranks_bytes, tokenizer_from_spec, tokenizer_spec


# Hugging Face GPT-2 format in and out: OpenAI's released weights, or a model to hand to `transformers`.
#
# HF's GPT-2 stores its Linear layers as `Conv1D` modules whose weight is (in, out), the transpose of
# `nn.Linear`'s (out, in); that, the vocabulary padding and the tied LM head are all that differ.
#
# HF's GPT-2 also takes ReLU² (activation_function="relu2") and an untied head (tie_word_embeddings=false), so
# those speedrun techniques export too. Rotary positions, QK-norm and logit soft-capping it cannot express: such
# models are saved in nbgpt's own format (nbgpt.model_files), which nbgpt.model_files reads back.

# Parameters stored transposed by HF's Conv1D.
CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


class HFFormatError(NbgptError, ValueError):
    """A directory or hub name that is not a loadable HF GPT-2 checkpoint."""


def _resolve(path_or_name: str | os.PathLike) -> Path:
    """A local HF folder as is; anything else that could be a hub name ('gpt2', 'openai-community/gpt2') from
    the Hugging Face cache or, when online, the hub."""
    path = Path(path_or_name)
    if path.is_dir():
        return path
    if path.exists():
        raise HFFormatError(f"{path_or_name} is not a directory with config.json and model weights")
    if str(path_or_name).startswith((".", "/", "~")) or (path.parent != Path(".") and path.parent.is_dir()):
        # a path (runs/mine with a typo), not a hub name: say what is there instead of asking the hub
        there = (f" (in {path.parent}: {', '.join(sorted(p.name for p in path.parent.iterdir())[:8]) or 'nothing'})"
                 if path.parent.is_dir() else "")
        raise HFFormatError(f"{path_or_name} does not exist{there}, so it is not a directory with config.json "
                            f"and weights: pass a run directory, checkpoint file or HF folder")
    from huggingface_hub import snapshot_download

    name = str(path_or_name)
    try:  # offline, only the local cache is consulted; online, the hub (which falls back to the cache)
        return Path(snapshot_download(name, allow_patterns=["config.json", "*.safetensors"],
                                      local_files_only=offline()))
    except Exception as exc:
        reason = ("it is not in the Hugging Face cache and NBGPT_OFFLINE/HF_HUB_OFFLINE is set" if offline() else
                  f"it is neither in the Hugging Face cache nor downloadable now ({type(exc).__name__})")
        raise HFFormatError(f"{name!r} is no local path, and as a hub model name {reason}; fetch it where the hub is "
                            f"reachable (`hf download {name}`) or pass a local run, checkpoint or HF folder") from exc


# HF's activation_function names for GPTConfig.activation (HF's "gelu_pytorch_tanh" is the same function).
HF_ACTIVATIONS = {"gelu": "gelu_new", "relu2": "relu2"}
FROM_HF_ACTIVATIONS = {"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "relu2": "relu2"}


def hf_unrepresentable(config: GPTConfig) -> list[str]:
    """The settings of `config` that HF's GPT2LMHeadModel has no way to express ([] when it exports)."""
    found = [f"position={config.position!r}"] if config.position != "absolute" else []
    found += ["bias=False"] if not config.bias else []
    found += ["qk_norm=True"] if config.qk_norm else []
    return found + ([f"logit_softcap={config.logit_softcap:g}"] if config.logit_softcap else [])


def _config_from_hf(hf: dict, vocab_multiple: int) -> GPTConfig:
    if hf.get("model_type", "gpt2") != "gpt2":
        raise HFFormatError(f"model_type {hf.get('model_type')!r} is not gpt2")
    activation = hf.get("activation_function", "gelu_new")
    if activation not in FROM_HF_ACTIVATIONS:
        raise HFFormatError(f"activation {activation!r} is neither GPT-2's tanh GELU nor ReLU²")
    if abs(hf.get("layer_norm_epsilon", 1e-5) - 1e-5) > 1e-12:
        raise HFFormatError(f"layer_norm_epsilon={hf['layer_norm_epsilon']} differs from GPT-2's 1e-5")
    return GPTConfig(block_size=hf["n_positions"], vocab_size=hf["vocab_size"], n_layer=hf["n_layer"],
                     n_head=hf["n_head"], n_embd=hf["n_embd"], vocab_multiple=vocab_multiple,
                     activation=FROM_HF_ACTIVATIONS[activation],
                     tie_embeddings=hf.get("tie_word_embeddings", True))


def _read_state(directory: Path) -> dict[str, torch.Tensor]:
    safetensors_file = directory / "model.safetensors"
    if safetensors_file.is_file():
        from safetensors.torch import load_file

        return load_file(str(safetensors_file))
    bin_file = directory / "pytorch_model.bin"
    if bin_file.is_file():
        try:
            # weights_only: a .bin is a pickle, and a pickle from a stranger can run code when loaded.
            return torch.load(bin_file, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise HFFormatError(f"{bin_file} holds something other than plain tensors and was refused "
                                f"(it may contain code to execute): {str(exc)[:300]}") from exc
    raise HFFormatError(f"{directory} has neither model.safetensors nor pytorch_model.bin")


def load_hf(path_or_name: str | os.PathLike, vocab_multiple: int = 1) -> GPT:
    """Build an nbgpt GPT from an HF-format GPT-2 directory (or hub name such as 'gpt2' when online)."""
    directory = _resolve(path_or_name)
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise HFFormatError(f"{directory} has no config.json")
    config = _config_from_hf(json.loads(config_file.read_text()), vocab_multiple)
    state = {k.removeprefix("transformer."): v for k, v in _read_state(directory).items()}
    model = GPT(config)
    ours = model.state_dict()
    loaded: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if name.endswith((".attn.bias", ".attn.masked_bias")) or (name == "lm_head.weight" and config.tie_embeddings):
            continue  # causal-mask buffers of old checkpoints; a tied head is wte itself
        if name not in ours:
            raise HFFormatError(f"unexpected tensor {name!r} in {directory}")
        if name.endswith(CONV1D_SUFFIXES):
            tensor = tensor.t()
        if name in ("wte.weight", "lm_head.weight") and tensor.shape[0] < ours[name].shape[0]:
            tensor = torch.cat([tensor, ours[name][tensor.shape[0]:]])  # keep the padding rows as initialised
        if tensor.shape != ours[name].shape:
            raise HFFormatError(f"{name}: shape {tuple(tensor.shape)} in the checkpoint, {tuple(ours[name].shape)} "
                                f"expected from its config.json")
        loaded[name] = tensor
    missing = sorted(set(ours) - set(loaded) - ({"lm_head.weight"} if config.tie_embeddings else set()))
    if missing:
        raise HFFormatError(f"{directory} lacks tensors {missing[:5]}{'...' if len(missing) > 5 else ''}")
    with torch.no_grad():
        for name, tensor in loaded.items():
            ours[name].copy_(tensor)
    return model


def export_hf(model: GPT, out_dir: str | os.PathLike, tokenizer_files: bool = False) -> Path:
    """Write `model` as an HF GPT-2 directory that `GPT2LMHeadModel.from_pretrained` loads, and with
    `tokenizer_files` GPT-2's tokenizer files too (for a model trained on GPT-2 BPE), so that transformers'
    `AutoTokenizer` and `pipeline` load the folder as it is.

    Refused, naming the settings, for a model HF's GPT-2 cannot express (see hf_unrepresentable)."""
    config = model.config
    if unrepresentable := hf_unrepresentable(config):
        raise ConfigError(f"HF's GPT-2 cannot represent {', '.join(unrepresentable)}; save this model in nbgpt's "
                          f"own format instead (nbgpt.model_files.export_nbgpt, or `nbgpt export --format nbgpt`)")
    from safetensors.torch import save

    out = Path(out_dir)
    state = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_embeddings:
            continue  # HF ties it to wte on load
        tensor = tensor.detach().to("cpu", torch.float32)
        if name in ("wte.weight", "lm_head.weight"):
            tensor = tensor[: config.vocab_size]
        if name.endswith(CONV1D_SUFFIXES):
            tensor = tensor.t()
        state[name if name == "lm_head.weight" else "transformer." + name] = tensor.contiguous()
    hf_config = {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "activation_function": HF_ACTIVATIONS[config.activation],
        "n_positions": config.block_size, "n_ctx": config.block_size, "vocab_size": config.vocab_size,
        "n_layer": config.n_layer, "n_head": config.n_head, "n_embd": config.n_embd, "n_inner": None,
        "layer_norm_epsilon": 1e-5, "initializer_range": 0.02, "bos_token_id": config.vocab_size - 1,
        "eos_token_id": config.vocab_size - 1, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
        "tie_word_embeddings": config.tie_embeddings, "torch_dtype": "float32",
    }
    atomic_write(out / "model.safetensors", lambda f: f.write(save(state, metadata={"format": "pt"})))
    if tokenizer_files:
        write_gpt2_tokenizer(out, config.block_size)
    atomic_write_json(out / "config.json", hf_config)  # last: a folder with config.json is complete
    return out


# --------------------------------------------------------------------------- GPT-2's tokenizer, HF's files
#
# HF's GPT-2 tokenizer reads the BPE as text: vocab.json maps each token to its id, merges.txt lists the merges
# in priority order. Both spell a token's bytes through GPT-2's byte-to-character table, and both are derived
# here from the very ranks nbgpt verifies by sha256, so an export's token ids are nbgpt's token ids.

TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")


def byte_to_char() -> dict[int, str]:
    """GPT-2's printable stand-in for every byte: printable Latin-1 bytes stand for themselves, the other 68
    (controls, space, soft hyphen...) for the characters from U+0100 on, in byte order, so that no token's
    text holds whitespace or control characters."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def _merge_of(ranks: dict[bytes, int], token: bytes) -> tuple[bytes, bytes]:
    """The two tokens whose merge made `token`: BPE on its bytes with only the merges ranked before it leaves
    exactly two parts (merging them is this token's own merge)."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        pairs = [(ranks.get(a + b, len(ranks)), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        rank, i = min(pairs)
        if rank >= ranks[token]:
            break
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    if len(parts) != 2:
        raise HFFormatError(f"GPT-2's ranks hold a token {token!r} that no single merge makes")
    return parts[0], parts[1]


def gpt2_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """vocab.json's {token text: id} (end-of-text included) and merges.txt's lines, in rank order."""
    import base64

    ranks = {base64.b64decode(token): int(rank) for token, rank in
             (line.split() for line in gpt2_ranks_bytes().splitlines() if line)}
    chars = byte_to_char()

    def text(token: bytes) -> str:
        return "".join(chars[b] for b in token)

    vocab = {text(token): rank for token, rank in ranks.items()}
    vocab[ENDOFTEXT] = len(ranks)
    merges = [" ".join(map(text, _merge_of(ranks, token)))
              for token, rank in sorted(ranks.items(), key=lambda item: item[1]) if len(token) > 1]
    return vocab, merges


def write_gpt2_tokenizer(out_dir: str | os.PathLike, max_length: int) -> Path:
    """The files transformers' GPT2Tokenizer reads (see TOKENIZER_FILES), each written atomically."""
    out = Path(out_dir)
    vocab, merges = gpt2_vocab_and_merges()
    special = {"bos_token": ENDOFTEXT, "eos_token": ENDOFTEXT, "unk_token": ENDOFTEXT}
    atomic_write(out / "vocab.json", lambda f: f.write(json.dumps(vocab, ensure_ascii=False).encode()))
    atomic_write(out / "merges.txt", lambda f: f.write(("#version: 0.2\n" + "\n".join(merges) + "\n").encode()))
    atomic_write_json(out / "special_tokens_map.json", special)
    atomic_write_json(out / "tokenizer_config.json", {"tokenizer_class": "GPT2Tokenizer", "model_max_length":
                                                      max_length, "add_prefix_space": False, **special})
    return out


# nbgpt's own format, and the choice between the two.

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
                          f"(or auto), nbgpt's own format, which nbgpt.model_files.load_model reads")
    if format == "hf" or (format == "auto" and not obstacles):
        return Exported(export_hf(model, out_dir, tokenizer_files=True), "hf", "HF's GPT-2 expresses this model",
                        f"GPT-2's BPE in {', '.join(TOKENIZER_FILES)}: transformers' AutoTokenizer and "
                        f"pipeline('text-generation') load the folder")
    reason = "asked for" if format == "nbgpt" else f"HF's GPT-2 cannot carry {', '.join(obstacles)}"
    kept = ("the character vocabulary", "transformers has no tokenizer for nbgpt's character vocabulary") \
        if tokenizer.name == "char" else ("GPT-2's BPE, by name", "transformers cannot load an nbgpt-format model")
    return Exported(export_nbgpt(model, tokenizer, out_dir), "nbgpt", reason,
                    f"{kept[0]}, in {NBGPT_FILE} (nbgpt's loaders rebuild it); no HF tokenizer files: {kept[1]}")


# One loader for every model nbgpt evaluates or prompts, whatever it was saved as.

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
