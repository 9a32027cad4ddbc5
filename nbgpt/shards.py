"""Documents -> uint16 token shards + a JSON manifest: the on-disk dataset every later step reads.

Layout of a dataset folder:
    manifest.json          what was built, from what, shard sizes and hashes, the train/val split
    shard_000000.bin ...   raw little-endian uint16 token ids, each document preceded by end-of-text
    vocab.json             the char vocabulary, for char-level datasets
    progress.json          only while building: where to resume after an interruption

The manifest is written last, so its presence is what marks a dataset complete. With `max_tokens` the
dataset is the source's first N tokens exactly: the document that reaches the cap is cut there, and nothing
after it is read, so the time and disk a build takes follow N, not the size of the corpus.
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from .knobs import ConfigError, differences
from .errors import NbgptError
from .files import atomic_write, atomic_write_json, make_dirs, read_json, remove_stale_temp_files, sha256_file
from .sources import Source, SourceError, get_source
from .tokenizer import CharTokenizer, Tokenizer, get_tokenizer

MANIFEST = "manifest.json"
PROGRESS = "progress.json"
VOCAB = "vocab.json"
FORMAT_VERSION = 1
UINT16_LIMIT = 1 << 16


class DataError(NbgptError, ValueError):
    """A dataset that cannot be built or read."""


def shard_name(index: int) -> str:
    return f"shard_{index:06d}.bin"


# ------------------------------------------------------------------------------------- tokenizing workers

_worker_tokenizer: Tokenizer | None = None


def _init_worker(kind: str, vocab_path: str | None) -> None:
    global _worker_tokenizer
    _worker_tokenizer = get_tokenizer(kind, vocab_path)


def _encode_documents(documents: list[str], tokenizer: Tokenizer | None = None) -> tuple[np.ndarray, list[int]]:
    """Encode a batch of documents into one uint16 array, each document prefixed by end-of-text."""
    tokenizer = tokenizer or _worker_tokenizer
    assert tokenizer is not None
    if hasattr(tokenizer, "encode_batch"):
        encoded = tokenizer.encode_batch(documents)
    else:
        encoded = [tokenizer.encode(doc) for doc in documents]
    lengths = [len(ids) + 1 for ids in encoded]
    out = np.empty(sum(lengths), dtype=np.uint16)
    position = 0
    for ids, length in zip(encoded, lengths):
        out[position] = tokenizer.eot
        out[position + 1: position + length] = ids
        position += length
    return out, lengths


def _batched(documents: Iterable[str], batch_chars: int, skip: int) -> Iterator[list[str]]:
    """Group documents into batches of about `batch_chars` characters, after skipping `skip` of them."""
    batch: list[str] = []
    size = 0
    for number, doc in enumerate(documents):
        if number < skip:
            continue
        if not isinstance(doc, str):
            raise SourceError(f"document {number} is {type(doc).__name__}, not text")
        batch.append(doc)
        size += len(doc)
        if size >= batch_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _tokenized(source: Source, tokenizer: Tokenizer, vocab_path: Path | None, workers: int, skip: int,
               batch_chars: int) -> Iterator[tuple[np.ndarray, list[int]]]:
    batches = _batched(source, batch_chars, skip)
    if workers <= 1:
        for batch in batches:
            yield _encode_documents(batch, tokenizer)
        return
    # spawn, not fork: the parent may be a notebook kernel with torch's thread pools already running.
    context = mp.get_context("spawn")
    with context.Pool(workers, initializer=_init_worker,
                      initargs=(tokenizer.name, str(vocab_path) if vocab_path else None)) as pool:
        yield from pool.imap(_encode_documents, batches, chunksize=1)


# ---------------------------------------------------------------------------------------------- prepare


@dataclass
class PrepareResult:
    out_dir: Path
    manifest: dict
    built: bool  # False when a finished dataset was found and reused


def _content_hash(shards: list[dict]) -> str:
    return hashlib.sha256("".join(s["sha256"] for s in shards).encode()).hexdigest()


def check_cap(max_tokens: int | None, val_tokens: int | None) -> None:
    """Refuse a token cap that leaves nothing to train on (ConfigError: it is a setting, known before any data)."""
    if max_tokens is None:
        return
    if max_tokens < 1:
        raise ConfigError(f"max_tokens must be positive (or none for the whole source), got {max_tokens}")
    if val_tokens is not None and max_tokens <= val_tokens:
        raise ConfigError(f"max_tokens={max_tokens} leaves no training tokens after val_tokens={val_tokens}; raise "
                          f"max_tokens above val_tokens (e.g. to {10 * val_tokens}, a tenth for validation) or "
                          f"lower val_tokens")


def _splits(total: int, val_fraction: float | None, val_tokens: int | None) -> dict[str, list[int]]:
    """Token ranges of the splits over the concatenated shards.

    `val_tokens` takes the first N tokens for validation (build-nanogpt: the first FineWeb shard);
    `val_fraction` takes the last fraction (nanoGPT's 90/10 split of a small corpus).
    """
    if val_tokens is not None:
        if val_tokens >= total:
            raise DataError(f"val_tokens={val_tokens} takes all {total} tokens of the corpus for validation and "
                            f"leaves none to train on; lower val_tokens (e.g. to {total // 10}) or use val_fraction")
        boundary = val_tokens
        return {"val": [0, boundary], "train": [boundary, total]}
    boundary = total - int(round(total * (val_fraction or 0.0)))
    return {"train": [0, boundary], "val": [boundary, total]}


def prepare(source: str | Source, tokenizer: str | Tokenizer, out_dir: str | os.PathLike, *,
            shard_tokens: int = 100_000_000, workers: int = 1, val_fraction: float | None = 0.1,
            val_tokens: int | None = None, max_tokens: int | None = None, min_window: int = 2,
            text_column: str = "text", errors: str = "strict", source_path: str | None = None,
            batch_chars: int = 1 << 20, progress: bool = True) -> PrepareResult:
    """Tokenize `source` into shards under `out_dir` (see the module docstring for the layout).

    A finished dataset with the same settings is detected and reused; an interrupted build resumes from
    its last complete shard. `max_tokens` keeps the first N tokens of the source (validation included) and
    stops reading there; None takes the whole source. `min_window` is the smallest number of tokens each
    split must hold (a model with context T needs T + 1). Output is byte-identical whatever `workers` is.
    """
    check_cap(max_tokens, val_tokens)
    if shard_tokens < 2:
        raise DataError(f"shard_tokens must be at least 2, got {shard_tokens}")
    if val_fraction is not None and not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    out = Path(out_dir)
    src = get_source(source, text_column=text_column, errors=errors, path=source_path)
    settings = {"source": src.describe(), "tokenizer_kind": tokenizer if isinstance(tokenizer, str) else tokenizer.name,
                "shard_tokens": shard_tokens, "val_fraction": None if val_tokens is not None else val_fraction,
                "val_tokens": val_tokens, "max_tokens": max_tokens}
    finished = _finished_dataset(out, settings, min_window)
    if finished is not None:
        return PrepareResult(out, finished, built=False)

    make_dirs(out, "choose another output folder for the dataset")
    tok, vocab_path = _dataset_tokenizer(tokenizer, src, out, max_tokens)
    writer = ShardWriter(out, shard_tokens, key={"settings": settings, "tokenizer": tok.identity()},
                         max_tokens=max_tokens)
    _write_source(writer, src, tok, vocab_path, workers, batch_chars, progress)
    manifest = _finish(writer, src, tok, settings, min_window)
    return PrepareResult(out, manifest, built=True)


def _finish(writer: ShardWriter, src: Source, tok: Tokenizer, settings: dict, min_window: int) -> dict:
    """Close the last shard and write the manifest, last: its presence marks the dataset complete."""
    shards = writer.finish()
    total = sum(s["tokens"] for s in shards)
    if writer.documents_in_shards == 0 or total == 0:
        raise DataError(f"source {src.name!r} produced no documents; check the path or dataset")
    manifest = {
        "format": FORMAT_VERSION, "settings": settings, "tokenizer": tok.identity(),
        "documents": writer.documents_in_shards, "total_tokens": total, "shards": shards,
        "splits": _splits(total, settings["val_fraction"], settings["val_tokens"]),
        "content_sha256": _content_hash(shards), "dtype": "uint16",
    }
    check_manifest(writer.out, manifest, min_window)
    atomic_write_json(writer.out / MANIFEST, manifest)
    writer.progress_path.unlink(missing_ok=True)
    return manifest


def _write_source(writer: ShardWriter, src: Source, tok: Tokenizer, vocab_path: Path | None, workers: int,
                  batch_chars: int, progress: bool) -> None:
    """Tokenize the documents the writer has not consumed yet into it, until the source ends or the cap is met."""
    from .metrics import progress_bar

    if writer.full:
        return  # an interrupted build that had already reached its cap: nothing more to read
    bar = progress_bar(desc=f"tokenizing {src.name}", unit=" docs", initial=writer.documents, disable=not progress)
    # closing(): leaving the loop early ends the generator now, and with it the worker pool that feeds it
    with closing(_tokenized(src, tok, vocab_path, workers, writer.documents, batch_chars)) as batches:
        for tokens, lengths in batches:
            if len(tokens) and int(tokens.max()) >= tok.vocab_size:
                raise DataError(f"token id {int(tokens.max())} is outside the tokenizer's vocabulary")
            writer.add(tokens, lengths)
            bar.update(len(lengths))
            bar.set_postfix(tokens=f"{writer.tokens:,}", refresh=False)
            if writer.full:
                break  # the cap: the rest of the source is never read
    bar.close()


def _finished_dataset(out: Path, settings: dict, min_window: int) -> dict | None:
    """The manifest of a finished dataset built with `settings`, None if there is none; another one is refused."""
    manifest_path = out / MANIFEST
    if not manifest_path.is_file():
        return None
    manifest = read_json(manifest_path)
    # A setting the manifest lacks is one added to nbgpt after the dataset was built: .get reads it as None,
    # which is how such a dataset was built (e.g. max_tokens=None, the whole source).
    old = manifest.get("settings", {})
    if not (differ := differences(old, settings)):
        check_manifest(out, manifest, min_window)
        return manifest
    raise DataError(f"{out} already holds a dataset built with other settings ({differ}); prepare with its "
                    f"settings, choose another directory, or delete {manifest_path} to rebuild")


def _dataset_tokenizer(tokenizer: str | Tokenizer, src: Source, out: Path,
                       max_tokens: int | None = None) -> tuple[Tokenizer, Path | None]:
    """The tokenizer to build with, and for char-level data the vocabulary saved beside the shards (every
    character of the documents that reach the shards: one extra pass over them, unless an interrupted build
    already saved it)."""
    kind = tokenizer if isinstance(tokenizer, str) else tokenizer.name
    vocab_path = None
    if kind != "char":
        tok = get_tokenizer(kind) if isinstance(tokenizer, str) else tokenizer
    else:
        vocab_path = out / VOCAB
        if isinstance(tokenizer, CharTokenizer):
            tok = tokenizer
        elif vocab_path.is_file():
            tok = CharTokenizer.load(vocab_path)
        else:
            chars: set[str] = set()
            tokens = 0
            for doc in src:
                chars.update(doc)
                tokens += 1 + len(doc)  # one token per character, after the end-of-text token
                if max_tokens is not None and tokens >= max_tokens:
                    break  # the cap cuts this document: no later one reaches the shards
            if not chars:
                raise DataError(f"source {src.name!r} has no text")
            tok = CharTokenizer(sorted(chars))
        tok.save(vocab_path)
    if tok.vocab_size > UINT16_LIMIT:
        raise DataError(f"tokenizer {tok.name!r} has {tok.vocab_size} tokens; uint16 shards hold ids below "
                        f"{UINT16_LIMIT}. Use a tokenizer with at most 65,536 tokens")
    return tok, vocab_path


class ShardWriter:
    """Documents' tokens -> shard files of `shard_tokens` tokens each, with a resume point after every shard.

    progress.json records the complete shards, the documents they consumed and how far into the next
    document the last shard reached, under a key (settings and tokenizer): a rerun with the same key
    continues from there and leaves the complete shards as they are; anything else starts over.
    With `max_tokens`, the writer takes no token past the N-th: the document that reaches it is cut there, and
    (documents, skip_tokens) then point inside it, as after a shard boundary.
    """

    def __init__(self, out: Path, shard_tokens: int, key: dict, max_tokens: int | None = None):
        self.out, self.shard_tokens, self.key, self.max_tokens = out, shard_tokens, key, max_tokens
        self.progress_path = out / PROGRESS
        state = self._resume_point()
        self.shards: list[dict] = list(state["shards"])
        self.documents: int = state["next_doc"]  # documents consumed so far
        self.skip_tokens: int = state["skip_tokens"]  # tokens of the next document already in a shard
        self.buffer = np.empty(shard_tokens, dtype=np.uint16)
        self.fill = 0  # tokens in the buffer

    def _resume_point(self) -> dict:
        state = {"shards": [], "next_doc": 0, "skip_tokens": 0}
        if self.progress_path.is_file():
            saved = read_json(self.progress_path)
            if saved.get("key") == self.key and all((self.out / s["file"]).is_file()
                                                    for s in saved["state"]["shards"]):
                state = saved["state"]
        remove_stale_temp_files(self.out)  # half-written shards of a killed build
        for stale in self.out.glob("shard_*.bin"):
            if stale.name not in {s["file"] for s in state["shards"]}:
                stale.unlink()
        return state

    @property
    def tokens(self) -> int:
        """Tokens written so far, the buffered ones included."""
        return sum(s["tokens"] for s in self.shards) + self.fill

    @property
    def full(self) -> bool:
        """The cap is reached: no more documents are wanted."""
        return self.max_tokens is not None and self.tokens >= self.max_tokens

    @property
    def documents_in_shards(self) -> int:
        """Documents with tokens in the shards: the consumed ones, and one the cap cut short."""
        return self.documents + (1 if self.skip_tokens else 0)

    def add(self, tokens: np.ndarray, lengths: list[int]) -> None:
        """Append documents (concatenated in `tokens`, one length each), writing every shard they fill;
        stop at the cap, in the middle of a document if that is where it falls."""
        # a batch never holds more tokens than its own, so without a cap len(tokens) is no limit
        room = len(tokens) if self.max_tokens is None else self.max_tokens - self.tokens
        offset = 0
        for length in lengths:
            if room <= 0:
                return
            position = self.skip_tokens  # tokens of this document that an earlier run already wrote
            self.skip_tokens = 0
            end = min(length, position + room)
            room -= end - position
            while position < end:
                take = min(self.shard_tokens - self.fill, end - position)
                self.buffer[self.fill: self.fill + take] = tokens[offset + position: offset + position + take]
                self.fill += take
                position += take
                if self.fill == self.shard_tokens:
                    done = position == length
                    self._write_shard(self.documents + 1 if done else self.documents, 0 if done else position)
            if position < length:  # the cap cut this document: the resume point is inside it
                self.skip_tokens = position
                return
            offset += length
            self.documents += 1

    def finish(self) -> list[dict]:
        """Write the last, partial shard; the shards' file, tokens and sha256."""
        if self.fill:
            self._write_shard(self.documents, self.skip_tokens)
        return self.shards

    def _write_shard(self, next_doc: int, skip_tokens: int) -> None:
        path = self.out / shard_name(len(self.shards))
        data = self.buffer[:self.fill].tobytes()
        atomic_write(path, lambda f: f.write(data))
        self.shards.append({"file": path.name, "tokens": self.fill, "sha256": sha256_file(path)})
        self.fill = 0
        atomic_write_json(self.progress_path, {"key": self.key, "state": {
            "shards": self.shards, "next_doc": next_doc, "skip_tokens": skip_tokens}})



# ---------------------------------------------------------------------------------------------- reading


def check_manifest(data_dir: Path, manifest: dict, min_window: int = 2, verify_hashes: bool = False) -> None:
    """Raise DataError if the shards on disk disagree with the manifest or a split is too small."""
    for shard in manifest["shards"]:
        path = data_dir / shard["file"]
        if not path.is_file():
            raise DataError(f"{path} is listed in {data_dir / MANIFEST} but missing; rebuild the dataset")
        size = path.stat().st_size
        if size != 2 * shard["tokens"]:
            raise DataError(f"{path} holds {size} bytes but the manifest says {shard['tokens']} tokens "
                            f"({2 * shard['tokens']} bytes): the shard is truncated or replaced; rebuild the "
                            f"dataset (delete {data_dir / MANIFEST} and prepare again)")
        if verify_hashes and sha256_file(path) != shard["sha256"]:
            raise DataError(f"{path} does not match the sha256 in the manifest: the shard is corrupt; rebuild it")
    if sum(s["tokens"] for s in manifest["shards"]) != manifest["total_tokens"]:
        raise DataError(f"{data_dir / MANIFEST}: shard token counts do not add up to total_tokens")
    for split, (start, end) in manifest["splits"].items():
        size = end - start  # an empty val split is allowed (val_fraction=0); a non-empty one must hold a window
        if size < min_window and (split == "train" or size > 0):
            raise DataError(f"the {split} split has {end - start} tokens, fewer than one window of "
                            f"{min_window} (context + 1): use a longer corpus, a smaller block_size, or a "
                            f"different val_fraction or val_tokens")


class TokenStore:
    """A dataset's shards as one long read-only token array (memory-mapped, nothing loaded up front)."""

    def __init__(self, data_dir: str | os.PathLike):
        self.data_dir = Path(data_dir)
        manifest_path = self.data_dir / MANIFEST
        if not manifest_path.is_file():
            raise DataError(f"{self.data_dir} has no {MANIFEST}: it is not a finished nbgpt dataset; run "
                            f"nbgpt.shards.prepare (or `python -m nbgpt prepare`) first")
        self.manifest = read_json(manifest_path)
        check_manifest(self.data_dir, self.manifest)
        self.maps = [np.memmap(self.data_dir / s["file"], dtype=np.uint16, mode="r")
                     for s in self.manifest["shards"]]
        self.starts = np.cumsum([0] + [len(m) for m in self.maps])
        self.total = int(self.starts[-1])

    def tokenizer(self) -> Tokenizer:
        identity = self.manifest["tokenizer"]
        tok = get_tokenizer(identity["kind"], self.data_dir / VOCAB if identity["kind"] == "char" else None)
        if tok.identity() != identity:
            raise DataError(f"the tokenizer found for {self.data_dir} ({tok.identity()}) differs from the one the "
                            f"dataset was built with ({identity}); the vocab.json beside it was changed")
        return tok

    def split_range(self, split: str) -> tuple[int, int]:
        if split not in self.manifest["splits"]:
            raise DataError(f"unknown split {split!r}; this dataset has {sorted(self.manifest['splits'])}")
        start, end = self.manifest["splits"][split]
        return int(start), int(end)

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) across shard boundaries."""
        if start < 0 or start + length > self.total:
            raise IndexError(f"tokens [{start}, {start + length}) outside a dataset of {self.total}")
        shard = int(np.searchsorted(self.starts, start, side="right")) - 1
        local = start - int(self.starts[shard])
        first = self.maps[shard][local: local + length]
        if len(first) == length:
            return np.asarray(first)
        parts, remaining = [first], length - len(first)
        while remaining:
            shard += 1
            piece = self.maps[shard][:remaining]
            parts.append(piece)
            remaining -= len(piece)
        return np.concatenate(parts)

    def document_starts(self, start: int, end: int, eot: int) -> np.ndarray:
        """Global offsets of the end-of-text tokens (document starts) within [start, end)."""
        found = []
        for index, tokens in enumerate(self.maps):
            lo, hi = max(start, int(self.starts[index])), min(end, int(self.starts[index + 1]))
            if lo < hi:
                base = int(self.starts[index])
                found.append(np.flatnonzero(tokens[lo - base: hi - base] == eot) + lo)
        return np.concatenate(found) if found else np.zeros(0, dtype=np.int64)


def describe_dataset(data_dir: str | os.PathLike) -> dict:
    """A short summary of a prepared dataset for notebooks and logs."""
    store = TokenStore(data_dir)
    manifest = store.manifest
    train, val = store.split_range("train"), store.split_range("val")
    return {"source": manifest["settings"]["source"]["name"], "tokenizer": manifest["tokenizer"]["kind"],
            "vocab_size": manifest["tokenizer"]["vocab_size"], "documents": manifest["documents"],
            "total_tokens": manifest["total_tokens"], "train_tokens": train[1] - train[0],
            "val_tokens": val[1] - val[0], "shards": len(manifest["shards"])}
