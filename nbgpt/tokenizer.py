"""Tokenizers: GPT-2's byte-level BPE (through tiktoken) and a character-level one built from a corpus.

Both satisfy the small `Tokenizer` protocol, so data preparation, training, sampling and the notebooks never
need to know which one is in use.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Protocol, Sequence, runtime_checkable

from .assets import Asset, Sdist, fetch
from .errors import NbgptError
from .files import atomic_write_bytes, sha256_bytes

GPT2_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
GPT2_RANKS_URL = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"
# openai-whisper's sdist ships the very same ranks file (same sha256): a registry-only route to it.
GPT2_RANKS_SDIST = Sdist("openai-whisper==20250625", member="whisper/assets/gpt2.tiktoken")
GPT2_RANKS_ENV = "NBGPT_GPT2_RANKS"
# GPT-2's pre-tokenizer: split off contractions, letter runs, digit runs, punctuation runs and whitespace
# before BPE runs, so merges never cross those boundaries.
GPT2_SPLIT_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
ENDOFTEXT = "<|endoftext|>"


@runtime_checkable
class Tokenizer(Protocol):
    """What every part of nbgpt needs from a tokenizer."""

    name: str
    vocab_size: int
    eot: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def decode_bytes(self, ids: Sequence[int]) -> bytes: ...

    def identity(self) -> dict: ...


class TokenizerError(NbgptError, ValueError):
    """A tokenizer cannot be built or cannot encode its input."""


# --------------------------------------------------------------------------------------------- GPT-2 BPE


def _tiktoken_cache_copies() -> list[Path]:
    """Where tiktoken itself caches the r50k/gpt2 ranks file (it keys files by the sha1 of the URL)."""
    import hashlib

    root = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR") or os.path.join(
        tempfile.gettempdir(), "data-gym-cache")
    return [Path(root) / hashlib.sha1(GPT2_RANKS_URL.encode()).hexdigest()]


# A wrong ranks file would silently change every token id, so even a file the user names is verified.
GPT2_RANKS = Asset(name="GPT-2's BPE ranks (gpt2.tiktoken)", filename="gpt2.tiktoken", sha256=GPT2_RANKS_SHA256,
                   url=GPT2_RANKS_URL, env=GPT2_RANKS_ENV, sdist=GPT2_RANKS_SDIST, verify_given=True,
                   other_copies=_tiktoken_cache_copies, error=TokenizerError)


def gpt2_ranks_bytes(path: str | os.PathLike | None = None) -> bytes:
    """GPT-2's BPE ranks, verified by sha256: from `path`, $NBGPT_GPT2_RANKS, nbgpt's or tiktoken's cache,
    OpenAI's URL, or the openai-whisper sdist on the package index (see nbgpt.assets)."""
    return fetch(GPT2_RANKS, path).read_bytes()


class GPT2Tokenizer:
    """GPT-2's byte-level BPE: 50,257 tokens, end-of-text = 50,256."""

    name = "gpt2"

    def __init__(self, ranks_path: str | os.PathLike | None = None):
        import tiktoken
        from tiktoken.load import load_tiktoken_bpe

        with tempfile.TemporaryDirectory() as tmp:
            ranks_file = Path(tmp) / "gpt2.tiktoken"
            ranks_file.write_bytes(gpt2_ranks_bytes(ranks_path))
            ranks = load_tiktoken_bpe(str(ranks_file))
        self.encoding = tiktoken.Encoding(name="gpt2", pat_str=GPT2_SPLIT_PATTERN, mergeable_ranks=ranks,
                                          special_tokens={ENDOFTEXT: len(ranks)}, explicit_n_vocab=len(ranks) + 1)
        self.vocab_size = self.encoding.n_vocab
        self.eot = self.encoding.eot_token

    def encode(self, text: str) -> list[int]:
        """Encode ordinary text; '<|endoftext|>' inside it is treated as plain characters, never as EOT."""
        return self.encoding.encode_ordinary(text)

    def encode_batch(self, texts: list[str], num_threads: int = 1) -> list[list[int]]:
        return self.encoding.encode_ordinary_batch(texts, num_threads=num_threads)

    def decode(self, ids: Sequence[int]) -> str:
        return self.encoding.decode(list(ids), errors="replace")

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        return self.encoding.decode_bytes(list(ids))

    def identity(self) -> dict:
        return {"kind": "gpt2", "vocab_size": self.vocab_size, "eot": self.eot, "ranks_sha256": GPT2_RANKS_SHA256}


