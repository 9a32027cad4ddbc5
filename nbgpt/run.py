"""The pipeline: execute the five notebooks in order with papermill, into one run directory.

    runs/<name>/
        01_tokenize.ipynb ... 05_sample.ipynb    executed copies (kept, partial, when a cell fails)
        data/                                    shards + manifest (or a link to a shared dataset)
        checkpoints/  metrics.jsonl  train.log  bigram.json  hellaswag.json  samples.txt  *.png
        run.json                                 the preset and -p values, reused by --resume
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .checkpoint import latest_checkpoint
from .knobs import ConfigError, ConfigWarning, config_warnings_to, differences
from .errors import NbgptError
from .files import RunLock, atomic_write_json, children, read_json, signal_tree
from .memory import refuse_unfit
from .metrics import read_metrics
from .run_config import RunConfig
from .stop import StopSignals, TrainingStopped, signal_name
from .trackers import check_tracker

RUN_FILE = "run.json"  # the preset and -p values the run was started with
# The kernel's own start-up notices (e.g. that its sockets are local TCP without encryption) say nothing
# about the run; its errors still reach the terminal.
KERNEL_ARGUMENTS = ["--IPKernelApp.log_level=ERROR"]
NOTEBOOKS = ("01_tokenize.ipynb", "02_model.ipynb", "03_train.ipynb", "04_evaluate_hellaswag.ipynb",
             "05_sample.ipynb")


class RunError(NbgptError, RuntimeError):
    """A notebook of the pipeline failed, or the run cannot start."""



def notebooks_dir() -> Path:
    return Path(os.environ.get("NBGPT_NOTEBOOKS", Path(__file__).resolve().parents[1] / "notebooks"))


def check_run(preset: str, overrides: dict, run_dir: Path, echo=print) -> dict:
    """Build the run's whole RunConfig before any notebook starts; returns the overrides, typed.

    A bad value, an unknown name, a batch that does not split over nproc, a tracker that cannot work or, on a GPU
    machine, a model that does not fit its GPU even at micro-batch 1 (nbgpt.memory) stops here, in seconds,
    rather than notebooks later; settings that contradict each other are echoed as warnings.
    """
    try:
        with config_warnings_to(lambda line: echo(f"[nbgpt] {line}")):
            checked = RunConfig.from_preset(preset, overrides, run_dir)
            check_tracker(checked.train.tracker)  # not installed, no login
            refuse_unfit(checked)
    except ConfigError as exc:
        raise RunError(f"invalid configuration: {exc}") from None
    return checked.values(overrides)


@dataclass
class RunResult:
    run_dir: Path
    notebooks: list[Path]
    plots: list[Path]
    samples: Path | None
    final_val_loss: float | None
    hellaswag: dict | None
    final_eval: dict | None = None  # the record of final_val_loss (its step, and what it averaged)
    warnings: list[str] = field(default_factory=list)  # what training warned of in train.log (a short budget)


def run_pipeline(preset: str | None, overrides: dict | None = None, name: str | None = None, runs_dir: str = "runs",
                 resume: bool = False, notebooks: list[str] | None = None, echo=print,
                 replace: bool = False) -> RunResult:
    """Execute the notebooks of `preset` (all five, or those named) into runs/<name>. Resuming a named run,
    `preset` may be None: the one in its run.json. With `replace` (what `make demo` passes), an earlier run in
    runs/<name> that was itself started with `replace` is deleted and started over; any other is refused."""
    run_dir = Path(runs_dir).resolve() / (name or preset)
    if preset is None:
        preset = recorded_preset(run_dir)
    replacing = run_dir.exists() and any(run_dir.iterdir()) and not resume
    if replacing and not (replace and replaceable(run_dir, preset)):
        kept = " (it was not started with --replace, as make demo starts its run: it is kept)" if replace else ""
        raise RunError(f"{run_dir} already exists{kept}; pass --resume to continue it (training resumes from its "
                       f"last checkpoint) or --name to start a new run")
    saved = {} if replacing else saved_overrides(run_dir, preset)
    typed = check_run(preset, {**saved, **(overrides or {})}, run_dir, echo)
    if not replacing:
        check_continuable(preset, saved, typed, run_dir)
    chosen = [notebooks_dir() / n for n in notebooks or NOTEBOOKS]
    if missing := [path.name for path in chosen if not path.is_file()]:
        raise RunError(f"notebook(s) {missing} not found in {notebooks_dir()}")
    if replacing:  # only now: a run refused for a bad setting keeps the previous one
        clear_run(run_dir, f"[nbgpt] {run_dir} held an earlier run started with --replace (make demo): replacing "
                           f"it with a new one", echo)
    marked = {"replace": True} if replace or (resume and replaceable(run_dir, preset)) else {}  # replaceable()
    # The lock is ours; the kernels papermill starts, and the torchrun workers they launch, are admitted as
    # our descendants. train.log is written by the training notebook's trainer and streamed here.
    with RunLock(run_dir), LogTail(run_dir / "train.log", echo), StopSignals(forward=_to_kernels) as stop, \
            recorded(run_dir, {"preset": preset, "overrides": typed, **marked}):
        parameters = {"run_dir": str(run_dir), "preset": preset, "overrides": typed}
        resume = f"python -m nbgpt run --runs-dir {runs_dir} --name {run_dir.name} --resume"
        executed = [execute_notebook(path, run_dir, parameters, stop, resume, echo) for path in chosen]
    return summarize(run_dir, executed)


def execute_notebook(notebook: Path, run_dir: Path, parameters: dict, stop: StopSignals, resume: str,
                     echo=print) -> Path:
    """Run one notebook with papermill into run_dir; its executed copy. A failing cell is a RunError naming it,
    a stop signal (to `nbgpt run` or to the kernel) a TrainingStopped that ends with `resume`."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    output = run_dir / notebook.name
    echo(f"[nbgpt] {notebook.name} -> {output}")
    try:
        papermill.execute_notebook(str(notebook), str(output), parameters=parameters, kernel_name="python3",
                                   cwd=str(run_dir), progress_bar=False, log_output=False,
                                   extra_arguments=KERNEL_ARGUMENTS)
    except Exception as exc:
        if stop.signum is not None:
            raise TrainingStopped(f"stopped by {signal_name(stop.signum)} in {notebook.name}; the partial notebook "
                                  f"is kept at {output}", stop.signum, resume=resume) from None
        if (stopped := kernel_stopped(exc, notebook.name, output, resume)) is not None:
            raise stopped from None
        if not isinstance(exc, PapermillExecutionError):
            raise
        raise RunError(f"{notebook.name} failed in cell {exc.cell_index} (execution count {exc.exec_count}): "
                       f"{exc.ename}: {exc.evalue}\nThe partial notebook is kept at {output}") from None
    if stop.signum is not None:  # the signal came between cells: stop before the next notebook
        raise TrainingStopped(f"stopped by {signal_name(stop.signum)} after {notebook.name}", stop.signum,
                              resume=resume)
    return output


