"""Experiment trackers, offline: what W&B and TensorBoard receive is read back from their own files and must be
what metrics.jsonl holds, through a crash and a resume; a tracker that cannot work is one line before training;
one that breaks mid-run is one line in train.log, and training finishes."""

import html
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import tiny_train_config
from nbgpt.metrics import read_metrics
from nbgpt.model import ConfigError
from nbgpt.stop import TrainingStopped
from nbgpt.train import Trainer
from nbgpt.run_config import TrainConfig

RUN = dict(max_steps=10, checkpoint_interval=4, eval_interval=4, sample_interval=5, sample_tokens=4)


class Crash(Exception):
    """The process dies after this record: the newest checkpoint is older than the last logged step."""


def crash_after(step: int):
    def on_record(record: dict) -> None:
        if record["kind"] == "train" and record["step"] == step:
            raise Crash
    return on_record


def sigterm_after(step: int):
    def on_record(record: dict) -> None:
        if record["kind"] == "train" and record["step"] == step:
            os.kill(os.getpid(), signal.SIGTERM)  # a scheduler's stop: the trainer checkpoints after this step
    return on_record


def interrupted_twice(config: TrainConfig) -> None:
    """Three attempts at one run. The first dies after step 6 (its newest checkpoint is step 4's), so the second
    trains steps 4-6 again, and metrics.jsonl keeps that second time only; SIGTERM stops the second after step
    7 with a checkpoint, and the third trains steps 8-9."""
    first = Trainer(config)
    with pytest.raises(Crash):
        first.fit(on_record=crash_after(6))
    first.close()
    second = Trainer(config)
    assert second.step == 4
    with pytest.raises(TrainingStopped):
        second.fit(on_record=sigterm_after(7))  # closes the trainer, and with it the tracker
    third = Trainer(config)
    assert third.step == 8
    third.fit()
    third.close()
    assert [r["step"] for r in read_metrics(config.out_dir, "train")] == list(range(10))


# ------------------------------------------------------------------------------------------- TensorBoard


def test_tensorboard_shows_metrics_jsonl_with_each_step_once_after_a_crash_and_resume(char_data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator as TensorReader

    run = tmp_path / "run"
    interrupted_twice(tiny_train_config(char_data, run, tracker="tensorboard", **RUN))
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 3  # one per attempt
    board = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    board.Reload()
    train = read_metrics(run, "train")
    for key in ("loss", "lr", "grad_norm", "tokens_per_s"):
        events = board.Scalars(f"train/{key}")
        assert [e.step for e in events] == list(range(10)), key  # the redone steps 4-6 once, the second time
        assert [e.value for e in events] == pytest.approx([r[key] for r in train], rel=1e-6), key  # float32
    evals = board.Scalars("eval/val_loss")
    assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in evals] == [
        (r["step"], r["val_loss"]) for r in read_metrics(run, "eval")]

    texts = TensorReader(str(run / "tensorboard"), size_guidance={"tensors": 0})
    texts.Reload()
    samples = [(e.step, e.tensor_proto.string_val[0].decode()) for e in texts.Tensors("sample/text/text_summary")]
    # a code block: TensorBoard renders text as markdown, which would drop line breaks and format `_` and `*`
    assert samples == [(r["step"], f"```\n{r['text']}\n```") for r in read_metrics(run, "sample")] and samples
    configs = [(e.step, e.tensor_proto.string_val[0].decode()) for e in texts.Tensors("config/text_summary")]
    assert [step for step, _ in configs] == [0, 4, 8]  # each attempt says what it trains, where
    assert configs[-1][1].startswith("```\n{") and configs[-1][1].endswith("}\n```")
    assert '"precision": "fp32"' in configs[-1][1] and '"device": "cpu"' in configs[-1][1]