# ------------------------------------------------------------------------------------------ characters


class CharTokenizer:
    """One token per character of the training corpus, plus an end-of-text token after them.

    The vocabulary is the sorted set of characters seen when it was built; it travels with the data
    (`save`/`load`) because a different corpus gives different ids.
    """

    name = "char"

    def __init__(self, chars: Sequence[str]):
        if len(set(chars)) != len(chars) or any(len(c) != 1 for c in chars):
            raise TokenizerError("a char vocabulary must be a list of distinct single characters")
        self.chars = list(chars)
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        self.eot = len(self.chars)
        self.vocab_size = len(self.chars) + 1

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        if not text:
            raise TokenizerError("cannot build a character vocabulary from empty text")
        return cls(sorted(set(text)))

    def encode(self, text: str) -> list[int]:
        stoi = self.stoi
        try:
            return [stoi[c] for c in text]
        except KeyError:
            position = next(i for i, c in enumerate(text) if c not in stoi)
            raise TokenizerError(
                f"character {text[position]!r} (U+{ord(text[position]):04X}) at position {position} is not in "
                f"this {len(self.chars)}-character vocabulary; use only characters of the training corpus "
                f"or rebuild the dataset with a corpus that contains it") from None

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.chars[i] for i in ids if i != self.eot)

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        return self.decode(ids).encode("utf-8")

    def identity(self) -> dict:
        return {"kind": "char", "vocab_size": self.vocab_size, "eot": self.eot,
                "chars_sha256": sha256_bytes("".join(self.chars).encode("utf-8"))}

    def save(self, path: str | os.PathLike) -> Path:
        return atomic_write_bytes(path, json.dumps({"kind": "char", "chars": self.chars}).encode("utf-8"))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CharTokenizer":
        try:
            payload = json.loads(Path(path).read_text(encoding="utf-8"))
            return cls(payload["chars"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise TokenizerError(f"{path} is not a char vocabulary saved by nbgpt ({exc})") from exc


def get_tokenizer(kind: str, vocab_path: str | os.PathLike | None = None) -> Tokenizer:
    """Build a tokenizer by name: 'gpt2', or 'char' with the vocabulary saved beside a dataset."""
    if kind == "gpt2":
        return GPT2Tokenizer()
    if kind == "char":
        if vocab_path is None:
            raise TokenizerError("the 'char' tokenizer needs the vocab.json saved with its dataset")
        return CharTokenizer.load(vocab_path)
    raise TokenizerError(f"unknown tokenizer {kind!r}; choose 'gpt2' or 'char'")


def tokenizer_spec(tokenizer: Tokenizer) -> dict:
    """Everything needed to rebuild `tokenizer` (stored in checkpoints, so they are self-contained)."""
    if isinstance(tokenizer, CharTokenizer):
        return {"kind": "char", "chars": tokenizer.chars, "identity": tokenizer.identity()}
    return {"kind": tokenizer.name, "identity": tokenizer.identity()}


def tokenizer_from_spec(spec: dict) -> Tokenizer:
    tokenizer = CharTokenizer(spec["chars"]) if spec["kind"] == "char" else get_tokenizer(spec["kind"])
    if tokenizer.identity() != spec["identity"]:
        raise TokenizerError(f"the rebuilt {spec['kind']} tokenizer {tokenizer.identity()} differs from the "
                             f"recorded one {spec['identity']}")
    return tokenizer