def kernel_stopped(exc: Exception, notebook: str, output: Path, resume: str) -> TrainingStopped | None:
    """A stop signal sent to the notebook's kernel rather than to `nbgpt run`: the first ends training with a
    checkpoint (TrainingStopped in the cell), a second ends the kernel at once (papermill: DeadKernelError).
    Either way the run resumes from its checkpoints, like a run stopped through `nbgpt run`."""
    from nbclient.exceptions import DeadKernelError
    from papermill.exceptions import PapermillExecutionError

    if isinstance(exc, DeadKernelError):  # its exit status is not ours to read: a kill is a SIGTERM's kin
        return TrainingStopped(f"the kernel running {notebook} died (a second stop signal ends it at once, as do "
                               f"kill -9 and the out-of-memory killer); the checkpoints on disk are intact and the "
                               f"partial notebook is kept at {output}", signal.SIGTERM, resume=resume)
    if isinstance(exc, PapermillExecutionError) and exc.ename == "TrainingStopped":
        signum = TrainingStopped.signal_in(exc.evalue) or signal.SIGTERM
        return TrainingStopped(f"{notebook} stopped by {signal_name(signum)} to its kernel, with a checkpoint; the "
                               f"partial notebook is kept at {output}", signum, resume=resume)
    return None


def recorded_preset(run_dir: Path) -> str:
    """The preset a run directory was started with (run.json)."""
    if not (run_dir / RUN_FILE).is_file():
        raise RunError(f"{run_dir} holds no run to resume (no {RUN_FILE}); start it with --preset")
    return read_json(run_dir / RUN_FILE)["preset"]


def replaceable(run_dir: Path, preset: str) -> bool:
    """Whether run_dir holds a run of `preset` started with --replace (its run.json says so): the only kind of
    run that `--replace` deletes. A user's own runs never carry the mark."""
    path = run_dir / RUN_FILE
    if not path.is_file():
        return False
    saved = read_json(path)
    return saved.get("preset") == preset and saved.get("replace") is True


def clear_run(run_dir: Path, notice: str, echo=print) -> None:
    """Say `notice`, then delete what a run directory holds, under its lock (a run still going is refused, not
    emptied). A linked dataset (data -> a shared folder) loses the link, never the folder."""
    with RunLock(run_dir) as lock:
        echo(notice)
        for entry in run_dir.iterdir():
            if entry == lock.path:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()


def saved_overrides(run_dir: Path, preset: str) -> dict:
    """The -p values a run directory was started with (run.json), so that `--resume` alone continues the
    same run; values given again on the command line replace them."""
    path = run_dir / RUN_FILE
    if not path.is_file():
        return {}
    saved = read_json(path)
    if saved["preset"] != preset:
        raise RunError(f"{run_dir} was started with --preset {saved['preset']}, not {preset}; resume it with "
                       f"--preset {saved['preset']}, or use --name for a new run")
    return saved["overrides"]


