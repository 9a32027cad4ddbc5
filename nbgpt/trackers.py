"""Experiment trackers: every record of metrics.jsonl mirrored to Weights & Biases or TensorBoard, so that a
run on a far machine (a Kaggle version, a rented node) can be watched from a browser or a phone.

MetricsLog hands each record it writes to the tracker opened here, on rank 0; nothing else in nbgpt knows
which tracker is on. A tracker is a window onto the run, never its record: when one fails (network down, its
folder gone) it is said once in train.log and stays off for the rest of the process, and training goes on.

A resumed run continues the same tracker run from the checkpoint's step, where metrics.jsonl continues:
- TensorBoard: a new event file whose purge_step is that step, so TensorBoard drops the older files' events
  at and after it, as metrics.jsonl dropped its records.
- W&B: the run's id is kept in <run dir>/tracker.json and the run resumed. Its history is not rewound (W&B's
  `resume_from` is a beta feature that not every server offers), so the steps between the checkpoint and
  the interruption that W&B already holds keep the values first logged; a resume is bit-exact, so their
  loss, lr and grad_norm are the ones the redone steps compute. Offline, W&B cannot know which steps it holds:
  each attempt is a folder of its own under <run dir>/wandb/, with every step it trained.
"""

from __future__ import annotations

import json
import re
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from .knobs import ConfigError
from .errors import one_line
from .files import atomic_write_json, read_json

if TYPE_CHECKING:
    from .run_config import TrainConfig

TRACKER_FILE = "tracker.json"  # the W&B run a run directory feeds, so that a resume continues it
FLUSH_SECONDS = 30  # how stale TensorBoard's view of a run may get
# How long W&B may take to start its run before the tracker is given up. W&B's own default (90 s, then its
# retries) would hold step 0 back almost two minutes on a box whose network is down; a W&B server that
# answers at all starts a run in a few seconds.
WANDB_INIT_SECONDS = 15


def check_tracker(name: str) -> None:
    """Refuse, in one line naming the fix, a tracker that cannot work here: before training starts, not after."""
    if name == "none":
        return
    try:
        if name == "wandb":
            import wandb
        else:
            from torch.utils import tensorboard  # noqa: F401  (needs the tensorboard package)
    except ImportError:
        raise ConfigError(f"tracker={name!r} needs the {name} package, which is not installed: "
                          f"pip install 'nbgpt[{name}]' (or set tracker=none)") from None
    if name == "wandb" and not wandb_can_log(wandb):
        raise ConfigError("tracker='wandb' but W&B has no API key here: set WANDB_API_KEY (a Kaggle secret, "
                          "see the README) or run `wandb login`; or set WANDB_MODE=offline to keep the run on "
                          "disk for `wandb sync`")


def wandb_can_log(wandb) -> bool:
    """Whether W&B is offline or disabled (no login needed), or has credentials (never prompting for them).

    wandb.setup() starts W&B's service process and puts its address in os.environ, where every process
    started later (a notebook's kernel, torchrun's workers) would find it and log through it instead of
    starting its own. That service would be a child of this process, so a stop signal passed on to this
    process's children (`nbgpt run` passes it to its kernels) would kill it mid-run, losing what it had not
    yet written. The teardown ends it and takes its address back out: each process that trains starts its own.
    """
    try:
        return (wandb.setup().settings.mode in ("offline", "dryrun", "disabled")
                or wandb.login(prompt=False, verify=False))
    except Exception as exc:  # a WANDB_MODE it does not know, a malformed key
        raise ConfigError(f"W&B cannot start here ({one_line(exc)}): fix the WANDB_* variables, or run "
                          f"`wandb login --relogin`") from None
    finally:
        wandb.teardown()


def scalars_and_texts(record: dict) -> tuple[dict[str, float], dict[str, str]]:
    """A train/eval/hellaswag/sample record as {"train/loss": 2.31, ...} and {"sample/text": "..."}; a null
    (a non-finite loss) has no point to plot and is left out."""
    kind = record.get("kind", "event")
    scalars, texts = {}, {}
    for key, value in record.items():
        if key in ("kind", "step") or value is None:
            continue
        if isinstance(value, (bool, int, float)):
            scalars[f"{kind}/{key}"] = float(value)
        else:
            texts[f"{kind}/{key}"] = str(value)
    return scalars, texts


def config_values(record: dict) -> dict:
    """A "config" record as one flat mapping: the TrainConfig fields, then device, precision and the rest."""
    return {**record["config"], **{k: v for k, v in record.items() if k not in ("kind", "step", "config")}}


