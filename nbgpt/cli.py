"""Command line: every flag is a field of a config dataclass, typed by its annotation.

`nbgpt plan` prices a run's GPU memory (nbgpt.memory) from the same --preset and -p as `run`.
`nbgpt train` takes TrainConfig's fields and GPTConfig's (which go into TrainConfig.model_overrides), `prepare`
PrepareConfig's, `eval` EvalConfig's, `sample` SampleConfig's; `run -p NAME VALUE` takes any of them by flat
name. Values are read by nbgpt.knobs.coerce, the same parser for flags, `-p`, JSON and presets. `nbgpt export`
(a source and a folder) writes a model in HF's GPT-2 format or nbgpt's own (nbgpt.model_files).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys

from .knobs import coerce, did_you_mean, field_types, knob_default, knob_help


def _flag_type(annotation, name: str):
    def parse(text: str):
        try:
            return coerce(annotation, text, name)
        except ValueError as exc:  # ConfigError: argparse prints it after the flag's name, exit status 2
            raise argparse.ArgumentTypeError(str(exc)) from None
    parse.__name__ = name
    return parse


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = (),
                            note: str = "") -> None:
    """A `--field-name` flag per field of `cls`, helped by the field's own line (nbgpt.knobs.knob) and its
    default; flags left out stay out of the namespace (the dataclass decides)."""
    defaults = {f.name: knob_default(f) for f in dataclasses.fields(cls)}
    helps = knob_help(cls)
    for name, annotation in field_types(cls).items():
        if name not in skip:
            text = f"{helps[name]} (default: {defaults[name]!r}{note})".replace("%", "%%")  # argparse formats help
            parser.add_argument("--" + name.replace("_", "-"), dest=name, type=_flag_type(annotation, name),
                                default=argparse.SUPPRESS, help=text)


def given(args: argparse.Namespace, *classes) -> dict:
    """The flags given for the fields of `classes`."""
    names = {name for cls in classes for name in field_types(cls)}
    return {k: v for k, v in vars(args).items() if k in names}


def _train(args: argparse.Namespace) -> int:
    from .knobs import ConfigError
    from .model import GPTConfig
    from .train import Trainer
    from .run_config import TrainConfig

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
    if trainer.dist.is_main:
        print(json.dumps({"step": summary["step"], "val_loss": summary["val_loss"],
                          "train_loss": summary["train"].get("loss")}))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from .distributed import shutdown
    from .hellaswag import evaluate_hellaswag, load_examples_for
    from .model_files import load_model
    from .run_config import EvalConfig
    from .train_setup import start_runtime

    config = EvalConfig(**given(args, EvalConfig))
    runtime = start_runtime(config.device, config.precision)
    device, info = runtime.device, runtime.dist
    try:
        loaded = load_model(args.checkpoint, device=str(device))
        model, tokenizer = loaded.model, loaded.tokenizer
        examples = load_examples_for(tokenizer, config.hellaswag_path, limit=config.hellaswag_limit)
        result = evaluate_hellaswag(model, tokenizer, examples, device=device,
                                    precision=runtime.precision,
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
    from .model_files import export_model, load_model

    loaded = load_model(args.checkpoint)
    exported = export_model(loaded.model, loaded.tokenizer, args.out, args.format)
    print(json.dumps({**exported._asdict(), "out": str(exported.out)}))
    return 0


def _run(args: argparse.Namespace) -> int:
    from .metrics import eval_scope
    from .run import RunError, run_pipeline
    from .stop import TrainingStopped

    overrides = dict(args.parameters or [])  # text: RunConfig's fields parse it by their types
    if args.preset is None and not (args.resume and args.name):
        print("nbgpt run: --preset is required (only --resume --name NAME may leave it out: the run "
              "remembers its preset)", file=sys.stderr)
        return 2
    try:
        result = run_pipeline(args.preset, overrides, name=args.name, runs_dir=args.runs_dir, resume=args.resume,
                              notebooks=args.notebooks, replace=args.replace)
    except TrainingStopped as exc:
        print(f"nbgpt run: {exc}", file=sys.stderr)
        return exc.exit_status
    except RunError as exc:
        print(f"nbgpt run: {exc}", file=sys.stderr)
        return 2
    print(f"\nrun directory:      {result.run_dir}")
    print("executed notebooks: " + "\n                    ".join(str(p) for p in result.notebooks))
    print("plots:              " + "\n                    ".join(str(p) for p in result.plots))
    if result.samples:
        print(f"samples:            {result.samples}")
    if result.final_val_loss is not None:
        print(f"final val loss:     {result.final_val_loss:.4f} at step {result.final_eval['step']}"
              f"{eval_scope(result.final_eval)}")
    if result.hellaswag:
        skipped = result.hellaswag.get("skipped")
        print(f"hellaswag:          {'skipped: ' + skipped if skipped else json.dumps(result.hellaswag)}")
    for warning in result.warnings:  # said while training, and worth seeing again at the end
        print(warning)
    return 0


def _plan(args: argparse.Namespace) -> int:
    from .memory import plan_memory
    from .run_config import RunConfig

    overrides = dict(args.parameters or [])
    if args.nproc is not None:
        overrides["nproc"] = args.nproc
    run = RunConfig.from_preset(args.preset, overrides)
    plan = plan_memory(run, args.gpu, args.gpu_memory)
    title = f"{args.preset} ({run.train.model})"
    print(json.dumps(plan.to_dict()) if args.json else "\n".join(plan_lines(title, plan)))
    return 0 if plan.fits else 1


PHASE_NAMES = {"train_eager": "training step, eager", "train_compiled": "training step, compiled",
               "eval": "validation loss", "hellaswag": "HellaSwag", "sample": "sampling",
               "speedups": "notebook 03 speed-up cell"}


def plan_lines(preset: str, plan) -> list[str]:
    """nbgpt plan's table: the GPU, the micro-batch and why, the peak of each phase, and whether it fits."""
    from .memory import MARGIN, NON_TORCH_GIB

    lines = [f"nbgpt plan: {preset} on {plan.nproc} × {plan.gpu} ({plan.gpu_memory_gib:g} GiB each), "
             f"{plan.parallel}, {plan.precision}, compile {'on' if plan.compile else 'off'}"]
    if plan.micro_batch is not None:
        lines.append(f"micro_batch: {plan.micro_batch} sequence{'s' if plan.micro_batch != 1 else ''} per GPU per "
                     f"micro-step, "
                     f"{plan.sequences_per_rank // plan.micro_batch} micro-step(s) per optimizer step")
    lines += [f"  {plan.why}", "", f"  {'phase':<28}{'peak GiB per GPU':>17}"]
    used = "train_compiled" if plan.compile else "train_eager"
    for name, gib in plan.phases.items():
        lines.append(f"  {PHASE_NAMES[name]:<28}{gib:>17.2f}{'   <- the run uses this' if name == used else ''}")
    lines += ["", f"usable: {plan.budget_gib:.2f} GiB of {plan.gpu_memory_gib:g} GiB ({NON_TORCH_GIB:g} "
                  f"GiB outside torch, then a {MARGIN:.0%} margin) · peak "
                  f"{plan.peak_gib:.2f} GiB · fits: {'yes' if plan.fits else 'NO'}"]
    lines += [plan.instead] if plan.instead else []
    return lines + [f"note: {note}" for note in plan.notes]


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


