"""The pipeline's configuration: one typed dataclass per notebook, composed into RunConfig.

Every knob has one flat name (what `-p NAME VALUE`, the presets and the notebooks' `parameters` use), one type
and one default, in the dataclass of the step that reads it:

    nproc                                    RunConfig       processes training runs on
    source, tokenizer, shard_tokens, ...     PrepareConfig   notebook 01 and `nbgpt prepare`
    bigram_steps, load_openai_weights, ...   BaselineConfig  notebook 02
    recipe, model, max_steps, max_lr, ...    TrainConfig     notebooks 02-03 and `nbgpt train`
    n_layer, bias, rope_base, ...            GPTConfig       reached through TrainConfig.model_overrides
    hellaswag_path, hellaswag_limit, ...     EvalConfig      notebook 04 and `nbgpt eval`
    prompt, temperature, top_k, ...          SampleConfig    notebook 05 and `nbgpt sample`

A name that two steps read (device, precision, seed, hellaswag_path, hellaswag_limit) sets both.
"""

from __future__ import annotations

import warnings
from dataclasses import InitVar, dataclass, field, fields
from pathlib import Path

from .knobs import (UNSET, ConfigError, ConfigWarning, check_fields, check_known, coerce, default_of,
                     did_you_mean, field_types, fill_defaults, knob, knob_default, typed_mapping)
from .device import PRECISIONS
from .generate import SamplingConfig
from .model import MODEL_PRESETS, GPTConfig
from .presets import get_preset
from .shards import check_cap, prepare

PRECISION_CHOICES = ("auto", *PRECISIONS)  # of TrainConfig, EvalConfig and SampleConfig (nbgpt.device)
DEVICE_HELP = "auto, cpu, cuda, cuda:N or mps (auto: the best available)"  # the same three steps read both
PRECISION_HELP = "auto, fp32, bf16 or fp16 (auto: bf16 where native and faster, else fp16 on GPUs, fp32 on CPUs)"
AUTO = "auto"  # TrainConfig.micro_batch: the largest micro-batch that fits (nbgpt.memory.resolve_micro_batch)
TRACKERS = ("none", "wandb", "tensorboard")  # TrainConfig.tracker (nbgpt.trackers)


# Recipes: named bundles of settings that together make one way of training a GPT.
#
#     gpt2       GPT-2 as OpenAI trained it (2019), as build-nanogpt reproduces it: learned positions, GELU, tied
#                embeddings, AdamW, warmup + cosine to 10 % at GPT-3's 124M learning rate.
#     speedrun   the early modded-nanogpt speedrun records (2024), which reached GPT-2 124M's FineWeb loss in a
#                fraction of the tokens: rotary positions, QK-norm, ReLU², zero-initialised output projections,
#                an untied, soft-capped LM head, Muon for the blocks' matrices, and a trapezoidal schedule.
#
# A recipe is named with TrainConfig's `recipe`, wherever the run is configured (TrainConfig(...), a preset, `-p`,
# `nbgpt train` flags); nothing else in nbgpt asks which recipe is in use, every technique being a knob of its
# own. What wins (TrainConfig._settle, the one place it is decided):
#
#     a knob's default  <  the run preset's value  <  the named recipe's  <  a value given explicitly
#
# So `-p recipe speedrun` on the gpt2-124m preset replaces the preset's learning rate too, and
# `-p recipe speedrun -p qk_norm false` is the speedrun without QK-norm: how an ablation is spelled. A preset
# that names a recipe sets none of its knobs (they would be overruled).
RECIPES: dict[str, dict] = {
    "gpt2": dict(
        position="absolute", activation="gelu", qk_norm=False, zero_init_proj=False, tie_embeddings=True,
        logit_softcap=0.0, optimizer="adamw", schedule="cosine", max_lr=6e-4, min_lr_ratio=0.1,
        embedding_lr_scale=1.0, weight_decay=0.1,
    ),
    # Muon scales its updates to AdamW's size, so one max_lr serves both optimizers (the values: bench/RESULTS.md,
    # "The speedrun recipe's learning rates"). No warm-up: an orthogonalised update has the same size from the
    # first step, so there are no noisy early statistics to wait out.
    "speedrun": dict(
        position="rope", activation="relu2", qk_norm=True, zero_init_proj=True, tie_embeddings=False,
        logit_softcap=30.0, optimizer="muon", schedule="trapezoid", max_lr=3e-3, min_lr_ratio=0.0,
        embedding_lr_scale=10.0, weight_decay=0.1, warmup_steps=0,
    ),
}


