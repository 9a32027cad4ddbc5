"""The five notebooks as users run them: committed clean, executed by papermill through `nbgpt run`."""

import json
import os
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from nbgpt.checkpoint import resolve_checkpoint
from nbgpt.metrics import read_metrics
from nbgpt.run import NOTEBOOKS

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "data" / "hellaswag_fixture.jsonl"
# The pieces each notebook rebuilds by hand and checks against nbgpt: a cell that asserts prints "✓ <name>..."
# once its assertions hold, so a check that is removed, or whose assertion fails, leaves its line missing.
CHECKS = {
    "02_model.ipynb": ["bigram loss", "causal mask", "one head", "attention", "MLP", "block", "forward pass",
                       "weight tying", "residual init", "padded vocabulary"],
    "03_train.ipynb": ["data loader", "loss at init", "learning-rate schedule", "gradient accumulation",
                       "DDP data split"],
    "04_evaluate_hellaswag.ipynb": ["HellaSwag scoring"],
    "05_sample.ipynb": ["KV-cached step"],
}


def test_notebooks_committed_clean_with_parameters_cell():
    for name in NOTEBOOKS:
        cells = json.loads((ROOT / "notebooks" / name).read_text())["cells"]
        code = [c for c in cells if c["cell_type"] == "code"]
        assert all(not c["outputs"] and c["execution_count"] is None for c in code), name
        tagged = [c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])]
        assert len(tagged) == 1 and tagged[0] is code[0], f"{name}: the first code cell must be the parameters"
        assert all(len("".join(c["source"]).splitlines()) <= 15 for c in code), name


def checks_that_ran(executed: Path) -> list[str]:
    """The lines "✓ ..." printed by cells of an executed notebook that assert something."""
    lines = []
    for cell in json.loads(executed.read_text())["cells"]:
        if cell["cell_type"] == "code" and "assert" in "".join(cell["source"]):
            text = "".join("".join(o["text"]) for o in cell["outputs"] if o["output_type"] == "stream")
            lines += [line[2:] for line in text.splitlines() if line.startswith("✓ ")]
    return lines


def assert_checks_ran(run_dir: Path, notebooks) -> None:
    for name in notebooks:
        ran = checks_that_ran(run_dir / name)
        missing = [check for check in CHECKS[name] if not any(line.startswith(check) for line in ran)]
        assert not missing and len(ran) == len(CHECKS[name]), f"{name}: {missing} did not run; ran {ran}"


def stream_text(executed: Path) -> str:
    cells = json.loads(executed.read_text())["cells"]
    return "".join("".join(o["text"]) for c in cells for o in c.get("outputs", []) if o["output_type"] == "stream")


def shown_sources(executed: Path) -> str:
    cells = json.loads(executed.read_text())["cells"]
    return "\n".join("".join(o.get("data", {}).get("text/plain", "")) for c in cells for o in c.get("outputs", []))