@pytest.mark.filterwarnings("ignore:html5lib's sanitizer is deprecated:DeprecationWarning")  # inside TensorBoard
@pytest.mark.parametrize("text", ["ROMEO_and_JULIET: *soft*\n\n  what light", "a ``` in it, and ```` too"])
def test_tensorboard_shows_sample_text_as_written(text):
    """What TensorBoard's text tab shows (its own markdown renderer): every character and line break."""
    from tensorboard.plugin_util import markdown_to_safe_html

    from nbgpt.trackers import code_block

    shown = markdown_to_safe_html(code_block(text))
    assert shown.startswith("<pre><code>") and shown.endswith("</code></pre>"), shown
    assert html.unescape(shown[len("<pre><code>"):-len("</code></pre>")]) == text + "\n"


# TensorBoard's writer thread dies with the error, and Python prints its traceback, before the trainer hears of it
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_tracker_that_breaks_mid_run_is_said_once_and_training_finishes(char_data, tmp_path):
    run = tmp_path / "run"

    def remove_the_event_files(record):  # its folder vanishes (a cleanup, an unmounted drive)
        if record["kind"] == "train" and record["step"] == 3:
            while (run / "tensorboard").exists():  # the writer's thread may add a file while it is removed
                shutil.rmtree(run / "tensorboard", ignore_errors=True)

    trainer = Trainer(tiny_train_config(char_data, run, tracker="tensorboard", **RUN))
    summary = trainer.fit(on_record=remove_the_event_files)
    trainer.close()
    assert summary["step"] == 10
    assert [r["step"] for r in read_metrics(run, "train")] == list(range(10))  # metrics.jsonl stays the record
    said = [line for line in (run / "train.log").read_text().splitlines() if "tracker" in line]
    assert len(said) == 1 and said[0].startswith("tracker tensorboard failed (FileNotFoundError: ")
    assert said[0].endswith("it is off for the rest of this run, which goes on: metrics.jsonl stays the record")


# --------------------------------------------------------------------------------------------------- W&B


def wandb_records(path: Path):
    """The records of an offline W&B run file (<run>.wandb): a 7-byte file header, then a LevelDB-style log of
    32 KiB blocks, each record in chunks with a 7-byte header (checksum, length, type: 1 whole, 2 first,
    3 middle, 4 last), each record a serialized wandb_internal_pb2.Record."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32 * 1024
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    position, pieces = 7, b""
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        _checksum, length, kind = struct.unpack("<IHB", data[position:position + 7])
        pieces += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces)
            yield record
            pieces = b""


def wandb_quiet(tmp_path: Path) -> dict:
    """Environment variables that keep W&B's settings, caches and messages out of the way, in tmp_path."""
    folders = {name: str(tmp_path / folder) for name, folder in (
        ("WANDB_DIR", "wandb"), ("WANDB_CONFIG_DIR", "config"), ("WANDB_CACHE_DIR", "cache"),
        ("WANDB_DATA_DIR", "data"))}
    return {**folders, "WANDB_SILENT": "true"}


def wandb_attempt(folder: Path) -> dict:
    """One offline W&B run folder: its run id, its history {step: {key: value}}, its config, and whether it
    ends with the record of the run's end."""
    (path,) = folder.glob("run-*.wandb")
    history, config, run_id, exited = {}, {}, None, False
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run_id = record.run.run_id
        elif kind == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history[items["_step"]] = items
        elif kind == "config":
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
        exited = kind == "exit"
    return {"id": run_id, "history": history, "config": config, "exited": exited}


def assert_wandb_holds_metrics(run: Path, attempts: list[dict]) -> None:
    """The attempts' histories, the later over the earlier (as `wandb sync` in order leaves them), hold the
    train, eval and sample records of metrics.jsonl, value for value."""
    merged = {step: row for attempt in attempts for step, row in attempt["history"].items()}
    for record in read_metrics(run, "train"):
        row = merged[record["step"]]
        assert (row["train/loss"], row["train/lr"], row["train/grad_norm"]) == (
            record["loss"], record["lr"], record["grad_norm"]), record["step"]
    assert [(s, row["eval/val_loss"]) for s, row in merged.items() if "eval/val_loss" in row] == [
        (r["step"], r["val_loss"]) for r in read_metrics(run, "eval")]
    assert [(s, row["sample/text"]) for s, row in merged.items() if "sample/text" in row] == [
        (r["step"], r["text"]) for r in read_metrics(run, "sample")]