def recipe_bundle(name: str | None) -> dict:
    """The settings recipe `name` sets ({} for None: no recipe)."""
    if name is not None and name not in RECIPES:
        raise ConfigError(f"unknown recipe {name!r}{did_you_mean(name, RECIPES)}; choose one of {sorted(RECIPES)}")
    return RECIPES[name] if name is not None else {}


def _choice(name: str, value, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(map(str, choices))}, got {value!r}")


@dataclass
class PrepareConfig:
    source: str = knob("shakespeare", "shakespeare | tinyshakespeare | fineweb-edu | hf:NAME[:CONFIG] | a path or "
                       "glob")
    source_path: str | None = knob(None, "a local copy of tinyshakespeare's input.txt, if offline")
    tokenizer: str = knob("char", "gpt2 (BPE, 50,257 tokens) or char (one token per character)")
    shard_tokens: int = knob(10_000_000, "tokens per shard file (FineWeb-Edu: 100M, as in build-nanogpt)")
    prepare_workers: int = knob(1, "tokenizer processes; the output is identical whatever the count")
    val_fraction: float | None = knob(0.1, "the share of tokens, the last ones, held out for validation "
                                           "(nanoGPT's split)")
    val_tokens: int | None = knob(None, "hold out the first N tokens for validation instead (build-nanogpt: "
                                        "the first FineWeb-Edu shard)")
    max_tokens: int | None = knob(None, "stop once this many tokens (validation included) are in shards; none: all")
    text_column: str = knob("text", "the text field of jsonl/parquet/hub rows")
    errors: str = knob("strict", "bytes that are not UTF-8: strict stops, replace makes them U+FFFD, ignore drops them")

    def __post_init__(self) -> None:
        check_fields(self)
        _choice("tokenizer", self.tokenizer, ("gpt2", "char"))
        _choice("errors", self.errors, ("strict", "replace", "ignore"))
        check_cap(self.max_tokens, self.val_tokens)  # now, so `nbgpt run` refuses before notebook 01

    def run(self, out_dir, progress: bool = True):
        """Tokenize the source into shards under out_dir (see nbgpt.shards.prepare)."""
        return prepare(self.source, self.tokenizer, out_dir, shard_tokens=self.shard_tokens,
                       workers=self.prepare_workers, val_fraction=self.val_fraction, val_tokens=self.val_tokens,
                       max_tokens=self.max_tokens, text_column=self.text_column, errors=self.errors,
                       source_path=self.source_path, progress=progress)