def add_plan_command(commands, presets: list[str]) -> None:
    """`nbgpt plan`: a preset's run priced in GPU memory, with the same --preset and -p as `nbgpt run`."""
    plan = commands.add_parser("plan", help="peak GPU memory per phase of a preset's run, and the micro-batch it "
                                            "will use (works on a CPU-only machine)")
    plan.add_argument("--preset", required=True, choices=presets, help="the run preset to plan (see nbgpt run)")
    plan.add_argument("-p", "--parameter", dest="parameters", nargs=2, action="append", metavar=("NAME", "VALUE"),
                      help="set any knob of nbgpt.run_config.RunConfig by name, as nbgpt run does (repeatable)")
    plan.add_argument("--nproc", type=_flag_type(int, "nproc"), help="GPUs (default: the preset's nproc)")
    target = plan.add_mutually_exclusive_group()
    target.add_argument("--gpu", help="a known GPU: a100-40gb, a100-80gb, h100, h200, l4, t4, a10g, l40s, v100-16gb, "
                                      "v100-32gb, rtx-4090 (default: this machine's GPU)")
    target.add_argument("--gpu-memory", type=_flag_type(float, "gpu_memory"), metavar="GiB",
                        help="any GPU, by its total memory in GiB (as torch.cuda reports it)")
    plan.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    plan.set_defaults(handler=_plan)


