"""Argument definitions derived from the config dataclasses, shared by the CLI and the papermill presets.

Every field of TrainConfig (and of the other step configs) becomes `--field-name`, typed from its annotation,
so a knob added to a dataclass is a CLI flag and a notebook parameter at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
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


def dataclass_from_args(cls, args: argparse.Namespace, base: dict | None = None):
    names = {f.name for f in dataclasses.fields(cls)}
    values = dict(base or {})
    values.update({k: v for k, v in vars(args).items() if k in names})
    return cls(**values)


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


def build_parser() -> argparse.ArgumentParser:
    from .train import TrainConfig

    parser = argparse.ArgumentParser(prog="nbgpt", description="Reproduce GPT-2, notebook-first.")
    commands = parser.add_subparsers(title="commands")
    train = commands.add_parser("train", help="train a model on a prepared dataset (works under torchrun)")
    train.add_argument("--config-json", help="a JSON file of TrainConfig fields; flags override it")
    add_dataclass_arguments(train, TrainConfig)
    train.set_defaults(handler=_train)
    return parser