@dataclass
class BaselineConfig:
    bigram_steps: int = knob(200, "training steps of the bigram baseline")
    load_openai_weights: bool = knob(False, "also sample from OpenAI's GPT-2 124M (needs the HF hub or a local copy)")
    openai_weights: str = knob("gpt2", "hub name or local HF-format directory")

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class TrainConfig:
    # where
    data_dir: str = knob("", "a prepared dataset (manifest.json + shards)")
    # not the notebooks' run directory (runs/default), so that `nbgpt train` and an interactive notebook run never
    # continue each other's checkpoints
    out_dir: str = knob("runs/train", "checkpoints/, metrics.jsonl and train.log go here")
    model: str = knob("tiny", "a model preset (tiny, mini, small, cpu-char, small-char, gpt2, gpt2-medium, ...); "
                      "GPTConfig fields reshape it, and the dataset's tokenizer sets vocab_size")
    model_overrides: dict = knob(help='GPTConfig fields that reshape the model preset, e.g. {"n_layer": 2}',
                                 default_factory=dict)
    init_from: str = knob("scratch", "scratch, or an HF GPT-2 directory / hub name to fine-tune from")
    # batch: the defaults suit the tiny model on a CPU; the gpt2-124m preset has GPT-2's 0.5M tokens per step
    total_batch_tokens: int = knob(8192, "tokens per optimizer step, all ranks and micro-steps together")
    micro_batch: int | str = knob(32, "sequences per forward pass per rank, or auto: the most that fit the GPU "
                                      "(nbgpt.memory)")
    seq_len: int | None = knob(None, "tokens per training window (none: the model's block_size)")
    recipe: str | None = knob(None, "gpt2 or speedrun: a named bundle of optimizer, schedule and architecture "
                              "settings (RECIPES); none: no bundle, every knob its own value")
    # schedule
    max_steps: int = knob(200, "optimizer steps to train: the schedule's horizon")
    max_seconds: float | None = knob(None, "wall-clock budget in seconds (none: no budget); the schedule's horizon "
                                           "is fitted to it")
    max_lr: float = knob(1e-3, "peak learning rate, reached after warmup_steps")
    min_lr_ratio: float = knob(0.1, "the learning rate decays to min_lr_ratio * max_lr")
    warmup_steps: int = knob(20, "steps of linear learning-rate warmup up to max_lr")
    schedule: str = knob("cosine", "after warmup: cosine decay, or trapezoid (constant, then a linear cooldown)")
    cooldown_fraction: float = knob(0.4, "trapezoid: the share of the steps spent cooling down to min_lr_ratio * "
                                         "max_lr")
    weight_decay: float = knob(0.1, "decoupled weight decay of the weight matrices (biases and norms get none)")
    optimizer: str = knob("adamw", "adamw, or muon: Muon for the blocks' matrices, AdamW for the rest")
    embedding_lr_scale: float = knob(1.0, "the input embeddings' learning rate (wte, wpe; a tied head is wte), in "
                                          "multiples of max_lr")
    beta1: float = knob(0.9, "Adam's first-moment (momentum) decay")
    beta2: float = knob(0.95, "Adam's second-moment decay")
    grad_clip: float = knob(1.0, "clip the global gradient norm to this before each step")
    # evaluation, samples, checkpoints
    eval_interval: int = knob(50, "steps between validation-loss evaluations (0: only at the end); with max_seconds, "
                                  "an upper bound")
    eval_batches: int = knob(20, "batches averaged per validation-loss evaluation")
    final_eval_batches: int | None = knob(None, "batches of the final evaluation (none: eval_batches; 0: the whole "
                                                "split)")
    sample_interval: int = knob(0, "steps between text samples written to the log (0: none)")
    sample_prompt: str = knob("", "prompt of those samples ('': start from end-of-text)")
    sample_tokens: int = knob(64, "tokens per sample")
    hellaswag_interval: int = knob(0, "steps between HellaSwag evaluations while training (0: none)")
    hellaswag_path: str | None = knob(None, "hellaswag_val.jsonl (none: the cache, then a one-time download)")
    hellaswag_limit: int | None = knob(None, "score only the first N HellaSwag examples (none: all 10,042)")
    checkpoint_interval: int = knob(100, "steps between checkpoints (0: only at the end; a stop signal also writes "
                                         "one)")
    keep_checkpoints: int = knob(3, "how many of the newest checkpoints to keep; older ones are deleted")
    resume: bool = knob(True, "continue from the newest good checkpoint in out_dir if there is one")
    log_interval: int = knob(10, "steps between progress lines (train.log, the terminal, the notebook)")
    max_bad_steps: int = knob(3, "consecutive steps with a non-finite loss or gradient before training stops")
    # hardware
    seed: int = knob(1337, "random seed of the initialisation, the data order and samples")
    device: str = knob("auto", DEVICE_HELP)
    precision: str = knob("auto", PRECISION_HELP)
    compile: bool = knob(False, "torch.compile the model: faster steps after a one-time compile")
    parallel: str = knob("ddp", "how processes share the work: ddp (each holds the whole model, gradients are "
                                "all-reduced) or fsdp (each holds 1/N of the weights, gradients and optimizer "
                                "state: nbgpt.distributed); one process: neither")
    threads: int | None = knob(None, "CPU threads for torch (none: torch's default)")
    # data order
    shuffle: bool = knob(False, "visit the training windows in a fresh random order each epoch (else in order)")
    align_documents: bool = knob(False, "start training windows at document starts (else every seq_len tokens)")
    progress: bool = knob(True, "show progress bars")
    # watching from elsewhere
    tracker: str = knob("none", "none, wandb or tensorboard: every metrics.jsonl record mirrored there "
                                "(nbgpt.trackers)")
    tracker_project: str = knob("nbgpt", "the W&B project")
    tracker_run_name: str | None = knob(None, "the W&B run's name (none: the run directory's name)")

    # A run preset's values (RunConfig.from_preset): under a named recipe's, over the knobs' defaults.
    preset: InitVar[dict | None] = None

    def __post_init__(self, preset: dict | None) -> None:
        self._settle(preset or {})
        check_fields(self)
        if self.optimizer not in ("adamw", "muon"):
            raise ConfigError(f"TrainConfig.optimizer must be 'adamw' or 'muon', got {self.optimizer!r}")
        if self.schedule not in ("cosine", "trapezoid"):
            raise ConfigError(f"TrainConfig.schedule must be 'cosine' or 'trapezoid', got {self.schedule!r}")
        if not 0.0 < self.cooldown_fraction <= 1.0:
            raise ConfigError(f"cooldown_fraction must be in (0, 1], the share of the steps spent cooling down "
                              f"(e.g. 0.4), got {self.cooldown_fraction}")
        if not self.embedding_lr_scale > 0.0:
            raise ConfigError(f"embedding_lr_scale must be positive (1 = the same learning rate as the rest), "
                              f"got {self.embedding_lr_scale}")
        if self.tracker not in TRACKERS:
            raise ConfigError(f"tracker must be none, wandb or tensorboard, got {self.tracker!r}")
        if self.parallel not in ("ddp", "fsdp"):
            raise ConfigError(f"parallel must be 'ddp' (a whole model per process) or 'fsdp' (weights, gradients "
                              f"and optimizer state sharded over the processes), got {self.parallel!r}")
        _choice("precision", self.precision, PRECISION_CHOICES)
        if self.micro_batch != AUTO and not (isinstance(self.micro_batch, int) and self.micro_batch >= 1):
            raise ConfigError(f"micro_batch must be a positive integer or {AUTO!r} (the most that fit the GPU), got "
                              f"{self.micro_batch!r}")
        for name in ("total_batch_tokens", "max_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads must be at least 1 (or none: torch's default), got {self.threads}")
        for message in contradictions(self):
            warnings.warn(message, ConfigWarning, stacklevel=3)

    def _settle(self, preset: dict) -> None:
        """The one place a configuration's layers meet, a recipe included: each knob takes the first of the value
        given, the named recipe's, the preset's and its own default; so do the GPTConfig fields (model_overrides).
        A recipe nobody names applies nothing (cpu-demo's Muon stands, and the run's recipe is None).
        dataclasses.replace hands every field over as given, so it changes a recipe's name, not its knobs: to
        switch recipes, configure the run again (RunConfig.from_preset with {"recipe": ...}, or TrainConfig with
        only the values you mean)."""
        bundle = recipe_bundle(preset.get("recipe") if self.recipe is UNSET else self.recipe)
        for f in fields(self):
            if getattr(self, f.name) is UNSET and f.name != "model_overrides":
                setattr(self, f.name, bundle.get(f.name, preset.get(f.name, knob_default(f))))
        gpt = set(field_types(GPTConfig)) - {"vocab_size"}
        given = {} if self.model_overrides is UNSET else self.model_overrides
        model = {**{name: value for name, value in {**preset, **bundle}.items() if name in gpt}, **given}
        self.model_overrides = typed_mapping(GPTConfig, model, exclude=("vocab_size",))

    @classmethod
    def from_dict(cls, values: dict, preset: dict | None = None) -> "TrainConfig":
        """TrainConfig from flat names: GPTConfig fields (n_layer, bias, ...) go into model_overrides; `preset`
        is a run preset's flat values, under the recipe's and `values` (see _settle).

        Checkpoints written before model_overrides existed stored those fields flat, None meaning "the
        preset's": they load too.
        """
        model_fields = set(field_types(GPTConfig)) - {"vocab_size"}
        nested = dict(values.get("model_overrides") or {})
        check_known(nested, model_fields, "GPTConfig field")
        flat = {name: value for name, value in values.items()
                if name != "model_overrides" and not (name in model_fields and value is None)}
        check_known(flat, set(field_types(cls)) | model_fields, "TrainConfig field")
        overrides = {**nested, **{name: flat.pop(name) for name in model_fields & set(flat)}}
        return cls(**flat, model_overrides=overrides, preset=preset)

    @classmethod
    def of_checkpoint(cls, payload: dict) -> "TrainConfig":
        """The TrainConfig a checkpoint's run trained with, as this version reads it: knobs added since take
        their defaults, knobs since removed are dropped, and what it warned of when it started is not said
        again."""
        known = set(field_types(cls)) | set(field_types(GPTConfig))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConfigWarning)
            return cls.from_dict({k: v for k, v in payload["train_config"].items() if k in known})

    def model_config(self, vocab_size: int) -> GPTConfig:
        return GPTConfig.from_preset(self.model, **{**self.model_overrides, "vocab_size": vocab_size})

    def bound_settings(self, model: dict) -> dict:
        """The settings this run's checkpoints are bound to, with `model` its GPTConfig as a dict: the recipe,
        the model, the optimizer, and which windows each step reads (seq_len, total_batch_tokens, shuffle and
        then its seed, align_documents). A resume that changes one is refused, by the Trainer and by `nbgpt
        run` alike; nproc and micro_batch may change, as the data position counts windows of the whole run
        (nbgpt.loader), and so may a learning rate (a diverged run resumes with a lower one)."""
        bound = {"recipe": self.recipe, "optimizer": self.optimizer, **model,
                 "seq_len": self.seq_len or model["block_size"],
                 "total_batch_tokens": self.total_batch_tokens, "shuffle": self.shuffle,
                 "align_documents": self.align_documents}
        return {**bound, "seed": self.seed} if self.shuffle else bound

    def batch_layout(self, block_size: int, world_size: int, micro_batch: int | None = None) -> tuple[int, int]:
        """(seq_len, grad_accum_steps): how total_batch_tokens splits over ranks and micro-steps of
        `micro_batch` sequences (default: the configured one; "auto" is checked at 1, which it may become)."""
        micro_batch = micro_batch or (1 if self.micro_batch == AUTO else self.micro_batch)
        seq_len = self.seq_len or block_size
        if seq_len > block_size:
            raise ConfigError(f"seq_len={seq_len} exceeds the model's block_size={block_size}; lower seq_len or "
                              f"raise block_size")
        tokens_per_micro_step = micro_batch * seq_len * world_size
        if self.total_batch_tokens % tokens_per_micro_step:
            raise ConfigError(
                f"total_batch_tokens={self.total_batch_tokens} is not a multiple of micro_batch × seq_len × "
                f"world_size = {micro_batch} × {seq_len} × {world_size} = {tokens_per_micro_step}"
                f"{' (micro_batch=auto, at its smallest)' if self.micro_batch == AUTO else ''}; "
                f"change total_batch_tokens, micro_batch or the number of processes (nproc)")
        return seq_len, self.total_batch_tokens // tokens_per_micro_step