def test_wandb_offline_run_holds_metrics_jsonl_and_a_resume_continues_the_same_run(char_data, tmp_path,
                                                                                   monkeypatch):
    for name, value in {**wandb_quiet(tmp_path), "WANDB_MODE": "offline"}.items():
        monkeypatch.setenv(name, value)
    run = tmp_path / "run"
    interrupted_twice(tiny_train_config(char_data, run, tracker="wandb", **RUN))

    attempts = [wandb_attempt(folder) for folder in sorted((run / "wandb").glob("offline-run-*"))]
    run_id = json.loads((run / "tracker.json").read_text())["wandb_run_id"]
    assert [attempt["id"] for attempt in attempts] == [run_id] * 3  # each resume continues the same W&B run
    assert all(attempt["exited"] for attempt in attempts)  # each was written whole before the next began
    assert [[s for s, row in attempt["history"].items() if "train/loss" in row] for attempt in attempts] == [
        list(range(7)), list(range(4, 8)), list(range(8, 10))]
    # Offline, W&B cannot know which steps it holds: both attempts carry 4-6, equal but for timings (the
    # resume is bit-exact); synced in order, the later one is what metrics.jsonl kept.
    assert_wandb_holds_metrics(run, attempts)
    assert {key: attempts[-1]["config"][key] for key in ("device", "precision", "max_steps", "tracker")} == {
        "device": "cpu", "precision": "fp32", "max_steps": 10, "tracker": "wandb"}


