"""Unattended runs, rehearsed end to end on the CPU: each GPU preset shrunk with -p and run through
`nbgpt run` with two gloo processes, stopped by SIGTERM mid-training, resumed by a fresh process, and
compared bit for bit with an uninterrupted run; then the divergence, damaged-index and budget journeys.

The presets' GPU-only settings are overridden here: nproc stays 2 but runs on gloo; gpt2-124m's
compile=True becomes False (compiling takes minutes on 2 cores); FineWeb-Edu (unreachable offline) becomes
a local text file with the char tokenizer; the model and batch shrink to seconds. gpt2-124m-t4x2 keeps
precision fp16, so its GradScaler path runs (torch runs fp16 autocast on the CPU too).
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import tiny_train_config
from nbgpt.checkpoint import load_latest
from nbgpt.metrics import read_metrics
from nbgpt.train import Trainer

SHRUNK = dict(tokenizer="char", shard_tokens=100_000, val_tokens=None, val_fraction=0.1, prepare_workers=1,
              model="tiny", n_layer=1, n_head=2, n_embd=32, block_size=32, vocab_multiple=1, dropout=0.1,
              total_batch_tokens=256, micro_batch=4, max_steps=60, warmup_steps=4, max_lr=3e-3, eval_interval=20,
              eval_batches=2, hellaswag_interval=0, checkpoint_interval=1000, compile=False, nproc=2, shuffle=True,
              log_interval=5)
NOTEBOOKS = ("01_tokenize.ipynb", "03_train.ipynb")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, shakespeare_works):
    path = tmp_path_factory.mktemp("corpus") / "plays.txt"
    path.write_text("\n".join(shakespeare_works[:2]))
    return path


def nbgpt(*args, popen=False):
    cmd = [sys.executable, "-m", "nbgpt", *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if popen:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def run_args(preset, runs, name, corpus, **extra):
    values = {**SHRUNK, "source": str(corpus), **extra}
    flat = [x for key, value in values.items() for x in ("-p", key, repr(value) if value is not str else value)]
    return ["run", "--preset", preset, "--runs-dir", runs, "--name", name, "--notebooks", *NOTEBOOKS, *flat]


def wait_for(predicate, process, timeout=180.0):
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        if predicate():
            return True
        time.sleep(0.01)
    return False


def final_weights(run: Path) -> dict:
    return load_latest(run / "checkpoints")["model"]


def losses(run: Path) -> list:
    return [(r["step"], r["loss"]) for r in read_metrics(run, "train")]


@pytest.mark.parametrize("preset,precision", [("gpt2-124m-t4x2", "fp16"), ("gpt2-124m", "auto")])
def test_preset_journey_sigterm_then_resume_is_bit_exact(preset, precision, corpus, tmp_path):
    runs = tmp_path / "runs"
    straight = nbgpt(*run_args(preset, runs, "straight", corpus, precision=precision))
    assert straight.returncode == 0, straight.stdout[-3000:] + straight.stderr[-3000:]
    assert "step     55/60 | loss" in straight.stdout  # progress streamed from the training notebook
    assert "val loss" in straight.stdout and (runs / "straight" / "train.log").is_file()

    victim = nbgpt(*run_args(preset, runs, "victim", corpus, precision=precision), popen=True)
    assert wait_for(lambda: any(r["step"] >= 8 for r in read_metrics(runs / "victim", "train")), victim)
    victim.send_signal(signal.SIGTERM)
    out, err = victim.communicate(timeout=120)
    assert victim.returncode == 128 + signal.SIGTERM, out[-2000:] + err[-3000:]
    assert "Traceback" not in err and "Resume with: python -m nbgpt run --preset " + preset in err
    stopped_at = load_latest(runs / "victim" / "checkpoints")["step"]
    assert 8 < stopped_at < 60, "the run finished before the signal"
    assert not (runs / "victim" / ".lock").exists()

    resumed = nbgpt(*run_args(preset, runs, "victim", corpus, precision=precision), "--resume")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resumed from step {stopped_at}" in resumed.stdout
    assert losses(runs / "victim") == losses(runs / "straight")
    reference = final_weights(runs / "straight")
    for name, tensor in final_weights(runs / "victim").items():
        assert torch.equal(tensor, reference[name]), name
