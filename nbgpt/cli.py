"""Command line: every flag is a field of a config dataclass, typed by its annotation.

`nbgpt train` takes TrainConfig's fields and GPTConfig's (which go into TrainConfig.model_overrides), `prepare`
PrepareConfig's, `eval` EvalConfig's, `sample` SampleConfig's; `run -p NAME VALUE` takes any of them by flat
name. Values are read by nbgpt.config.coerce, the same parser for flags, `-p`, JSON and presets. `nbgpt export`
(a source and a folder) writes a model in HF's GPT-2 format or nbgpt's own (nbgpt.export).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import re
import sys

from .config import coerce, did_you_mean, field_types


def _flag_type(annotation, name: str):
    def parse(text: str):
        try:
            return coerce(annotation, text, name)
        except ValueError as exc:  # ConfigError: argparse prints it after the flag's name, exit status 2
            raise argparse.ArgumentTypeError(str(exc)) from None
    parse.__name__ = name
    return parse


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = (),
                            note: str | None = None) -> None:
    """A `--field-name` flag per field of `cls`; flags left out stay out of the namespace (the dataclass decides)."""
    defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(cls)}
    for name, annotation in field_types(cls).items():
        if name not in skip:
            parser.add_argument("--" + name.replace("_", "-"), dest=name, type=_flag_type(annotation, name),
                                default=argparse.SUPPRESS, help=note or f"(default: {defaults[name]!r})")


def given(args: argparse.Namespace, *classes) -> dict:
    """The flags given for the fields of `classes`."""
    names = {name for cls in classes for name in field_types(cls)}
    return {k: v for k, v in vars(args).items() if k in names}


def _train(args: argparse.Namespace) -> int:
    from .config import ConfigError
    from .model import GPTConfig
    from .train import TrainConfig, Trainer

    base = {}
    if args.config_json:
        with open(args.config_json) as f:
            try:
                base = json.load(f)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{args.config_json} is not valid JSON ({exc}); fix the file or pass flags") from None
    trainer = Trainer(TrainConfig.from_dict({**base, **given(args, TrainConfig, GPTConfig)}))
    try:
        summary = trainer.fit()
    finally:
        trainer.close()
    is_main = trainer.dist.is_main
    # An FSDP model's process-group handles, left to the interpreter's exit, were torn down out of order there
    # about once in eight gloo runs (a C++ abort after training had ended): they are freed now, in order.
    del trainer
    gc.collect()
    if is_main:
        print(json.dumps({"step": summary["step"], "val_loss": summary["val_loss"],
                          "train_loss": summary["train"].get("loss")}))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from .device import choose_precision, resolve_device
    from .distributed import init_distributed, shutdown
    from .hellaswag import HellaSwagUnavailable, evaluate_hellaswag, load_examples
    from .loading import load_model
    from .run_config import EvalConfig

    import torch

    config = EvalConfig(**given(args, EvalConfig))
    device = resolve_device(config.device)
    info = init_distributed(device.type)
    if info.enabled and device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
    try:
        loaded = load_model(args.checkpoint, device=str(device))
        model, tokenizer = loaded.model, loaded.tokenizer
        if tokenizer.name != "gpt2":  # scores from another tokenizer's model would mean nothing
            raise HellaSwagUnavailable(f"HellaSwag is English text in GPT-2 BPE; {args.checkpoint} uses the "
                                       f"{tokenizer.name} tokenizer: evaluate a model trained on gpt2 tokens")
        examples = load_examples(config.hellaswag_path, limit=config.hellaswag_limit)
        result = evaluate_hellaswag(model, tokenizer, examples, device=device,
                                    precision=choose_precision(device, config.precision),
                                    max_batch_tokens=config.max_batch_tokens, dist_info=info)
    finally:
        shutdown(info)
    if info.is_main:
        print(json.dumps(result))
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from .run_config import PrepareConfig
    from .shards import describe_dataset

    result = PrepareConfig(**given(args, PrepareConfig)).run(args.out_dir)
    print(json.dumps({"built": result.built, **describe_dataset(result.out_dir)}))
    return 0


def _sample(args: argparse.Namespace) -> int:
    from .generate import load_generator
    from .run_config import SampleConfig

    config = SampleConfig(**given(args, SampleConfig))
    generator = load_generator(args.checkpoint, device=config.device, precision=config.precision)
    decoder = generator.decoder
    print(f"nbgpt sample: decoding on {decoder.device} in {decoder.precision} (precision={config.precision})",
          file=sys.stderr)
    if config.num_return_sequences == 1:
        print(config.prompt, end="")  # the prompt, then the continuation as it comes
        for piece in generator.stream(config.prompt, config):
            print(piece, end="", flush=True)
        print()
    else:
        for text in generator.generate([config.prompt], config):
            print(config.prompt + text + "\n" + "-" * 40)
    return 0


def _export(args: argparse.Namespace) -> int:
    from .export import export_model
    from .loading import load_model

    loaded = load_model(args.checkpoint)
    out, written, why = export_model(loaded.model, loaded.tokenizer, args.out, args.format)
    print(json.dumps({"out": str(out), "format": written, "why": why}))
    return 0


def _run(args: argparse.Namespace) -> int:
    from .run import RunError, RunStopped, run_pipeline

    overrides = dict(args.parameters or [])  # text: RunConfig's fields parse it by their types
    if args.preset is None and not (args.resume and args.name):
        print("nbgpt run: --preset is required (only --resume --name NAME may leave it out: the run "
              "remembers its preset)", file=sys.stderr)
        return 2
    try:
        result = run_pipeline(args.preset, overrides, name=args.name, runs_dir=args.runs_dir, resume=args.resume,
                              notebooks=args.notebooks)
    except RunStopped as exc:
        print(f"nbgpt run: {exc}. Resume with: python -m nbgpt run --runs-dir {args.runs_dir} --name "
              f"{args.name or args.preset} --resume", file=sys.stderr)
        return 128 + exc.signum
    except RunError as exc:
        print(f"nbgpt run: {exc}", file=sys.stderr)
        return 2
    print(f"\nrun directory:      {result.run_dir}")
    print("executed notebooks: " + "\n                    ".join(str(p) for p in result.notebooks))
    print("plots:              " + "\n                    ".join(str(p) for p in result.plots))
    if result.samples:
        print(f"samples:            {result.samples}")
    if result.final_val_loss is not None:
        print(f"final val loss:     {result.final_val_loss:.4f}")
    if result.hellaswag:
        print(f"hellaswag:          {json.dumps(result.hellaswag)}")
    return 0


class Parser(argparse.ArgumentParser):
    """argparse, plus a did-you-mean for a misspelt flag (`--max-stepz` names `--max-steps`) or choice
    (`--preset gpt2-124m-speedrn` names `gpt2-124m-speedrun`)."""

    def error(self, message: str):
        if message.startswith("unrecognized arguments:"):
            hints = [did_you_mean(token.split("=")[0], self.option_names())
                     for token in message.split(":", 1)[1].split() if token.startswith("--")]
            message += "".join(hint for hint in hints if hint)
        elif choice := re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)$", message):
            message += did_you_mean(choice.group(1), re.findall(r"'([^']*)'", choice.group(2)))
        super().error(message)

    def option_names(self) -> set[str]:
        """Every --flag of this parser and of its commands (unknown flags reach the top-level parser)."""
        names = set()
        for action in self._actions:
            names.update(o for o in action.option_strings if o.startswith("--"))
            if isinstance(action, argparse._SubParsersAction):
                for command in action.choices.values():
                    names.update(command.option_names())
        return names


MODEL_SOURCES = ("run directory, checkpoint file, exported folder (HF GPT-2 or nbgpt format), or hub name such as "
                 "gpt2 (see nbgpt.loading)")


def build_parser() -> argparse.ArgumentParser:
    from .export import FORMATS
    from .model import GPTConfig
    from .presets import RUN_PRESETS
    from .run_config import EvalConfig, PrepareConfig, SampleConfig
    from .train import TrainConfig

    parser = Parser(prog="nbgpt", description="Reproduce GPT-2, notebook-first.")
    commands = parser.add_subparsers(title="commands")
    run = commands.add_parser("run", help="execute the five notebooks with papermill into runs/<name>")
    run.add_argument("--preset", choices=sorted(RUN_PRESETS),
                     help="the run's preset (with --resume --name, the one the run was started with)")
    run.add_argument("-p", "--parameter", dest="parameters", nargs=2, action="append", metavar=("NAME", "VALUE"),
                     help="set any knob of nbgpt.run_config.RunConfig by name, e.g. -p max_steps 50 (repeatable)")
    run.add_argument("--name", help="run directory name (default: the preset's name)")
    run.add_argument("--runs-dir", default="runs")
    run.add_argument("--resume", action="store_true", help="continue an existing run directory")
    run.add_argument("--notebooks", nargs="+", help="run only these notebooks (file names)")
    run.set_defaults(handler=_run)

    prep = commands.add_parser("prepare", help="tokenize a corpus into shards")
    prep.add_argument("source", help="shakespeare | tinyshakespeare | fineweb-edu | hf:NAME[:CONFIG] | path/glob")
    prep.add_argument("out_dir")
    add_dataclass_arguments(prep, PrepareConfig, skip=("source",))
    prep.set_defaults(handler=_prepare)

    train = commands.add_parser("train", help="train a model on a prepared dataset (works under torchrun)")
    train.add_argument("--config-json", help="a JSON file of TrainConfig fields; flags override it")
    add_dataclass_arguments(train, TrainConfig, skip=("model_overrides",))
    add_dataclass_arguments(train, GPTConfig, skip=("vocab_size",),
                            note="GPTConfig field: changes the --model preset (kept in TrainConfig.model_overrides)")
    train.set_defaults(handler=_train)

    evaluate = commands.add_parser("eval", help="HellaSwag accuracy of a checkpoint, HF GPT-2 directory or hub "
                                                "model (works under torchrun)")
    evaluate.add_argument("--checkpoint", required=True, help=MODEL_SOURCES)
    add_dataclass_arguments(evaluate, EvalConfig)
    evaluate.set_defaults(handler=_eval)

    sample = commands.add_parser("sample", help="generate text from a checkpoint (streams to stdout)")
    sample.add_argument("--checkpoint", required=True, help=MODEL_SOURCES)
    add_dataclass_arguments(sample, SampleConfig)
    sample.set_defaults(handler=_sample)

    export = commands.add_parser("export", help="write a model for others: HF GPT-2 format where it can express "
                                                "the model, else nbgpt's own (see nbgpt.export)")
    export.add_argument("--checkpoint", required=True, help=MODEL_SOURCES)
    export.add_argument("--out", required=True, help="the folder to write")
    export.add_argument("--format", choices=FORMATS, default="auto",
                        help="auto (default): hf when HF's GPT-2 can express the model, else nbgpt")
    export.set_defaults(handler=_export)
    return parser