def contradictions(config: TrainConfig) -> list[str]:
    """Settings that run but do not do what they seem to ask for."""
    found = []
    if config.warmup_steps >= config.max_steps:
        found.append(f"warmup_steps={config.warmup_steps} >= max_steps={config.max_steps}: the learning rate "
                     f"never reaches max_lr; lower warmup_steps (e.g. to {max(1, config.max_steps // 20)})")
    if config.schedule == "cosine" and config.cooldown_fraction != default_of(TrainConfig, "cooldown_fraction"):
        found.append(f"cooldown_fraction={config.cooldown_fraction} has no effect with schedule='cosine'; "
                     f"set schedule='trapezoid' to use it")
    elif config.schedule == "trapezoid" and config.warmup_steps > config.max_steps * (1 - config.cooldown_fraction):
        found.append(f"warmup_steps={config.warmup_steps} runs into the cooldown, which starts at step "
                     f"{round(config.max_steps * (1 - config.cooldown_fraction))}: the rate never stays at max_lr; "
                     f"lower warmup_steps or cooldown_fraction")
    for name in ("eval_interval", "sample_interval", "hellaswag_interval"):
        interval = getattr(config, name)
        if config.max_seconds is None and interval > config.max_steps:
            found.append(f"{name}={interval} > max_steps={config.max_steps}: it happens only at the end of "
                         f"the run; lower {name} to see it during training")
    model = {**MODEL_PRESETS.get(config.model, {}), **config.model_overrides}
    if "rope_base" in config.model_overrides and model.get("position", default_of(GPTConfig, "position")) != "rope":
        found.append(f"rope_base={config.model_overrides['rope_base']} has no effect with learned absolute "
                     f"positions; set position='rope' to use rotary positions")
    return found