def nbgpt_run(*args, runs_dir):
    cmd = [sys.executable, "-m", "nbgpt", "run", "--runs-dir", str(runs_dir), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ})


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def char_run(tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    result = nbgpt_run("--preset", "tiny", "-p", "max_steps", "12", "-p", "n_layer", "1", "-p", "prompt", "JULIET:",
                       "-p", "weight_decay", "0.05", "-p", "bias", "False", "-p", "compile", "false", "-p", "errors",
                       "replace", "-p", "top_p", "none", "-p", "tracker", "tensorboard", runs_dir=runs)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return runs / "tiny", result.stdout


def test_pipeline_runs_every_notebook_and_reports(char_run):
    run_dir, stdout = char_run
    for name in NOTEBOOKS:
        executed = json.loads((run_dir / name).read_text())
        errors = [o for c in executed["cells"] for o in c.get("outputs", []) if o.get("output_type") == "error"]
        assert not errors, name
    final = read_metrics(run_dir, "eval")[-1]
    assert f"final val loss:     {final['val_loss']:.4f} at step 12 (" in stdout  # and what it averaged
    assert "samples.txt" in stdout and "loss.png" in stdout
    assert json.loads((run_dir / "hellaswag.json").read_text())["skipped"].startswith("HellaSwag is English text")


def test_notebooks_rebuild_the_lectures_pieces_and_show_nbgpts_own_source(char_run):
    """Every rebuilt piece's assert_close ran on a char-level model, and the source the notebooks show is the
    library's as it is now (rendered at run time, never a pasted copy)."""
    from nbgpt.generate import Decoder
    from nbgpt.hellaswag import score_candidates
    from nbgpt.loader import DataLoader
    from nbgpt.model import GPT, Block, CausalSelfAttention, attention, attention_probs
    from nbgpt.schedule import lr_at
    from nbgpt.show import show
    from nbgpt.train import Trainer

    run_dir, _ = char_run
    assert_checks_ran(run_dir, NOTEBOOKS[1:])
    shown = {"02_model.ipynb": [CausalSelfAttention, attention, attention_probs, Block, GPT.forward, GPT.head],
             "03_train.ipynb": [DataLoader.next_batch, lr_at, Trainer.train_step],
             "04_evaluate_hellaswag.ipynb": [score_candidates], "05_sample.ipynb": [Decoder.steps]}
    for name, objects in shown.items():
        text = shown_sources(run_dir / name)
        assert all(repr(show(obj)) in text for obj in objects), name
        cells = json.loads((ROOT / "notebooks" / name).read_text())["cells"]
        code = "".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
        assert not any(show(obj).code.splitlines()[0] in code for obj in objects), f"{name} pastes library source"


def test_progress_streams_live_and_executed_notebooks_hold_readable_lines(char_run):
    """The saved notebooks are read, not watched: no bar redrawn with "\r" (each redraw was kept, ~30 of them
    in a demo's record), a few whole-line frames at most, and the training lines of train.log."""
    run_dir, stdout = char_run
    assert "step     11/12 | loss" in stdout and "| val loss" in stdout  # streamed from train.log
    assert "step     11/12 | loss" in (run_dir / "train.log").read_text()

    def streams(name):
        cells = json.loads((run_dir / name).read_text())["cells"]
        return "".join("".join(o["text"]) for c in cells for o in c.get("outputs", []) if o["output_type"] == "stream")

    assert not [name for name in NOTEBOOKS if "\r" in streams(name)]
    assert "step     11/12 | loss" in streams("03_train.ipynb")
    frames = [line for line in streams("03_train.ipynb").splitlines() if line.startswith("training:")]
    assert 1 <= len(frames) <= 3 and "12/12" in frames[-1]


def test_executed_notebooks_are_a_clean_record(char_run):
    """No stray reprs, the schedule and attention figures drawn, and the panel's static copy saved."""
    run_dir, _ = char_run
    outputs = {name: [o for c in json.loads((run_dir / name).read_text())["cells"] for o in c.get("outputs", [])]
               for name in NOTEBOOKS}
    plain = ["".join(o.get("data", {}).get("text/plain", "")) for name in NOTEBOOKS for o in outputs[name]]
    assert "[]" not in plain and not any(text.startswith("PromptPanel(") for text in plain)
    assert sum("image/png" in o.get("data", {}) for o in outputs["03_train.ipynb"]) >= 3  # live, loss, schedule
    assert sum("image/png" in o.get("data", {}) for o in outputs["05_sample.ipynb"]) >= 1  # attention map
    widget = "application/vnd.jupyter.widget-view+json"
    panel = [o["data"] for o in outputs["05_sample.ipynb"]
             if widget in o.get("data", {}) and "text/html" in o["data"]][-1]
    assert "".join(panel["text/plain"]).startswith("nbgpt prompt panel, last output:\nJULIET:")
    assert "tokens/s" in "".join(panel["text/html"])
    streaming = next(c for c in json.loads((run_dir / "05_sample.ipynb").read_text())["cells"] if c["id"] == "05-04")
    assert len(streaming["outputs"]) == 1  # one output redrawn, not one per streamed piece
    assert "".join(streaming["outputs"][0]["data"]["text/plain"]).startswith("JULIET:")


def test_parameter_overrides_take_effect(char_run):
    run_dir, _ = char_run
    checkpoint = resolve_checkpoint(run_dir)
    assert checkpoint["step"] == 12 and checkpoint["model_config"]["n_layer"] == 1
    assert checkpoint["train_config"]["weight_decay"] == 0.05  # a TrainConfig field set by -p
    assert checkpoint["model_config"]["bias"] is False and checkpoint["train_config"]["compile"] is False
    assert not any(name.endswith(".bias") for name in checkpoint["model"])  # a GPTConfig field set by -p
    assert (run_dir / "samples.txt").read_text().count("JULIET:") == 2  # num_return_sequences=2 in the preset
    assert [r["step"] for r in read_metrics(run_dir, "train")] == list(range(12))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(run_dir / "tensorboard"))  # the tracker knob reached the training notebook
    board.Reload()
    assert [e.step for e in board.Scalars("train/loss")] == list(range(12))


