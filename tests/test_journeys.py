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
from nbgpt.checkpoint import load_file, load_latest
from nbgpt.metrics import read_metrics
from nbgpt.train import Trainer

SHRUNK = dict(tokenizer="char", shard_tokens=100_000, val_tokens=None, val_fraction=0.1, prepare_workers=1,
              model="tiny", n_layer=1, n_head=2, n_embd=32, block_size=32, vocab_multiple=1, dropout=0.1,
              total_batch_tokens=256, micro_batch=4, max_steps=40, warmup_steps=4, max_lr=3e-3, eval_interval=20,
              eval_batches=2, hellaswag_interval=0, checkpoint_interval=1000, compile=False, nproc=2, shuffle=True,
              log_interval=5)


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


def run_args(preset, runs, name, corpus, notebooks=("03_train.ipynb",), **extra):
    values = {**SHRUNK, "source": str(corpus), **extra}
    flat = [x for key, value in values.items() for x in ("-p", key, "none" if value is None else str(value))]
    return ["run", "--preset", preset, "--runs-dir", runs, "--name", name, "--notebooks", *notebooks, *flat]


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


@pytest.mark.parametrize("preset,precision,signum", [("gpt2-124m-t4x2", "fp16", signal.SIGTERM),
                                                    ("gpt2-124m", "auto", signal.SIGINT),
                                                    ("gpt2-124m-speedrun-t4x2", "fp16", signal.SIGTERM)])
def test_preset_journey_signal_then_resume_is_bit_exact(preset, precision, signum, corpus, tmp_path):
    runs = tmp_path / "runs"
    straight = nbgpt(*run_args(preset, runs, "straight", corpus, ("01_tokenize.ipynb", "03_train.ipynb"),
                               precision=precision))
    assert straight.returncode == 0, straight.stdout[-3000:] + straight.stderr[-3000:]
    assert "step     35/40 | loss" in straight.stdout  # progress streamed from the training notebook
    assert "val loss" in straight.stdout and (runs / "straight" / "train.log").is_file()

    # The interrupted run trains on the same prepared data (a linked dataset, as the run layout allows).
    (runs / "victim").mkdir()
    (runs / "victim" / "data").symlink_to(runs / "straight" / "data")
    victim = nbgpt(*run_args(preset, runs, "victim", corpus, precision=precision), "--resume", popen=True)
    assert wait_for(lambda: any(r["step"] >= 8 for r in read_metrics(runs / "victim", "train")), victim)
    victim.send_signal(signum)  # a scheduler's SIGTERM, or Ctrl-C in the terminal
    out, err = victim.communicate(timeout=120)
    assert victim.returncode == 128 + signum, out[-2000:] + err[-3000:]
    assert "Traceback" not in err and "ZMQError" not in err, err
    assert err.strip().splitlines()[-1].endswith(f"To go on: python -m nbgpt run --runs-dir {runs} --name victim "
                                                 f"--resume")
    stopped_at = load_latest(runs / "victim" / "checkpoints")["step"]
    assert 8 < stopped_at < 40, "the run finished before the signal"
    assert (runs / "victim" / "train.log").read_text().splitlines()[-1].startswith(
        f"stopped by {signal.Signals(signum).name} at step {stopped_at} with a checkpoint in ")
    assert not (runs / "victim" / ".lock").exists()

    # Exactly the command the last line gave: run.json holds the preset and -p values of the interrupted run.
    resumed = nbgpt("run", "--runs-dir", runs, "--name", "victim", "--notebooks", "03_train.ipynb", "--resume")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resumed from step {stopped_at}" in resumed.stdout
    assert losses(runs / "victim") == losses(runs / "straight")
    reference = final_weights(runs / "straight")
    for name, tensor in final_weights(runs / "victim").items():
        assert torch.equal(tensor, reference[name]), name

def positions(run: Path) -> list:
    """(step, epoch, windows of the epoch read) of every checkpoint: where each step left the data stream."""
    states = [load_file(path) for path in sorted((run / "checkpoints").glob("ckpt_*.pt"))]
    return [(state["step"], state["loader"]["epoch"], state["loader"]["sequence"]) for state in states]


