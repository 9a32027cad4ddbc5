"""Hugging Face GPT-2 format in and out: OpenAI's released weights, or a model to hand to `transformers`.

HF's GPT-2 stores its Linear layers as `Conv1D` modules whose weight is (in, out), the transpose of
`nn.Linear`'s (out, in); that, the vocabulary padding and the tied LM head are all that differ.

HF's GPT-2 also takes ReLU² (activation_function="relu2") and an untied head (tie_word_embeddings=false), so
those speedrun techniques export too. Rotary positions, QK-norm and logit soft-capping it cannot express: such
models are saved in nbgpt's own format (nbgpt.export), which nbgpt.loading reads back.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .assets import offline
from .errors import NbgptError
from .files import atomic_write, atomic_write_json
from .model import GPT, ConfigError, GPTConfig

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
                          f"own format instead (nbgpt.export.export_nbgpt, or `nbgpt export --format nbgpt`)")
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

    from .tokenizer import ENDOFTEXT, gpt2_ranks_bytes

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
    from .tokenizer import ENDOFTEXT

    out = Path(out_dir)
    vocab, merges = gpt2_vocab_and_merges()
    special = {"bos_token": ENDOFTEXT, "eos_token": ENDOFTEXT, "unk_token": ENDOFTEXT}
    atomic_write(out / "vocab.json", lambda f: f.write(json.dumps(vocab, ensure_ascii=False).encode()))
    atomic_write(out / "merges.txt", lambda f: f.write(("#version: 0.2\n" + "\n".join(merges) + "\n").encode()))
    atomic_write_json(out / "special_tokens_map.json", special)
    atomic_write_json(out / "tokenizer_config.json", {"tokenizer_class": "GPT2Tokenizer", "model_max_length":
                                                      max_length, "add_prefix_space": False, **special})
    return out