def add_run_command(commands, presets: list[str]) -> None:
    run = commands.add_parser("run", help="execute the five notebooks with papermill into runs/<name>")
    run.add_argument("--preset", choices=presets,
                     help="the run's preset (with --resume --name, the one the run was started with)")
    run.add_argument("-p", "--parameter", dest="parameters", nargs=2, action="append", metavar=("NAME", "VALUE"),
                     help="set any knob of nbgpt.run_config.RunConfig by name, e.g. -p max_steps 50 (repeatable)")
    run.add_argument("--name", help="run directory name (default: the preset's name)")
    run.add_argument("--runs-dir", default="runs", help="the folder that holds run directories (default: runs)")
    run.add_argument("--resume", action="store_true", help="continue an existing run directory")
    run.add_argument("--notebooks", nargs="+", help="run only these notebooks (file names)")
    run.add_argument("--replace", action="store_true",
                     help="start over when runs/<name> holds an earlier run that was itself started with --replace "
                          "(make demo's); any other run there is kept and the command refused")
    run.set_defaults(handler=_run)


MODEL_SOURCES = ("run directory, checkpoint file, exported folder (HF GPT-2 or nbgpt format), or hub name such as "
                 "gpt2 (see nbgpt.model_files)")


def build_parser() -> argparse.ArgumentParser:
    from .model import GPTConfig
    from .presets import RUN_PRESETS
    from .run_config import EvalConfig, PrepareConfig, SampleConfig, TrainConfig

    parser = Parser(prog="nbgpt", description="Reproduce GPT-2, notebook-first.")
    commands = parser.add_subparsers(title="commands")
    add_run_command(commands, sorted(RUN_PRESETS))
    add_plan_command(commands, sorted(RUN_PRESETS))

    prep = commands.add_parser("prepare", help="tokenize a corpus into shards")
    prep.add_argument("source", help="shakespeare | tinyshakespeare | fineweb-edu | hf:NAME[:CONFIG] | path/glob")
    prep.add_argument("out_dir")
    add_dataclass_arguments(prep, PrepareConfig, skip=("source",))
    prep.set_defaults(handler=_prepare)

    train = commands.add_parser("train", help="train a model on a prepared dataset (works under torchrun)")
    train.add_argument("--config-json", help="a JSON file of TrainConfig fields; flags override it")
    add_dataclass_arguments(train, TrainConfig, skip=("model_overrides",))
    add_dataclass_arguments(train, GPTConfig, skip=("vocab_size",),
                            note="; a GPTConfig field: it reshapes the --model preset")
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

    add_export_command(commands)
    return parser


def add_export_command(commands) -> None:
    from .model_files import FORMATS

    export = commands.add_parser("export", help="write a model for others: HF GPT-2 format where it can express "
                                                "the model, else nbgpt's own (see nbgpt.model_files)")
    export.add_argument("--checkpoint", required=True, help=MODEL_SOURCES)
    export.add_argument("--out", required=True, help="the folder to write")
    export.add_argument("--format", choices=FORMATS, default="auto",
                        help="auto (default): hf when HF's GPT-2 can express the model, else nbgpt")
    export.set_defaults(handler=_export)
