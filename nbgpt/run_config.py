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

from dataclasses import dataclass, field
from pathlib import Path

from .config import ConfigError, check_fields, check_known, coerce, did_you_mean, field_types, knob
from .generate import SamplingConfig
from .model import GPTConfig
from .presets import RUN_PRESETS, get_preset
from .recipes import with_recipe
from .shards import check_cap, prepare
from .train import TrainConfig


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
class EvalConfig:
    hellaswag_path: str | None = knob(None, "hellaswag_val.jsonl (none: the cache, then a one-time download)")
    hellaswag_limit: int | None = knob(None, "score only the first N examples (none: all 10,042)")
    max_batch_tokens: int = knob(4096, "tokens scored per forward pass")
    device: str = knob("auto", "auto, cpu, cuda, cuda:N or mps (auto: the best available)")
    precision: str = knob("auto", "auto, fp32, bf16 or fp16 (auto: bf16 where native and faster, else fp16 on "
                          "GPUs, fp32 on CPUs)")

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class SampleConfig(SamplingConfig):
    """SamplingConfig's knobs plus what to say and where to run."""

    prompt: str = knob("", "text the sample continues ('': start from end-of-text)")
    device: str = knob("auto", "auto, cpu, cuda, cuda:N or mps (auto: the best available)")
    precision: str = knob("auto", "auto, fp32, bf16 or fp16 (auto: bf16 where native and faster, else fp16 on "
                          "GPUs, fp32 on CPUs)")

    def __post_init__(self) -> None:
        check_fields(self)
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
        self.nproc = coerce(int, self.nproc, "nproc")
        if self.nproc < 1:
            raise ConfigError(f"nproc must be at least 1, got {self.nproc}")
        if self.train.init_from == "scratch":  # else the block size is the loaded model's, checked on load
            # the dataset decides vocab_size later; any value checks the rest of the model's shape now
            block_size = self.train.model_config(vocab_size=256).block_size
            self.train.batch_layout(block_size, self.nproc)

    @classmethod
    def from_flat(cls, values: dict, run_dir: str | Path | None = None) -> "RunConfig":
        """RunConfig from flat names (typed values or text); run_dir sets where training reads and writes."""
        table = knobs()
        check_known(values, table, "parameter")
        top: dict = {}
        parts: dict[str, dict] = {step: {} for step in STEPS}
        for name, value in values.items():
            for step, _ in table[name]:
                (top if step is None else parts[step])[name] = value
        if run_dir is not None:
            parts["train"].update(data_dir=str(Path(run_dir) / "data"), out_dir=str(run_dir))
        steps = {step: cls_(**parts[step]) for step, cls_ in STEPS.items() if step != "train"}
        return cls(**top, **steps, train=TrainConfig.from_dict(parts["train"]))

    @classmethod
    def from_preset(cls, preset: str | None, overrides: dict | None = None,
                    run_dir: str | Path | None = None) -> "RunConfig":
        """A named run of nbgpt.presets (None: the dataclasses' defaults) with some knobs changed: a recipe
        named by either one fills in its bundle over the preset's values, under the overrides."""
        return cls.from_flat(with_recipe(preset_values(preset), overrides or {}), run_dir)


def preset_values(preset: str | None) -> dict:
    if preset is None:
        return {}
    if preset not in RUN_PRESETS:
        raise ConfigError(f"unknown run preset {preset!r}{did_you_mean(preset, RUN_PRESETS)}; choose one of "
                          f"{sorted(RUN_PRESETS)}")
    return get_preset(preset)  # the table's values, completed by this machine's measurements


def typed_values(values: dict) -> dict:
    """Flat values parsed by their knobs' types (text from the command line becomes ints, bools, None...)."""
    table = knobs()
    check_known(values, table, "parameter")
    return {name: coerce(table[name][0][1], value, name) for name, value in values.items()}