def test_wandb_through_nbgpt_run_keeps_every_step_up_to_a_sigterm_and_the_resume_continues(shakespeare_works,
                                                                                          tmp_path):
    """The Kaggle cell's journey: `nbgpt run` trains in a notebook kernel; a SIGTERM to `nbgpt run` (passed on
    to the kernel) stops training with a checkpoint, and W&B must hold every step trained until then, its run
    closed whole, before the resume continues it from there."""
    corpus, runs = tmp_path / "plays.txt", tmp_path / "runs"
    corpus.write_text(shakespeare_works[0])
    shrunk = dict(source=corpus, tracker="wandb", shard_tokens=100_000, n_layer=1, n_head=2, n_embd=32, block_size=32,
                  total_batch_tokens=256, micro_batch=8, max_steps=150, eval_interval=50, sample_interval=60,
                  sample_tokens=16, checkpoint_interval=1000)
    flags = [x for key, value in shrunk.items() for x in ("-p", key, str(value))]
    command = [sys.executable, "-m", "nbgpt", "run", "--preset", "tiny", "--runs-dir", str(runs), "--name", "r"]
    env = {**os.environ, **wandb_quiet(tmp_path), "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([*command, "--notebooks", "01_tokenize.ipynb", "03_train.ipynb", *flags], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run = runs / "r"
    while first.poll() is None and not any(r["step"] >= 20 for r in read_metrics(run, "train")):
        time.sleep(0.01)  # the stop comes mid-training
    first.send_signal(signal.SIGTERM)
    out, err = first.communicate(timeout=120)
    assert first.returncode == 128 + signal.SIGTERM, out[-2000:] + err[-3000:]
    assert "Traceback" not in err and "Exception ignored" not in err, err  # W&B's service was not killed under it
    stopped_at = [r["step"] for r in read_metrics(run, "train")][-1] + 1
    assert stopped_at < 150, "the run finished before the signal"
    log = (run / "train.log").read_text()
    assert f"stopped by SIGTERM at step {stopped_at} with a checkpoint" in log and "tracker" not in log, log

    resumed = subprocess.run([*command, "--notebooks", "03_train.ipynb", "--resume"], env=env, capture_output=True,
                             text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert "tracker" not in (run / "train.log").read_text()
    attempts = [wandb_attempt(folder) for folder in sorted((run / "wandb").glob("offline-run-*"))]
    assert len(attempts) == 2 and attempts[0]["id"] == attempts[1]["id"]
    assert all(attempt["exited"] for attempt in attempts)  # each closed whole, the stopped one too
    assert [[s for s, row in attempt["history"].items() if "train/loss" in row] for attempt in attempts] == [
        list(range(stopped_at)), list(range(stopped_at, 150))]  # up to the stop, then on from it: no gap
    assert_wandb_holds_metrics(run, attempts)


def test_wandb_that_cannot_reach_its_server_gives_up_within_its_init_timeout_and_training_goes_on(
        char_data, tmp_path, monkeypatch):
    """A key that looks right but a network that is down: W&B's own 90 s wait (and its retries) before step 0
    becomes WANDB_INIT_SECONDS, said once in train.log. Port 9 (discard) refuses at once here, with no network."""
    from nbgpt.trackers import WANDB_INIT_SECONDS

    for name in ("WANDB_MODE", "WANDB_SERVICE"):  # online, with a service of its own
        monkeypatch.delenv(name, raising=False)
    for name, value in {**wandb_quiet(tmp_path), "WANDB_API_KEY": "0123456789" * 4,
                        "WANDB_BASE_URL": "http://127.0.0.1:9", "NETRC": str(tmp_path / "netrc")}.items():
        monkeypatch.setenv(name, value)
    run = tmp_path / "run"
    began = time.monotonic()
    trainer = Trainer(tiny_train_config(char_data, run, tracker="wandb", **RUN))  # opens the tracker
    # a bound on waiting, not a speed: W&B's default would wait 90 s and more before training started
    assert time.monotonic() - began < WANDB_INIT_SECONDS + 45
    summary = trainer.fit()
    trainer.close()
    assert summary["step"] == 10 and [r["step"] for r in read_metrics(run, "train")] == list(range(10))
    said = [line for line in (run / "train.log").read_text().splitlines() if "tracker" in line]
    assert len(said) == 1 and said[0].startswith("tracker wandb failed (CommError: "), said
    assert said[0].endswith("it is off for the rest of this run, which goes on: metrics.jsonl stays the record")


# ------------------------------------------------------------------------------- refused before training


@pytest.mark.parametrize("name", ["wandb", "tensorboard"])
def test_a_tracker_that_is_not_installed_is_one_line_before_training(char_data, tmp_path, name):
    config = tiny_train_config(char_data, tmp_path / "run")
    path = tmp_path / "config.json"
    path.write_text(json.dumps(vars(config)))
    hide = f"import sys; sys.modules[{name!r}] = None; from nbgpt.__main__ import main; sys.exit(main(sys.argv[1:]))"
    result = subprocess.run([sys.executable, "-c", hide, "train", "--config-json", str(path), "--tracker", name],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"nbgpt: ConfigError: tracker={name!r} needs the {name} package, which is not installed: "
        f"pip install 'nbgpt[{name}]' (or set tracker=none)"]
    assert not (tmp_path / "run").exists()  # refused before the run directory was touched


def test_wandb_without_a_login_stops_nbgpt_run_before_the_first_notebook(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_API_KEY", "WANDB_MODE")}
    env.update(NETRC=str(tmp_path / "netrc"), WANDB_CONFIG_DIR=str(tmp_path / "wandb"), OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "nbgpt", "run", "--preset", "tiny", "-p", "tracker", "wandb",
                             "--runs-dir", str(tmp_path / "runs")], capture_output=True, text=True, timeout=120,
                            env=env)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        "nbgpt run: invalid configuration: tracker='wandb' but W&B has no API key here: set WANDB_API_KEY (a "
        "Kaggle secret, see the README) or run `wandb login`; or set WANDB_MODE=offline to keep the run on disk "
        "for `wandb sync`"]
    assert not (tmp_path / "runs").exists()


def test_an_unknown_tracker_is_named():
    with pytest.raises(ConfigError, match=r"^tracker must be none, wandb or tensorboard, got 'wandbb'$"):
        TrainConfig(tracker="wandbb")
