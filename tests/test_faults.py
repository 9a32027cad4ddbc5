"""Reliability and security: kills at random points, hostile files, full disks, corrupt inputs, locks."""

import json
import os
import pickle
import random
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from conftest import tiny_train_config
from nbgpt.checkpoint import CheckpointError, load_file, load_latest, save_checkpoint
from nbgpt.files import RunLock, RunLockError
from nbgpt.metrics import read_metrics
from nbgpt.shards import DataError, TokenStore, prepare
from nbgpt.train import Trainer


def start_training(config, env_extra=None):
    path = Path(config.out_dir + ".json")
    path.write_text(json.dumps(asdict(config)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.Popen([sys.executable, "-m", "nbgpt", "train", "--config-json", str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def fault_config(char_data, out, **overrides):
    values = dict(max_steps=24, checkpoint_interval=2, eval_interval=6, eval_batches=40, keep_checkpoints=2,
                  n_embd=128, n_head=4, shuffle=True)
    return tiny_train_config(char_data, out, **{**values, **overrides})


@pytest.fixture(scope="module")
def reference_run(char_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "run"
    process = start_training(fault_config(char_data, str(out)))
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output
    return out


def wait_for(predicate, timeout=120.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.002)
    return False


def trained_through(run, step):
    records = read_metrics(run, "train")
    return bool(records) and records[-1]["step"] >= step


def checkpointed(run, step):
    index = run / "checkpoints" / "checkpoints.json"
    return index.is_file() and json.loads(index.read_text())["checkpoints"][-1]["step"] >= step


def mid_checkpoint_write(run):
    return any((run / "checkpoints").glob(".ckpt_*.tmp"))


@pytest.mark.slow
def test_kill9_at_random_points_then_resume_equals_uninterrupted(char_data, tmp_path, reference_run):
    """12 seeded trials: random steps, mid-checkpoint-write, and mid-evaluation kills."""
    rng = random.Random(1234)
    expected = load_latest(reference_run / "checkpoints")["model"]
    expected_losses = [r["loss"] for r in read_metrics(reference_run, "train")]
    outcomes = []
    for trial in range(12):
        run = tmp_path / f"trial{trial}"
        config = fault_config(char_data, str(run))
        process = start_training(config)
        mode = ("step", "checkpoint-write", "eval")[trial % 3]
        if mode == "step":  # somewhere inside a random optimizer step
            target = rng.randint(1, 22)
            assert wait_for(lambda: trained_through(run, target))
            time.sleep(rng.uniform(0.0, 0.03))
        elif mode == "checkpoint-write":  # while the temp file of a random checkpoint is being written
            target = 2 * rng.randint(1, 11) - 1
            assert wait_for(lambda: trained_through(run, target))
            assert wait_for(lambda: mid_checkpoint_write(run))
        else:  # during the validation pass that follows a random eval step's checkpoint
            target = rng.choice([6, 12, 18])
            assert wait_for(lambda: checkpointed(run, target))
        process.send_signal(signal.SIGKILL)
        process.wait()
        index = run / "checkpoints" / "checkpoints.json"
        killed_at = json.loads(index.read_text())["checkpoints"][-1]["step"] if index.is_file() else 0
        assert killed_at < 24, f"trial {trial} finished before the kill"
        resumed = start_training(config)
        output, _ = resumed.communicate(timeout=300)
        assert resumed.returncode == 0, output
        final = load_latest(run / "checkpoints")
        assert final["step"] == 24
        assert all(torch.equal(final["model"][k], v) for k, v in expected.items()), f"trial {trial} ({mode})"
        assert [r["loss"] for r in read_metrics(run, "train")] == expected_losses
        assert not list((run / "checkpoints").glob(".*.tmp"))
        outcomes.append((trial, mode, target, killed_at))
    print("kill trials (trial, mode, target step, resumed from checkpoint):", outcomes)


MARKER = Path("/nonexistent")


class Payload:
    """Unpickling this would create a marker file: proof that code ran."""

    def __reduce__(self):
        return (Path.touch, (MARKER,))


def test_malicious_checkpoint_is_refused_and_never_runs(tmp_path, char_data):
    global MARKER
    MARKER = tmp_path / "payload-ran"
    run = tmp_path / "run"
    Trainer(tiny_train_config(char_data, run, max_steps=2, checkpoint_interval=1)).fit()
    newest = run / "checkpoints" / "ckpt_0000002.pt"
    torch.save({"format": "nbgpt-checkpoint-1", "model": Payload()}, newest)
    with pytest.raises(CheckpointError, match="refers to getattr, code .*: refused without running it"):
        load_file(newest)
    index = json.loads((run / "checkpoints" / "checkpoints.json").read_text())
    index["checkpoints"][-1]["sha256"] = __import__("nbgpt.files", fromlist=["x"]).sha256_file(newest)
    (run / "checkpoints" / "checkpoints.json").write_text(json.dumps(index))
    messages = []
    trainer = Trainer(tiny_train_config(char_data, run, max_steps=2, checkpoint_interval=1), echo=messages.append)
    assert trainer.step == 1  # fell back to the previous good checkpoint
    assert any("refused" in m for m in messages)
    with open(tmp_path / "plain.pkl", "wb") as f:
        pickle.dump({"model": Payload()}, f)
    with pytest.raises(CheckpointError):
        load_file(tmp_path / "plain.pkl")
    assert not MARKER.exists()


LIMITED_WRITER = textwrap.dedent("""
    import resource, signal, sys
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # a write past the limit fails with EFBIG, like a full disk
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), int(sys.argv[1])))
    exec(sys.argv[2])
""")


def run_limited(limit_bytes: int, code: str):
    return subprocess.run([sys.executable, "-c", LIMITED_WRITER, str(limit_bytes), code], capture_output=True,
                          text=True, timeout=120)


def test_full_disk_during_checkpoint_keeps_previous(tmp_path):
    directory = tmp_path / "ckpts"
    save_checkpoint(directory, 1, {"weights": torch.zeros(10)})
    before = (directory / "checkpoints.json").read_text()
    result = run_limited(200_000, textwrap.dedent(f"""
        import torch
        from nbgpt.checkpoint import save_checkpoint
        save_checkpoint({str(directory)!r}, 2, {{"weights": torch.zeros(1_000_000)}})
    """))
    assert result.returncode != 0
    assert "WriteError" in result.stderr and "ckpt_0000002.pt" in result.stderr and "Free disk space" in result.stderr
    assert (directory / "checkpoints.json").read_text() == before
    assert load_latest(directory)["step"] == 1
    assert sorted(p.name for p in directory.iterdir()) == ["checkpoints.json", "ckpt_0000001.pt"]


def test_full_disk_during_shard_writing_then_clean_rerun(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("All the world's a stage, and all the men and women merely players. " * 4000)
    out = tmp_path / "ds"
    result = run_limited(150_000, f"from nbgpt.shards import prepare; prepare({str(corpus)!r}, 'char', "
                                  f"{str(out)!r}, shard_tokens=100_000, progress=False)")
    assert result.returncode != 0 and "WriteError" in result.stderr and "Free disk space" in result.stderr
    assert not (out / "manifest.json").exists()
    assert all(p.stat().st_size == 200_000 for p in out.glob("shard_*.bin"))  # only complete shards remain
    assert not list(out.glob(".*.tmp"))
    finished = prepare(str(corpus), "char", out, shard_tokens=100_000, progress=False)
    assert finished.manifest["total_tokens"] == len(corpus.read_text()) + 1


def make_read_only(directory: Path) -> bool:
    """chmod for ordinary users; root ignores permissions, so there the immutable attribute is used."""
    if os.geteuid() != 0:
        os.chmod(directory, 0o555)
        return True
    return subprocess.run(["chattr", "+i", str(directory)], capture_output=True).returncode == 0


def make_writable(directory: Path) -> None:
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(directory)], capture_output=True)
    os.chmod(directory, 0o755)


def test_read_only_run_directory_is_named(tmp_path):
    checkpoints = tmp_path / "run" / "checkpoints"
    save_checkpoint(checkpoints, 1, {"weights": torch.zeros(3)})
    if not make_read_only(checkpoints):
        pytest.skip("cannot make a directory read-only for root here (chattr +i unsupported)")
    try:
        with pytest.raises(OSError, match=r"could not write .*ckpt_0000002.pt.*make .*checkpoints writable"):
            save_checkpoint(checkpoints, 2, {"weights": torch.ones(3)})
    finally:
        make_writable(checkpoints)
    assert load_latest(checkpoints)["step"] == 1
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoints.json", "ckpt_0000001.pt"]


def test_corrupt_and_mismatched_inputs_are_named(tmp_path, char_data):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(char_data, data)
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["shards"][0]["tokens"] += 5
    (data / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="shard_000000.bin holds .* bytes but the manifest says"):
        TokenStore(data)
    shutil.rmtree(data)
    shutil.copytree(char_data, data)
    vocab = json.loads((data / "vocab.json").read_text())
    vocab["chars"][0], vocab["chars"][1] = vocab["chars"][1], vocab["chars"][0]
    (data / "vocab.json").write_text(json.dumps(vocab))
    with pytest.raises(DataError, match="differs from the one the dataset was built with"):
        TokenStore(data).tokenizer()
    # a checkpoint trained on char data, resumed against GPT-2 BPE data
    run = tmp_path / "run"
    Trainer(tiny_train_config(char_data, run, max_steps=2, checkpoint_interval=1)).fit()
    (tmp_path / "text.txt").write_text("Now is the winter of our discontent. " * 200)
    prepare(str(tmp_path / "text.txt"), "gpt2", tmp_path / "bpe", shard_tokens=10_000, progress=False)
    with pytest.raises(CheckpointError, match=r"holds checkpoints of another run, trained on .*char_data.*\(tokens: "
                                              r"char, vocabulary \d+\).* choose another out_dir"):
        Trainer(tiny_train_config(tmp_path / "bpe", run, max_steps=4))


def test_two_runs_on_one_directory_are_refused(tmp_path, char_data):
    run = tmp_path / "shared-run"
    process = start_training(tiny_train_config(char_data, str(run), max_steps=100_000, eval_interval=0,
                                               checkpoint_interval=0))
    try:
        assert wait_for(lambda: (run / ".lock").is_file(), 60)
        owner = int((run / ".lock").read_text())
        assert owner == process.pid
        with pytest.raises(RunLockError, match=f"in use by process {owner}"):
            Trainer(tiny_train_config(char_data, run, max_steps=2))
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    # The owner died without cleaning up: its stale lock is taken over.
    assert (run / ".lock").is_file()
    with RunLock(run) as lock:
        assert lock.held and int((run / ".lock").read_text()) == os.getpid()
    assert not (run / ".lock").exists()


def test_a_folder_that_cannot_be_made_is_one_line_naming_the_obstacle(tmp_path):
    """A path under an existing file (NotADirectoryError) or in a file system that takes no folders (/proc)."""
    (tmp_path / "README.md").write_text("a file, not a folder")

    def nbgpt(*args):
        return subprocess.run([sys.executable, "-m", "nbgpt", *args], capture_output=True, text=True, cwd=tmp_path,
                              timeout=300, env={**os.environ, "NBGPT_OFFLINE": "1"})

    prepared = nbgpt("prepare", "shakespeare", "README.md/data")
    assert (prepared.returncode, prepared.stderr) == (2, "nbgpt: WriteError: cannot create the folder README.md/data: "
                                                         "README.md is a file, not a folder; choose another output "
                                                         "folder for the dataset\n")
    under_a_file = nbgpt("run", "--preset", "tiny", "--runs-dir", "README.md/runs")
    assert under_a_file.returncode == 2 and under_a_file.stderr == (
        f"nbgpt: WriteError: cannot create the folder {tmp_path}/README.md/runs/tiny: {tmp_path}/README.md is a file, "
        f"not a folder; choose another run directory (--runs-dir, --out-dir)\n")
    in_proc = nbgpt("run", "--preset", "tiny", "--runs-dir", "/proc/nbgpt-runs")
    assert in_proc.returncode == 2 and in_proc.stderr == (
        "nbgpt: WriteError: cannot create the folder /proc/nbgpt-runs/tiny: /proc does not accept new folders (No "
        "such file or directory); choose another run directory (--runs-dir, --out-dir)\n")


def test_a_byte_corrupted_checkpoint_is_called_damaged_never_malicious(tmp_path):
    """Flipping one byte of the pickle inside a checkpoint makes torch's weights-only unpickler fail with advice to
    set weights_only=False: nbgpt says the file is damaged, which one, and what loads instead."""
    import zipfile

    from nbgpt.model import GPT, GPTConfig
    from nbgpt.tokenizer import CharTokenizer, tokenizer_spec

    tokenizer = CharTokenizer.from_text("to be or not to be\n")
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16))
    checkpoints = tmp_path / "run" / "checkpoints"
    for step in (10, 20):
        save_checkpoint(checkpoints, step, {"model": model.state_dict(), "model_config": model.config.to_dict(),
                                            "tokenizer": tokenizer_spec(tokenizer)})
    newest = checkpoints / "ckpt_0000020.pt"
    with zipfile.ZipFile(newest) as archive:  # the pickle inside the checkpoint's zip, stored uncompressed
        pickled = archive.read(next(name for name in archive.namelist() if name.endswith("data.pkl")))
    data = bytearray(newest.read_bytes())
    data[data.index(pickled) + 2] ^= 0xFF  # the opcode after the protocol header
    newest.write_bytes(bytes(data))
    (tmp_path / "copy.pt").write_bytes(bytes(data))  # the same file outside its run: no recorded hash

    def sample(source):
        return subprocess.run([sys.executable, "-m", "nbgpt", "sample", "--checkpoint", str(source), "--prompt", "to",
                               "--max-new-tokens", "2"], capture_output=True, text=True, timeout=300)

    in_run, alone, run = sample(newest), sample(tmp_path / "copy.pt"), sample(tmp_path / "run")
    assert (in_run.returncode, in_run.stderr) == (2, (
        f"nbgpt: CheckpointError: checkpoint {newest} is damaged: it does not match the sha256 recorded when it was "
        f"written (truncated or corrupted since); pass its folder, {checkpoints}, instead: loading a folder falls "
        f"back to the newest of its checkpoints that verifies, and says which\n"))
    assert (alone.returncode, alone.stderr) == (2, (
        f"nbgpt: CheckpointError: checkpoint {tmp_path / 'copy.pt'} is damaged: torch cannot read it "
        f"(UnpicklingError), so it was truncated or corrupted after it was written; restore it from a copy, or "
        f"train again\n"))
    assert run.returncode == 0 and run.stderr.startswith(
        "using the older checkpoint ckpt_0000010.pt (step 10) because the newer ones are damaged"), run.stderr