@dataclass
class EvalConfig:
    hellaswag_path: str | None = knob(None, "hellaswag_val.jsonl (none: the cache, then a one-time download)")
    hellaswag_limit: int | None = knob(None, "score only the first N examples (none: all 10,042)")
    max_batch_tokens: int = knob(4096, "tokens scored per forward pass")
    device: str = knob("auto", DEVICE_HELP)
    precision: str = knob("auto", PRECISION_HELP)

    def __post_init__(self) -> None:
        check_fields(self)
        _choice("precision", self.precision, PRECISION_CHOICES)


@dataclass
class SampleConfig(SamplingConfig):
    """SamplingConfig's knobs plus what to say and where to run."""

    prompt: str = knob("", "text the sample continues ('': start from end-of-text)")
    device: str = knob("auto", DEVICE_HELP)
    precision: str = knob("auto", PRECISION_HELP)

    def __post_init__(self) -> None:
        check_fields(self)
        _choice("precision", self.precision, PRECISION_CHOICES)
        super().__post_init__()


STEPS = {"prepare": PrepareConfig, "baseline": BaselineConfig, "train": TrainConfig, "hellaswag": EvalConfig,
         "sample": SampleConfig}
_NOT_KNOBS = {"data_dir", "out_dir", "model_overrides"}  # set from the run directory / spelled as GPTConfig's