def code_block(text: str) -> str:
    """`text` as a fenced markdown code block: TensorBoard renders text as markdown, where line breaks would
    vanish and a generated `_` or `*` would turn into formatting; in a code block it shows as written. The
    fence is longer than any run of backticks in the text, so that none of them can end the block."""
    fence = "`" * max([3] + [len(run) + 1 for run in re.findall(r"`+", text)])
    return f"{fence}\n{text}\n{fence}"


class TensorBoardTracker:
    """Event files in <run dir>/tensorboard: `tensorboard --logdir <run dir>/tensorboard`."""

    def __init__(self, config: TrainConfig, out_dir: Path, start_step: int):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: TensorBoard drops what older event files hold at or after this step (a resume redoes it)
        self.writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=start_step, flush_secs=FLUSH_SECONDS)

    def log(self, record: dict) -> None:
        step = record["step"]
        if record.get("kind") == "config":
            text = json.dumps(config_values(record), indent=2, sort_keys=True)
            self.writer.add_text("config", code_block(text), step)
            return
        scalars, texts = scalars_and_texts(record)
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)
        for tag, text in texts.items():
            self.writer.add_text(tag, code_block(text), step)

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """A W&B run named after the run directory, its history indexed by training step."""

    def __init__(self, config: TrainConfig, out_dir: Path, start_step: int):
        import wandb

        # "create_new": a second trainer in one process (a notebook rerun) gets a run of its own
        self.run = wandb.init(project=config.tracker_project, name=config.tracker_run_name or out_dir.name,
                              id=wandb_run_id(out_dir, start_step), resume="allow", dir=str(out_dir),
                              reinit="create_new", settings=wandb.Settings(init_timeout=WANDB_INIT_SECONDS))

    def log(self, record: dict) -> None:
        if record.get("kind") == "config":
            self.run.config.update(config_values(record), allow_val_change=True)
            return
        if record["step"] < self.run.starting_step:  # W&B holds this step from the interrupted attempt
            return
        scalars, texts = scalars_and_texts(record)
        self.run.log({**scalars, **texts}, step=record["step"])

    def close(self) -> None:
        import wandb

        self.run.finish()
        # finish() returns before W&B's service has written (offline) or sent everything; teardown waits for
        # it, so a kernel that ends next loses nothing, and a resume in this process starts after it. It ends
        # the process's W&B session: nbgpt's run is taken to be the only one.
        wandb.teardown()


def wandb_run_id(out_dir: Path, start_step: int) -> str:
    """The W&B run of this run directory: the one in tracker.json when training resumes from a checkpoint,
    else a new one (a run starting at step 0 has voided whatever an earlier attempt logged)."""
    path = out_dir / TRACKER_FILE
    if start_step > 0 and path.is_file():
        return read_json(path)["wandb_run_id"]
    run_id = secrets.token_hex(4)
    atomic_write_json(path, {"wandb_run_id": run_id})
    return run_id


TRACKER_CLASSES = {"wandb": WandbTracker, "tensorboard": TensorBoardTracker}


class Mirror:
    """A tracker that may fail without harm to training: its first error is said once, and turns it off."""

    def __init__(self, name: str, say: Callable[[str], None]):
        self.name, self.say = name, say
        self.tracker = None

    def guarded(self, action: Callable, *args):
        """action(*args), or None once it fails."""
        try:
            return action(*args)
        except Exception as exc:  # any failure of a tracker's library, network or disk
            self.tracker = None
            self.say(f"tracker {self.name} failed ({one_line(exc)}); it is off for the "
                     f"rest of this run, which goes on: metrics.jsonl stays the record")

    def open(self, config: TrainConfig, out_dir: Path, start_step: int) -> None:
        self.tracker = self.guarded(TRACKER_CLASSES[self.name], config, out_dir, start_step)

    def log(self, record: dict) -> None:
        if self.tracker is not None:
            self.guarded(self.tracker.log, record)

    def close(self) -> None:
        tracker, self.tracker = self.tracker, None
        if tracker is not None:
            self.guarded(tracker.close)


def open_tracker(config: TrainConfig, start_step: int, say: Callable[[str], None]) -> Mirror | None:
    """The tracker config.tracker names, continuing from `start_step` (None for "none"); `say` reports a failure."""
    if config.tracker == "none":
        return None
    mirror = Mirror(config.tracker, say)
    mirror.open(config, Path(config.out_dir), start_step)
    return mirror

