"""Argument definitions derived from the config dataclasses, shared by the CLI and the papermill presets.

Every field of TrainConfig (and of the other step configs) becomes `--field-name`, typed from its annotation,
so a knob added to a dataclass is a CLI flag and a notebook parameter at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import types
import typing


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _optional(kind):
    def parse(text: str):
        return None if text.lower() in ("none", "null", "") else kind(text)
    parse.__name__ = kind.__name__
    return parse


def field_parser(annotation):
    """argparse `type=` for a dataclass field annotation (int, float, str, bool, X | None)."""
    hints = typing.get_args(annotation) if isinstance(annotation, types.UnionType) or typing.get_origin(
        annotation) is typing.Union else ()
    if hints:
        inner = next(h for h in hints if h is not type(None))
        return _optional(field_parser(inner))
    if annotation is bool:
        return _parse_bool
    if annotation in (int, float, str):
        return annotation
    return json.loads


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=field_parser(hints[f.name]),
                            default=argparse.SUPPRESS, help=f"(default: {default!r})")


def add_signature_arguments(parser: argparse.ArgumentParser, function, skip: tuple[str, ...] = ()) -> None:
    """Flags for a function's keyword parameters, typed from its annotations."""
    import inspect

    hints = typing.get_type_hints(function)
    for name, parameter in inspect.signature(function).parameters.items():
        if name in skip or parameter.default is inspect.Parameter.empty:
            continue
        parser.add_argument("--" + name.replace("_", "-"), dest=name, type=field_parser(hints.get(name, str)),
                            default=argparse.SUPPRESS, help=f"(default: {parameter.default!r})")


def dataclass_from_args(cls, args: argparse.Namespace, base: dict | None = None):
    """`cls` from a base dict (e.g. --config-json) overridden by the parsed flags; unknown keys are named."""
    from .model import config_from_dict

    names = {f.name for f in dataclasses.fields(cls)}
    values = dict(base or {})
    values.update({k: v for k, v in vars(args).items() if k in names})
    return config_from_dict(cls, values)


def _train(args: argparse.Namespace) -> int:
    from .train import TrainConfig, Trainer

    base = {}
    if args.config_json:
        with open(args.config_json) as f:
            base = json.load(f)
    trainer = Trainer(dataclass_from_args(TrainConfig, args, base))
    try:
        summary = trainer.fit()
    finally:
        trainer.close()
    if trainer.dist.is_main:
        print(json.dumps({"step": summary["step"], "val_loss": summary["val_loss"],
                          "train_loss": summary["train"].get("loss")}))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from .device import choose_precision, resolve_device
    from .distributed import init_distributed, shutdown
    from .hellaswag import evaluate_hellaswag, load_any_model, load_examples

    import torch

    device = resolve_device(args.device)
    info = init_distributed(device.type)
    if info.enabled and device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
    try:
        model, tokenizer = load_any_model(args.checkpoint, device=str(device))
        examples = load_examples(args.hellaswag_path, limit=args.limit)
        result = evaluate_hellaswag(model, tokenizer, examples, device=device,
                                    precision=choose_precision(device, args.precision),
                                    max_batch_tokens=args.max_batch_tokens, dist_info=info)
    finally:
        shutdown(info)
    if info.is_main:
        print(json.dumps(result))
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from .shards import describe_dataset, prepare

    options = {k: v for k, v in vars(args).items() if k not in ("handler", "source", "tokenizer", "out_dir")}
    result = prepare(args.source, args.tokenizer, args.out_dir, **options)
    print(json.dumps({"built": result.built, **describe_dataset(result.out_dir)}))
    return 0


def _sample(args: argparse.Namespace) -> int:
    from .generate import SamplingConfig, load_generator

    generator = load_generator(args.checkpoint, device=args.device, precision=args.precision)
    config = dataclass_from_args(SamplingConfig, args)
    if config.num_return_sequences == 1:
        for piece in generator.stream(args.prompt, config):
            print(piece, end="", flush=True)
        print()
    else:
        for text in generator.generate([args.prompt], config):
            print(args.prompt + text + "\n" + "-" * 40)
    return 0


def _run(args: argparse.Namespace) -> int:
    from .run import RunError, RunStopped, parse_value, run_pipeline

    overrides = {key: parse_value(value) for key, value in args.parameters or []}
    try:
        result = run_pipeline(args.preset, overrides, name=args.name, runs_dir=args.runs_dir, resume=args.resume,
                              notebooks=args.notebooks)
    except RunStopped as exc:
        print(f"nbgpt run: {exc}. Resume with: python -m nbgpt run --preset {args.preset} --runs-dir "
              f"{args.runs_dir} --name {args.name or args.preset} --resume", file=sys.stderr)
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


def build_parser() -> argparse.ArgumentParser:
    from .generate import SamplingConfig
    from .presets import RUN_PRESETS
    from .shards import prepare
    from .train import TrainConfig

    parser = argparse.ArgumentParser(prog="nbgpt", description="Reproduce GPT-2, notebook-first.")
    commands = parser.add_subparsers(title="commands")
    run = commands.add_parser("run", help="execute the five notebooks with papermill into runs/<name>")
    run.add_argument("--preset", required=True, choices=sorted(RUN_PRESETS))
    run.add_argument("-p", "--parameter", dest="parameters", nargs=2, action="append", metavar=("KEY", "VALUE"),
                     help="override a notebook parameter or TrainConfig/GPTConfig field (repeatable)")
    run.add_argument("--name", help="run directory name (default: the preset's name)")
    run.add_argument("--runs-dir", default="runs")
    run.add_argument("--resume", action="store_true", help="continue an existing run directory")
    run.add_argument("--notebooks", nargs="+", help="run only these notebooks (file names)")
    run.set_defaults(handler=_run)

    prep = commands.add_parser("prepare", help="tokenize a corpus into shards")
    prep.add_argument("source", help="shakespeare | tinyshakespeare | fineweb-edu | hf:NAME[:CONFIG] | path/glob")
    prep.add_argument("out_dir")
    prep.add_argument("--tokenizer", default="gpt2", choices=["gpt2", "char"])
    add_signature_arguments(prep, prepare, skip=("progress",))
    prep.set_defaults(handler=_prepare)

    train = commands.add_parser("train", help="train a model on a prepared dataset (works under torchrun)")
    train.add_argument("--config-json", help="a JSON file of TrainConfig fields; flags override it")
    add_dataclass_arguments(train, TrainConfig)
    train.set_defaults(handler=_train)

    evaluate = commands.add_parser("eval", help="HellaSwag accuracy of a checkpoint or HF GPT-2 directory "
                                                "(works under torchrun)")
    evaluate.add_argument("--checkpoint", required=True, help="run directory, checkpoint file, or HF directory")
    evaluate.add_argument("--hellaswag-path", default=None, help="hellaswag_val.jsonl (default: cache/download)")
    evaluate.add_argument("--limit", type=int, default=None, help="score only the first N examples")
    evaluate.add_argument("--device", default="auto")
    evaluate.add_argument("--precision", default="auto")
    evaluate.add_argument("--max-batch-tokens", type=int, default=4096)
    evaluate.set_defaults(handler=_eval)

    sample = commands.add_parser("sample", help="generate text from a checkpoint (streams to stdout)")
    sample.add_argument("--checkpoint", required=True, help="run directory or checkpoint file")
    sample.add_argument("--prompt", default="")
    sample.add_argument("--device", default="auto")
    sample.add_argument("--precision", default="auto")
    add_dataclass_arguments(sample, SamplingConfig)
    sample.set_defaults(handler=_sample)
    return parser