def test_plots_are_pngs_of_the_logged_curves(char_run):
    import matplotlib

    matplotlib.use("Agg")
    from nbgpt.plots import evaluation_figure, loss_figure

    run_dir, _ = char_run
    for name in ("loss.png", "evaluation.png"):
        width, height = png_size(run_dir / name)
        assert width > 500 and height > 300
    figure = loss_figure(run_dir)
    lines = {line.get_label(): line for line in figure.axes[0].get_lines()}
    train = read_metrics(run_dir, "train")
    assert list(lines["train loss (per step)"].get_ydata()) == [r["loss"] for r in train]
    evals = read_metrics(run_dir, "eval")
    (label,) = [name for name in lines if name.startswith("validation loss")]  # all points average 4 batches
    assert label == "validation loss (4 batches)" or label.startswith("validation loss (whole validation split")
    assert list(lines[label].get_ydata()) == [r["val_loss"] for r in evals]
    bigram = json.loads((run_dir / "bigram.json").read_text())["val_loss"]
    assert lines["bigram baseline (val)"].get_ydata()[0] == bigram
    evaluation = evaluation_figure(run_dir, {"acc_norm": 0.3, "count": 20})
    references = sorted(line.get_ydata()[0] for line in evaluation.axes[1].get_lines()[:3])
    assert references == [0.25, 0.2955, 0.337]


def test_gpt2_tokenizer_run_scores_hellaswag(tmp_path):
    # The speedrun recipe: the rebuilt pieces' other branches (rotary, QK-norm, ReLU², an untied soft-capped head)
    result = nbgpt_run("--preset", "tiny", "--name", "bpe", "-p", "tokenizer", "gpt2", "-p", "max_steps", "6",
                       "-p", "hellaswag_path", str(FIXTURE), "-p", "bigram_steps", "5", "-p", "prompt", "Hello, I'm a language model,",
                       "-p", "recipe", "speedrun", "--notebooks", *NOTEBOOKS[:4], runs_dir=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    scored = json.loads((tmp_path / "bpe" / "hellaswag.json").read_text())
    assert scored["count"] == 20 and 0.0 <= scored["acc_norm"] <= 1.0
    assert_checks_ran(tmp_path / "bpe", NOTEBOOKS[1:4])  # the rebuilt pieces hold for GPT-2's BPE vocabulary too
    assert "QK-norm, rotary positions" in stream_text(tmp_path / "bpe" / "02_model.ipynb")
    first = json.loads(FIXTURE.read_text().splitlines()[0])["ctx"]  # a real HellaSwag example was scored by hand
    assert repr(first) in stream_text(tmp_path / "bpe" / "04_evaluate_hellaswag.ipynb")


def test_failing_cell_names_notebook_and_keeps_partial_output(tmp_path):
    result = nbgpt_run("--preset", "tiny", "-p", "source", str(tmp_path / "no-such-corpus.txt"), runs_dir=tmp_path)
    assert result.returncode != 0
    assert "01_tokenize.ipynb failed in cell" in result.stderr and "SourceError" in result.stderr
    assert "no files found" in result.stderr
    partial = json.loads((tmp_path / "tiny" / "01_tokenize.ipynb").read_text())
    assert any(o.get("output_type") == "error" for c in partial["cells"] for o in c.get("outputs", []))
    assert not (tmp_path / "tiny" / "02_model.ipynb").exists()


def test_bad_run_arguments(tmp_path):
    unknown = nbgpt_run("--preset", "tiny", "-p", "max_stepz", "3", runs_dir=tmp_path)
    assert unknown.returncode == 2 and "unknown parameter(s) ['max_stepz']" in unknown.stderr
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "metrics.jsonl").write_text("")
    exists = nbgpt_run("--preset", "tiny", runs_dir=tmp_path)
    assert exists.returncode == 2 and "pass --resume" in exists.stderr
    no_preset = nbgpt_run("--name", "tiny", runs_dir=tmp_path)  # only a resumed run remembers its preset
    assert no_preset.returncode == 2 and no_preset.stderr.strip() == (
        "nbgpt run: --preset is required (only --resume --name NAME may leave it out: the run remembers its preset)")
    nothing = nbgpt_run("--name", "tiny", "--resume", runs_dir=tmp_path)  # a folder without run.json
    assert nothing.returncode == 2 and nothing.stderr.strip().endswith(
        "holds no run to resume (no run.json); start it with --preset")