def knobs() -> dict[str, list[tuple[str | None, object]]]:
    """{flat name: [(step that reads it, or None for RunConfig itself; its annotation)]}."""
    table: dict[str, list] = {"nproc": [(None, int)]}
    for step, cls in STEPS.items():
        for name, annotation in field_types(cls).items():
            if name not in _NOT_KNOBS:
                table.setdefault(name, []).append((step, annotation))
    for name, annotation in field_types(GPTConfig).items():
        if name != "vocab_size":  # the dataset's tokenizer decides it
            table.setdefault(name, []).append(("train", annotation))
    return table


@dataclass
class RunConfig:
    nproc: int = knob(1, "training processes (GPUs); > 1 launches torchrun from notebook 03")
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    hellaswag: EvalConfig = field(default_factory=EvalConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def __post_init__(self) -> None:
        """Fail now, not hours into a run: the model must build and the batch must split over nproc."""
        fill_defaults(self)
        self.nproc = coerce(int, self.nproc, "nproc")
        if self.nproc < 1:
            raise ConfigError(f"nproc must be at least 1, got {self.nproc}")
        if self.train.init_from == "scratch":  # else the block size is the loaded model's, checked on load
            # the dataset decides vocab_size later; any value checks the rest of the model's shape now
            block_size = self.train.model_config(vocab_size=256).block_size
            self.train.batch_layout(block_size, self.nproc)

    def values(self, names) -> dict:
        """The values this run holds under flat `names`, typed by their fields: what `-p` gave them, parsed."""
        table, gpt_fields = knobs(), set(field_types(GPTConfig)) - set(field_types(TrainConfig))
        found = {}
        for name in names:
            step = table[name][0][0]  # the first step that reads it: a shared knob holds one value
            part = self if step is None else getattr(self, step)
            found[name] = part.model_overrides[name] if name in gpt_fields else getattr(part, name)
        return found

    @classmethod
    def from_preset(cls, preset: str | None, overrides: dict | None = None,
                    run_dir: str | Path | None = None) -> "RunConfig":
        """A named run of nbgpt.presets (None: the dataclasses' defaults) with some knobs changed by flat name
        (typed values or text): a recipe named by either one sets its knobs over the preset's values, under the
        overrides. run_dir sets where training reads and writes."""
        low, given, table = {} if preset is None else get_preset(preset), dict(overrides or {}), knobs()
        check_known({**low, **given}, table, "parameter")
        low, given = _by_step(low, table), _by_step(given, table)
        if run_dir is not None:
            given["train"].update(data_dir=str(Path(run_dir) / "data"), out_dir=str(run_dir))
        steps = {step: cls_(**{**low[step], **given[step]}) if step != "train" else
                 TrainConfig.from_dict(given[step], preset=low[step]) for step, cls_ in STEPS.items()}
        return cls(**{**low[None], **given[None]}, **steps)


def _by_step(values: dict, table: dict) -> dict[str | None, dict]:
    """Flat knob values sorted by the step that reads each (None: RunConfig's own; `table` is knobs()); a shared
    knob goes to all."""
    parts: dict[str | None, dict] = {None: {}, **{step: {} for step in STEPS}}
    for name, value in values.items():
        for step, _ in table[name]:
            parts[step][name] = value
    return parts
