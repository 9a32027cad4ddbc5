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


def _eval(args: argparse.Namespace) -> int:
    from .device import choose_precision, resolve_device
    from .distributed import init_distributed, shutdown
    from .hellaswag import evaluate_hellaswag, load_any_model, load_examples

    device = resolve_device(args.device)
    info = init_distributed(device.type)
    if info.enabled and device.type == "cuda":
        device = torch_device("cuda", info.local_rank)
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


def torch_device(kind: str, index: int):
    import torch

    return torch.device(kind, index)


def build_parser() -> argparse.ArgumentParser:
    from .train import TrainConfig

    parser = argparse.ArgumentParser(prog="nbgpt", description="Reproduce GPT-2, notebook-first.")
    commands = parser.add_subparsers(title="commands")
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
    return parser