def test_resume_continues_a_run_from_its_checkpoint(tmp_path):
    first = nbgpt_run("--preset", "tiny", "-p", "max_steps", "6", "-p", "checkpoint_interval", "3",
                      "--notebooks", *NOTEBOOKS[:3], runs_dir=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    saved = (tmp_path / "tiny" / "run.json").read_text()
    other = nbgpt_run("--preset", "tiny", "--resume", "-p", "recipe", "speedrun", runs_dir=tmp_path)
    assert other.returncode == 2, other.stderr[-2000:]
    assert "has checkpoints trained with other settings (recipe None there, 'speedrun' here, optimizer" in other.stderr
    assert "[nbgpt] 01_tokenize" not in other.stdout  # refused before any notebook
    assert (tmp_path / "tiny" / "run.json").read_text() == saved  # and not recorded: --resume alone still works
    for name, value, named in (("seq_len", "32", "seq_len 64 there, 32 here"),
                               ("total_batch_tokens", "2048", "total_batch_tokens 1024 there, 2048 here"),
                               ("recipe", "gpt2", "recipe None there, 'gpt2' here")):  # its lr, not its model
        order = nbgpt_run("--name", "tiny", "--resume", "-p", name, value, runs_dir=tmp_path)  # another data order
        assert order.returncode == 2 and f"has checkpoints trained with other settings ({named}); resume with" in order.stderr
        assert "[nbgpt] 01_tokenize" not in order.stdout and (tmp_path / "tiny" / "run.json").read_text() == saved
    # A device this machine does not have is refused before any notebook (the memory check resolves it), and
    # not kept: the run never took it.
    elsewhere = nbgpt_run("--name", "tiny", "--resume", "-p", "device", "cuda:7", "--notebooks", "03_train.ipynb",
                          runs_dir=tmp_path)
    assert elsewhere.returncode == 2 and "device='cuda:7' but torch sees no CUDA GPU" in elsewhere.stderr
    assert "[nbgpt] 03_train" not in elsewhere.stdout and (tmp_path / "tiny" / "run.json").read_text() == saved
    # An attempt that fails in a notebook (its dataset moved away meanwhile) leaves run.json as it was.
    (tmp_path / "tiny" / "data").rename(tmp_path / "data-away")
    failed = nbgpt_run("--name", "tiny", "--resume", "-p", "max_steps", "7", "--notebooks", "03_train.ipynb",
                       runs_dir=tmp_path)
    (tmp_path / "data-away").rename(tmp_path / "tiny" / "data")
    assert failed.returncode == 2 and "[nbgpt] 03_train" in failed.stdout, failed.stderr[-2000:]
    assert (tmp_path / "tiny" / "run.json").read_text() == saved
    again = nbgpt_run("--name", "tiny", "--resume", "-p", "max_steps", "9", "-p", "checkpoint_interval", "3",
                      runs_dir=tmp_path)  # the preset from run.json
    assert again.returncode == 0, again.stderr[-3000:]
    executed = (tmp_path / "tiny" / "03_train.ipynb").read_text()
    assert "resuming at step 6" in executed
    assert [r["step"] for r in read_metrics(tmp_path / "tiny", "train")] == list(range(9))
    assert resolve_checkpoint(tmp_path / "tiny")["step"] == 9


def stop_the_kernel_mid_training(runs_dir, signum, after_step, *args):
    """Start (or resume) a tiny run, send `signum` to the notebook kernel itself (not to
    `nbgpt run`) once training has logged a step past `after_step`, and return the finished `nbgpt run`."""
    import time

    from nbgpt.files import children

    cmd = [sys.executable, "-m", "nbgpt", "run", "--runs-dir", str(runs_dir), "--preset", "tiny", "-p", "max_steps",
           "100000", "-p", "checkpoint_interval", "2", *args]
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while not any(r["step"] > after_step for r in read_metrics(runs_dir / "tiny", "train")):
        assert process.poll() is None, process.communicate()
        time.sleep(0.2)  # polling interval of the condition above
    os.kill(children(process.pid)[0], signum)
    out, err = process.communicate(timeout=300)
    return process.returncode, out, err


def test_a_signal_to_the_notebook_kernel_stops_the_run_in_one_line_with_the_resume_command(tmp_path):
    """SIGTERM to the kernel stops training with a checkpoint; a kernel that dies (a second SIGTERM exits it at
    once, as kill -9 does) leaves the checkpoints intact: either way one line, the resume command and the exit
    status of a stopped run, no traceback."""
    resume = f"To go on: python -m nbgpt run --runs-dir {tmp_path} --name tiny --resume"
    rc, _, err = stop_the_kernel_mid_training(tmp_path, signal.SIGTERM, 2, "--notebooks", *NOTEBOOKS[:3])
    assert rc == 128 + signal.SIGTERM and "Traceback" not in err, err[-3000:]
    partial = tmp_path / "tiny" / "03_train.ipynb"
    assert err.strip().splitlines()[-1] == (f"nbgpt run: 03_train.ipynb stopped by SIGTERM to its kernel, with a "
                                            f"checkpoint; the partial notebook is kept at {partial}. {resume}")
    stopped_at = resolve_checkpoint(tmp_path / "tiny")["step"]
    rc, _, err = stop_the_kernel_mid_training(tmp_path, signal.SIGKILL, stopped_at + 2, "--resume",
                                             "--notebooks", NOTEBOOKS[2])
    assert rc == 128 + signal.SIGTERM and "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1].startswith("nbgpt run: the kernel running 03_train.ipynb died (a second stop "
                                                   "signal ends it at once") and err.strip().endswith(resume)
    assert resolve_checkpoint(tmp_path / "tiny")["step"] > stopped_at  # training resumed and checkpointed again


def test_make_demo_runs_again_replacing_only_its_own_run(tmp_path):
    """A second `make demo` used to exit 2 ("already exists"). Through the Makefile (a shrunk preset via PRESET
    and ARGS): the second replaces the first, saying so; a run of the user's is kept, and so is the previous
    demo when the new one is refused for a bad setting."""
    runs = tmp_path / "runs"
    venv = Path(sys.prefix)

    def make_demo(args):
        cmd = ["make", "--no-print-directory", "-C", str(ROOT), "-o", f"{venv}/.installed", f"VENV={venv}", "demo",
               "PRESET=tiny", f"ARGS=--runs-dir {runs} --notebooks 01_tokenize.ipynb {args}"]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=600)

    first = make_demo("")
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    (runs / "tiny" / "from-the-first-run.txt").write_text("")
    refused = make_demo("-p max_stepz 3")
    assert refused.returncode != 0 and "max_stepz" in refused.stderr
    assert (runs / "tiny" / "from-the-first-run.txt").exists()
    second = make_demo("")
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
    assert "held an earlier run started with --replace (make demo): replacing it" in second.stdout
    assert not (runs / "tiny" / "from-the-first-run.txt").exists() and (runs / "tiny" / "data").is_dir()
    mine = nbgpt_run("--preset", "tiny", "--name", "mine", "--notebooks", "01_tokenize.ipynb", runs_dir=runs)
    assert mine.returncode == 0, mine.stderr[-2000:]
    kept = make_demo("--name mine")
    assert kept.returncode != 0 and "was not started with --replace" in kept.stderr and "it is kept" in kept.stderr
    assert (runs / "mine" / "01_tokenize.ipynb").is_file()


def test_make_lab_opens_working_copies_so_the_tracked_notebooks_stay_clean(tmp_path):
    """JupyterLab saves outputs into the notebook it runs: `make lab` opens copies (made once, never
    overwritten), not notebooks/, which git tracks. LAB_ARGS=--version starts nothing but the copying."""
    lab, venv = tmp_path / "lab", Path(sys.prefix)
    cmd = ["make", "--no-print-directory", "-C", str(ROOT), "-o", f"{venv}/.installed", f"VENV={venv}", "lab",
           f"LAB_DIR={lab}", "LAB_ARGS=--version"]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    for name in NOTEBOOKS:
        assert (lab / name).read_bytes() == (ROOT / "notebooks" / name).read_bytes()
    (lab / NOTEBOOKS[2]).write_text((lab / NOTEBOOKS[2]).read_text().replace("# 3 · Train", "# 3 · Train, my notes"))
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and f"{lab / NOTEBOOKS[2]} kept" in again.stdout
    assert "my notes" in (lab / NOTEBOOKS[2]).read_text()