def test_elastic_journey_two_processes_stopped_then_one_with_another_micro_batch(corpus, tmp_path, monkeypatch):
    """A 2×T4 run preempted and continued on one GPU with a smaller micro-batch (so more micro-steps): the
    same windows per step (the loader's position, recorded by a checkpoint after every step), the same steps
    and learning rates, the loss within float noise. fp32 and no dropout: nothing random depends on the layout."""
    from nbgpt.distributed import launch
    from nbgpt.run_config import RunConfig

    runs = tmp_path / "runs"
    # 5,400 tokens, a fifth for validation: 134 training windows of 32 + 1, an epoch of 16 steps of 8 (and 6
    # windows left out), which the resumed layout must end at the same step: 6 is not a multiple of its 2.
    same = dict(precision="fp32", dropout=0.0, max_tokens=5400, val_fraction=0.2, max_steps=24, eval_interval=12,
                checkpoint_interval=1, keep_checkpoints=100)
    # The uninterrupted run: what notebooks 01 and 03 do for nproc 2 (prepare, then launch torchrun), called
    # directly; the journey below goes through the notebooks.
    straight = RunConfig.from_preset("gpt2-124m-t4x2", {**SHRUNK, "source": str(corpus), **same}, runs / "straight")
    straight.prepare.run(runs / "straight" / "data", progress=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    launch(straight.train, nproc=straight.nproc, echo=lambda line: None)
    (runs / "victim").mkdir()
    (runs / "victim" / "data").symlink_to(runs / "straight" / "data")
    victim = nbgpt(*run_args("gpt2-124m-t4x2", runs, "victim", corpus, **same), "--resume", popen=True)
    assert wait_for(lambda: any(r["step"] >= 4 for r in read_metrics(runs / "victim", "train")), victim)
    victim.send_signal(signal.SIGTERM)
    out, err = victim.communicate(timeout=120)
    assert victim.returncode == 128 + signal.SIGTERM, out[-2000:] + err[-3000:]
    stopped_at = load_latest(runs / "victim" / "checkpoints")["step"]
    assert 4 < stopped_at < 16, "the signal came after the epoch's end"

    # One process, micro_batch 2: four micro-steps per step where two ranks took one of 4 sequences each.
    # eval_batches counts batches of micro_batch on each rank: 8 × 2 × 1 keeps the 2 × 4 × 2 windows validated.
    resumed = nbgpt("run", "--runs-dir", runs, "--name", "victim", "--notebooks", "03_train.ipynb", "--resume",
                    "-p", "nproc", "1", "-p", "micro_batch", "2", "-p", "eval_batches", "8")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"4 micro-step(s) per step · resuming at step {stopped_at}" in resumed.stdout
    assert ("trained so far on 2 process(es) x micro_batch 4, now 1 x 2 in 4 micro-step(s): each step reads the "
            "same sequences as before\n") in resumed.stdout  # eval_batches scaled: validation is unchanged
    assert positions(runs / "victim") == positions(runs / "straight")
    assert positions(runs / "straight")[15:17] == [(16, 0, 128), (17, 1, 8)] and len(positions(runs / "victim")) == 24
    ours, theirs = read_metrics(runs / "victim", "train"), read_metrics(runs / "straight", "train")
    assert [(r["step"], r["lr"]) for r in ours] == [(r["step"], r["lr"]) for r in theirs]
    assert [r["loss"] for r in ours[:stopped_at]] == [r["loss"] for r in theirs[:stopped_at]]
    assert [r["loss"] for r in ours] == pytest.approx([r["loss"] for r in theirs], rel=1e-4)
    evals = [[(r["step"], r["val_loss"]) for r in read_metrics(runs / run, "eval")] for run in ("victim", "straight")]
    assert [s for s, _ in evals[0]] == [s for s, _ in evals[1]] == [0, 12, 24]
    assert [v for _, v in evals[0]] == pytest.approx([v for _, v in evals[1]], rel=1e-4)
    reference = final_weights(runs / "straight")
    for name, tensor in final_weights(runs / "victim").items():
        torch.testing.assert_close(tensor, reference[name], rtol=1e-4, atol=1e-5)
    assert json.loads((runs / "victim" / "run.json").read_text())["overrides"]["nproc"] == 1


def strict_json_lines(path: Path) -> list[dict]:
    def refuse(token):
        raise ValueError(f"{token} is not JSON")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def cli_train(config, tmp_path, *extra):
    path = tmp_path / f"{Path(config.out_dir).name}.json"
    path.write_text(json.dumps(vars(config)))
    return nbgpt("train", "--config-json", path, *extra)


def test_divergence_journey_skips_bad_steps_and_names_the_last_good_checkpoint(char_data, tmp_path):
    run = tmp_path / "run"
    result = cli_train(tiny_train_config(char_data, run, max_lr=1e3, warmup_steps=1, checkpoint_interval=2,
                                         max_steps=30), tmp_path)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    error = result.stderr.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("nbgpt: TrainingDiverged: ") and "Traceback" not in result.stderr
    named = error[0].split("the last good checkpoint is ")[1].split(". ")[0]
    assert Path(named).is_file()
    records = strict_json_lines(run / "metrics.jsonl")  # no NaN tokens
    # training stops at the third non-finite step in a row (which step first overflows depends on the CPU's kernels)
    bad = [r["step"] for r in records if r.get("nonfinite")]
    assert bad[-3:] == [bad[-1] - 2, bad[-1] - 1, bad[-1]] and max(r.get("step", 0) for r in records) == bad[-1]
    for checkpoint in (run / "checkpoints").glob("ckpt_*.pt"):  # nothing non-finite was ever written
        model = torch.load(checkpoint, weights_only=True)["model"]
        assert all(torch.isfinite(t).all() for t in model.values()), checkpoint
    assert (run / "train.log").read_text().count("(skipped: non-finite)") == 3

    fresh = tmp_path / "fresh"  # diverging before any checkpoint says so
    result = cli_train(tiny_train_config(char_data, fresh, max_lr=1e3, warmup_steps=1, checkpoint_interval=0,
                                         max_steps=30), tmp_path)
    assert result.returncode == 2 and f"no checkpoint exists yet in {fresh / 'checkpoints'}" in result.stderr


def test_damaged_index_is_rebuilt_and_the_run_is_never_overwritten(char_data, tmp_path):
    from nbgpt.model import ConfigError

    run = tmp_path / "run"
    config = tiny_train_config(char_data, run, max_steps=8, checkpoint_interval=2, eval_interval=0)
    trainer = Trainer(config)
    trainer.fit()
    trainer.close()
    index = run / "checkpoints" / "checkpoints.json"
    good = json.loads(index.read_text())
    damages = {
        "torn": index.read_text()[:40],
        "an empty list": json.dumps({"checkpoints": []}),
        "no sha256": json.dumps({"checkpoints": [{k: v for k, v in e.items() if k != "sha256"}
                                                 for e in good["checkpoints"]]}),
        "non-object entries": json.dumps({"checkpoints": [8, "ckpt_0000008.pt"]}),
    }
    for damage, text in damages.items():
        index.write_text(text)
        notes = []
        assert load_latest(run / "checkpoints", on_skip=notes.append)["step"] == 8, damage
        assert notes and "rebuilt it from 3 verified checkpoint file(s)" in notes[-1], damage
    index.unlink()
    before = (run / "checkpoints" / "ckpt_0000008.pt").read_bytes()
    resumed = Trainer(tiny_train_config(char_data, run, max_steps=10, checkpoint_interval=2, eval_interval=0))
    assert resumed.step == 8  # not 0: nothing truncated, no checkpoint overwritten
    resumed.fit()
    resumed.close()
    assert [r["step"] for r in read_metrics(run, "train")] == list(range(10))
    assert (run / "checkpoints" / "ckpt_0000008.pt").read_bytes() == before

    newest = run / "checkpoints" / "ckpt_0000010.pt"  # a damaged newest file: the fallback is said, with why
    newest.write_bytes(b"\0" * newest.stat().st_size)
    result = nbgpt("sample", "--checkpoint", run, "--max-new-tokens", "5", "--device", "cpu")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "using the older checkpoint ckpt_0000008.pt (step 8)" in result.stderr and "sha256" in result.stderr

    with pytest.raises(ConfigError, match="resume=False would overwrite them"):
        Trainer(tiny_train_config(char_data, run, resume=False))
    assert not (run / ".lock").exists()  # a constructor that raised released the run directory


def test_budget_and_schedule_horizon_belong_to_the_run(char_data, tmp_path):
    from dataclasses import replace

    config = tiny_train_config(char_data, tmp_path / "run", max_steps=10**9, max_seconds=3600.0,
                               checkpoint_interval=0, eval_interval=0)
    first = Trainer(config)
    first.fit(until=5)
    first.close()
    # Step 0 comes before the horizon is fitted (max_steps is still 10⁹): its ETA is bounded by the budget.
    step0 = next(line for line in (tmp_path / "run" / "train.log").read_text().splitlines()
                 if line.startswith("step      0/"))
    hours, minutes, seconds = map(int, step0.rsplit("ETA ", 1)[1].split(":"))
    assert 0 < hours * 3600 + minutes * 60 + seconds <= 3600, step0
    saved = load_latest(tmp_path / "run" / "checkpoints")
    assert saved["elapsed"] > 0 and 5 < saved["max_steps"] < 10**9
    resumed = Trainer(config)
    assert (resumed.step, resumed.elapsed, resumed.max_steps) == (5, saved["elapsed"], saved["max_steps"])
    resumed.fit(until=6)  # the resumed process's first step has no rate of its own: the saved horizon holds
    assert resumed.max_steps == saved["max_steps"]
    resumed.close()
    # The same run with a budget its first process already spent ends after one step instead of starting over.
    spent = Trainer(replace(config, max_seconds=saved["elapsed"]))
    assert spent.step == 6 and spent.fit()["step"] == 7
    spent.close()


def test_peak_flops_measurement_leaves_the_global_rng_alone():
    from nbgpt.device import measured_matmul_flops

    torch.manual_seed(0)
    state = torch.get_rng_state()
    measured_matmul_flops.__wrapped__("cpu", "fp32", max_size=256, seconds=0.01)
    assert torch.equal(state, torch.get_rng_state())


def test_second_signal_exits_at_once_and_keeps_the_latest_good_checkpoint(char_data, tmp_path):
    run = tmp_path / "run"
    # A model big enough that a step and a save take a while: the second signal lands while the first is
    # being honoured (possibly in the middle of a checkpoint write).
    config = tiny_train_config(char_data, run, max_steps=10**6, checkpoint_interval=1, eval_interval=0,
                               n_layer=4, n_embd=256, n_head=4)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(vars(config)))
    process = nbgpt("train", "--config-json", path, popen=True)
    assert wait_for(lambda: any(r["step"] >= 3 for r in read_metrics(run, "train")), process)
    process.send_signal(signal.SIGTERM)
    # Signals of one kind do not queue: the second must follow the first one's acknowledgement.
    ack = "SIGTERM: stopping after this step, with a checkpoint (again: exit at once)"
    assert any(line.strip() == ack for line in iter(process.stderr.readline, ""))
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM
    assert err.strip().splitlines()[-1] == "SIGTERM again: exiting now; the checkpoints on disk are intact"
    latest = load_latest(run / "checkpoints")
    assert latest["step"] >= 3 and all(torch.isfinite(t).all() for t in latest["model"].values())



