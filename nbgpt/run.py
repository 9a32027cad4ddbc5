"""The pipeline: execute the five notebooks in order with papermill, into one run directory.

    runs/<name>/
        01_tokenize.ipynb ... 05_sample.ipynb    executed copies (kept, partial, when a cell fails)
        data/                                    shards + manifest (or a link to a shared dataset)
        checkpoints/  metrics.jsonl  bigram.json  hellaswag.json  samples.txt  *.png
"""

from __future__ import annotations

import ast
import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

from .logtail import LogTail
from .metrics import read_metrics
from .model import GPTConfig
from .presets import get_preset
from .processes import children, signal_tree
from .runlock import RunLock
from .stop import StopSignals, signal_name
from .train import TrainConfig

NOTEBOOKS = ("01_tokenize.ipynb", "02_model.ipynb", "03_train.ipynb", "04_evaluate_hellaswag.ipynb",
             "05_sample.ipynb")
MODEL_FIELDS = {f.name for f in dataclasses.fields(GPTConfig)} - {"vocab_size"}
TRAIN_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)} - {"data_dir", "out_dir"}


class RunError(RuntimeError):
    """A notebook of the pipeline failed, or the run cannot start."""


class RunStopped(RunError):
    """SIGTERM/SIGINT stopped the pipeline (training checkpointed first); `signum` is the signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


def notebooks_dir() -> Path:
    return Path(os.environ.get("NBGPT_NOTEBOOKS", Path(__file__).resolve().parents[1] / "notebooks"))


def parse_value(text: str):
    """`-p key value`: a Python literal when it parses as one (3, 0.5, None, True, [..], {..}), else text."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def declared_parameters(notebook: Path) -> dict:
    import papermill

    return papermill.inspect_notebook(str(notebook))


def route_parameters(values: dict, declared: dict[str, dict]) -> dict[str, dict]:
    """Split flat parameters among the notebooks that declare them.

    A GPTConfig or TrainConfig field that a notebook does not declare goes into its `model_overrides` or
    `train_overrides`; a key that no notebook takes is an error naming the keys that exist.
    """
    routed: dict[str, dict] = {name: {} for name in declared}
    used: set[str] = set()
    for key, value in values.items():
        for name, params in declared.items():
            if key in params:
                routed[name][key] = value
            elif key in MODEL_FIELDS and "model_overrides" in params:
                routed[name].setdefault("model_overrides", {})[key] = value
            elif key in TRAIN_FIELDS and "train_overrides" in params:
                routed[name].setdefault("train_overrides", {})[key] = value
            else:
                continue
            used.add(key)
    unknown = sorted(set(values) - used)
    if unknown:
        known = sorted({k for params in declared.values() for k in params} | MODEL_FIELDS | TRAIN_FIELDS)
        raise RunError(f"unknown parameter(s) {unknown}; the notebooks take: {', '.join(known)}")
    return routed


@dataclass
class RunResult:
    run_dir: Path
    notebooks: list[Path]
    plots: list[Path]
    samples: Path | None
    final_val_loss: float | None
    hellaswag: dict | None


def run_pipeline(preset: str, overrides: dict | None = None, name: str | None = None, runs_dir: str = "runs",
                 resume: bool = False, notebooks: list[str] | None = None, echo=print) -> RunResult:
    """Execute the notebooks of `preset` (all five, or those named) into runs/<name>."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    try:
        values = {**get_preset(preset), **(overrides or {})}
    except KeyError as exc:
        raise RunError(str(exc.args[0])) from None
    run_dir = Path(runs_dir).resolve() / (name or preset)
    if run_dir.exists() and any(run_dir.iterdir()) and not resume:
        raise RunError(f"{run_dir} already exists; pass --resume to continue it (training resumes from its last "
                       f"checkpoint) or --name to start a new run")
    values["run_dir"] = str(run_dir)
    source = notebooks_dir()
    chosen = notebooks or list(NOTEBOOKS)
    missing = [n for n in chosen if not (source / n).is_file()]
    if missing:
        raise RunError(f"notebook(s) {missing} not found in {source}")
    declared = {n: declared_parameters(source / n) for n in NOTEBOOKS}
    routed = route_parameters(values, declared)
    executed = []
    # The lock is ours; the kernels papermill starts, and the torchrun workers they launch, are admitted as
    # our descendants. train.log is written by the training notebook's trainer and streamed here.
    with RunLock(run_dir), LogTail(run_dir / "train.log", echo), StopSignals(forward=_to_kernels) as stop:
        for notebook in chosen:
            output = run_dir / notebook
            echo(f"[nbgpt] {notebook} -> {output}")
            try:
                papermill.execute_notebook(str(source / notebook), str(output), parameters=routed[notebook],
                                           kernel_name="python3", cwd=str(run_dir), progress_bar=False,
                                           log_output=False)
            except Exception as exc:
                if stop.signum is not None:
                    raise RunStopped(f"stopped by {signal_name(stop.signum)} in {notebook}; the partial notebook "
                                     f"is kept at {output}", stop.signum) from None
                if not isinstance(exc, PapermillExecutionError):
                    raise
                raise RunError(f"{notebook} failed in cell {exc.cell_index} (execution count "
                               f"{exc.exec_count}): {exc.ename}: {exc.evalue}\nThe partial notebook is kept "
                               f"at {output}") from None
            executed.append(output)
            if stop.signum is not None:  # the signal came between cells: stop before the next notebook
                raise RunStopped(f"stopped by {signal_name(stop.signum)} after {notebook}", stop.signum)
    return summarize(run_dir, executed)


def _to_kernels(signum: int) -> None:
    """Pass a signal to the kernel papermill runs (in a session of its own, so the terminal's Ctrl-C never
    reaches it): training there stops after its current step with a checkpoint."""
    for pid in children(os.getpid()):
        signal_tree(pid, signum)


def summarize(run_dir: Path, executed: list[Path]) -> RunResult:
    from .files import read_json

    evals = read_metrics(run_dir, "eval")
    hellaswag = read_json(run_dir / "hellaswag.json") if (run_dir / "hellaswag.json").is_file() else None
    samples = run_dir / "samples.txt"
    return RunResult(run_dir, executed, sorted(run_dir.glob("*.png")), samples if samples.is_file() else None,
                     evals[-1]["val_loss"] if evals else None, hellaswag)