# The dataset's settings: another value rebuilds data/ (notebook 01), whose windows the checkpoints' position
# no longer points into. Not prepare_workers (the shards are the same whatever the count) nor source_path
# (another copy of the same hash-verified file).
DATA_SETTINGS = ("source", "tokenizer", "shard_tokens", "val_fraction", "val_tokens", "max_tokens", "text_column",
                 "errors")


def check_continuable(preset: str, saved: dict, typed: dict, run_dir: Path) -> None:
    """A run with checkpoints continues only the model it trains on the data it reads: a -p that changes a
    setting its checkpoints are bound to (TrainConfig.bound_settings: the model, the optimizer, the order of its
    windows) or the dataset is refused here, before any notebook runs and before run.json records it. nproc and
    micro_batch may change: the data position counts windows of the whole run (nbgpt.loader)."""
    checkpoints = run_dir / "checkpoints"
    if not (checkpoints.is_dir() and any(checkpoints.glob("*.pt"))):
        return
    if differ := differences(run_identity(preset, saved, run_dir), run_identity(preset, typed, run_dir)):
        raise RunError(f"{run_dir} has checkpoints trained with other settings ({differ}); resume with those "
                       f"settings (drop the -p that changes them; nproc and micro_batch may change), or use --name "
                       f"for a new run")


def run_identity(preset: str, values: dict, run_dir: Path) -> dict:
    """The settings a run's checkpoints are bound to (TrainConfig.bound_settings, the Trainer's test too), and
    the data they were trained on (see check_continuable)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigWarning)  # check_run has shown them once
        run = RunConfig.from_preset(preset, values, run_dir)
    model = run.train.model_config(vocab_size=256).to_dict()  # vocab comes from the data either way
    return {**run.train.bound_settings(model), **{name: getattr(run.prepare, name) for name in DATA_SETTINGS}}


@contextlib.contextmanager
def recorded(run_dir: Path, record: dict):
    """Record this attempt's preset and -p values in run.json for the block; when the block fails before
    training wrote a checkpoint, put the previous record back: the run never took those values (a notebook
    refused them), and a plain --resume must go on working. A stop by signal keeps them: its resume line
    continues with them."""
    path, checkpoints = run_dir / RUN_FILE, run_dir / "checkpoints"
    previous = read_json(path) if path.is_file() else None
    newest = latest_checkpoint(checkpoints)
    atomic_write_json(path, record)
    try:
        yield
    except TrainingStopped:
        raise
    except BaseException:
        if previous is not None and latest_checkpoint(checkpoints) == newest:
            atomic_write_json(path, previous)
        raise


class LogTail:
    """Follow a growing text file from a background thread, passing each new complete line on (`tail -f`).
    `with LogTail(path, echo):` echoes the lines appended to `path` while the block runs, and the rest
    when it ends. Lines already in the file (an earlier attempt of the run) are not repeated."""

    def __init__(self, path: str | os.PathLike, echo: Callable[[str], None], interval: float = 0.5):
        self.path, self.echo, self.interval = Path(path), echo, interval
        self.offset = self.path.stat().st_size if self.path.is_file() else 0
        self.pending = b""
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._follow, daemon=True)

    def _read(self) -> None:
        if not self.path.is_file():
            return
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        self.offset += len(data)
        *lines, self.pending = (self.pending + data).split(b"\n")
        for line in lines:
            self.echo(line.decode("utf-8", errors="replace"))

    def _follow(self) -> None:
        while not self.done.wait(self.interval):
            self._read()

    def __enter__(self) -> "LogTail":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join()
        self._read()


def _to_kernels(signum: int) -> None:
    """Pass a signal to the kernel papermill runs (in a session of its own, so the terminal's Ctrl-C never
    reaches it): training there stops after its current step with a checkpoint."""
    for pid in children(os.getpid()):
        signal_tree(pid, signum)


def summarize(run_dir: Path, executed: list[Path]) -> RunResult:
    evals = read_metrics(run_dir, "eval")
    hellaswag = read_json(run_dir / "hellaswag.json") if (run_dir / "hellaswag.json").is_file() else None
    samples = run_dir / "samples.txt"
    log = run_dir / "train.log"  # what the trainer said, warnings included, one line each
    lines = log.read_text(encoding="utf-8").splitlines() if log.is_file() else []
    warned = list(dict.fromkeys(line for line in lines if line.startswith("warning:")))
    return RunResult(run_dir, executed, sorted(run_dir.glob("*.png")), samples if samples.is_file() else None,
                     evals[-1]["val_loss"] if evals else None, hellaswag, evals[-1] if evals else None, warned)