def test_nbgpt_train_never_continues_the_notebooks_run_and_a_clash_names_the_other_run(char_data, tmp_path):
    """`nbgpt train` without --out-dir and the notebooks run from notebooks/ (run_dir ../runs/default) used to
    share runs/default, so notebook 03 then met the other run's checkpoints and blamed the data."""
    import nbformat

    from nbgpt.run import NOTEBOOKS, notebooks_dir
    from nbgpt.shards import prepare

    tiny = ["--model", "tiny", "--block-size", "32", "--micro-batch", "8", "--total-batch-tokens", "256",
            "--warmup-steps", "1", "--eval-interval", "0", "--precision", "fp32", "--max-steps", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "nbgpt", "train", "--data-dir", str(char_data), *tiny],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    trained = {p.parent.parent.relative_to(tmp_path) for p in tmp_path.glob("**/checkpoints/*.pt")}
    for name in NOTEBOOKS:  # each notebook's own default, run from notebooks/ as JupyterLab does
        cell = next(c for c in nbformat.read(notebooks_dir() / name, 4).cells if "parameters" in c.metadata.get("tags", []))
        scope = {}
        exec(cell.source, scope)
        assert Path("notebooks", scope["run_dir"]).resolve() != (Path.cwd() / next(iter(trained))).resolve()
    assert trained == {Path("runs/train")}
    # A clash made on purpose (another run's data into that directory) names the real cause and the way out.
    (tmp_path / "other.txt").write_text("abcab " * 20_000)
    prepare(str(tmp_path / "other.txt"), "char", tmp_path / "other", shard_tokens=50_000, progress=False)
    clash = subprocess.run([sys.executable, "-m", "nbgpt", "train", "--data-dir", str(tmp_path / "other"), *tiny],
                           capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert clash.returncode == 2 and "Traceback" not in clash.stderr
    assert len(clash.stderr.strip().splitlines()) == 1, clash.stderr
    assert f"runs/train already holds checkpoints of another run, trained on {char_data}" in clash.stderr
    assert "choose another out_dir" in clash.stderr


def stop_when(process, run: Path, step: int) -> int:
    """SIGTERM `process` once `run` has trained past `step`; the step its stop checkpoint holds."""
    assert wait_for(lambda: any(r["step"] >= step for r in read_metrics(run, "train")), process)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, out[-2000:] + err[-3000:]
    return load_latest(run / "checkpoints")["step"]


def test_fsdp_journey_stopped_then_resumed_on_one_and_on_three_processes(corpus, tmp_path, monkeypatch):
    """gpt3-xl's layout (FSDP over the processes) shrunk: 2 sharded processes stopped by SIGTERM, continued on
    1 (plain) and stopped again, finished on 3 sharded ones (uneven shards: 32 rows over 3). Every checkpoint
    is a whole state dict, so each layout takes up the other's; the steps, rates and losses follow the
    uninterrupted 2-process run within float noise. fp32 and no dropout: nothing random depends on the layout."""
    from nbgpt.distributed import launch
    from nbgpt.run_config import RunConfig

    runs = tmp_path / "runs"
    # 384 tokens a step: 2 processes × 2 sequences × 3 micro-steps, 1 × 4 × 3, or 3 × 4 × 1
    same = dict(precision="fp32", dropout=0.0, total_batch_tokens=384, micro_batch=2, max_steps=60,
                eval_interval=30)
    straight = RunConfig.from_preset("gpt3-xl", {**SHRUNK, "source": str(corpus), **same}, runs / "straight")
    assert straight.train.parallel == "fsdp"
    straight.prepare.run(runs / "straight" / "data", progress=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    launch(straight.train, nproc=straight.nproc, echo=lambda line: None)
    (runs / "victim").mkdir()
    (runs / "victim" / "data").symlink_to(runs / "straight" / "data")
    victim = runs / "victim"
    first = stop_when(nbgpt(*run_args("gpt3-xl", runs, "victim", corpus, **same), "--resume", popen=True), victim, 4)
    resume = ("run", "--runs-dir", runs, "--name", "victim", "--notebooks", "03_train.ipynb", "--resume")
    second = stop_when(nbgpt(*resume, "-p", "nproc", "1", "-p", "micro_batch", "4", popen=True), victim, first + 2)
    assert 4 < first < second < 60, (first, second)
    last = nbgpt(*resume, "-p", "nproc", "3", "-p", "micro_batch", "4")
    assert last.returncode == 0, last.stdout[-3000:] + last.stderr[-3000:]
    assert "fsdp over 3 processes · 1 micro-step(s) per step" in last.stdout
    assert "trained so far on 1 process(es) x micro_batch 4, now 3 x 4 in 1 micro-step(s)" in last.stdout
    ours, theirs = read_metrics(victim, "train"), read_metrics(runs / "straight", "train")
    assert [(r["step"], r["lr"]) for r in ours] == [(r["step"], r["lr"]) for r in theirs]
    assert [r["loss"] for r in ours[:first]] == [r["loss"] for r in theirs[:first]]
    assert [r["loss"] for r in ours] == pytest.approx([r["loss"] for r in theirs], rel=1e-4)
    # atol 1e-4: the key bias's exact gradient is 0 (it shifts every score of a query alike, which softmax
    # ignores), so AdamW normalises rounding noise there into steps that differ between layouts
    reference = final_weights(runs / "straight")
    for name, tensor in final_weights(victim).items():
        torch.testing.assert_close(tensor, reference[name], rtol=1e-4, atol=1e-4)
