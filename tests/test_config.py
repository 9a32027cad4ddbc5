"""One configuration path: every knob typed by its dataclass field, checked before any notebook runs."""

import os
import subprocess
import sys
import warnings
from dataclasses import asdict

import pytest

from nbgpt.checkpoint import resolve_checkpoint
from nbgpt.cli import build_parser, given
from nbgpt.knobs import ConfigWarning
from nbgpt.model import ConfigError, GPTConfig
from nbgpt.presets import RUN_PRESETS
from nbgpt.run_config import RECIPES, RunConfig, SampleConfig, TrainConfig
from nbgpt.run import RunError, check_run


def nbgpt(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "nbgpt", *args], capture_output=True, text=True, timeout=300,
                          cwd=cwd, env={**os.environ})


def test_p_values_parse_by_the_fields_type(tmp_path):
    typed = check_run("tiny", {"compile": "false", "shuffle": "TRUE", "resume": "0", "top_p": "none",
                               "hellaswag_limit": "null", "max_steps": "1_000", "max_lr": "2e-3", "bias": "False",
                               "errors": "replace", "prompt": "42", "stop": '["\\n\\n", "THE END"]',
                               "max_tokens": "2_000_000"},
                      tmp_path / "run")
    assert typed == {"compile": False, "shuffle": True, "resume": False, "top_p": None, "hellaswag_limit": None,
                     "max_steps": 1000, "max_lr": 2e-3, "bias": False, "errors": "replace", "prompt": "42",
                     "stop": ("\n\n", "THE END"), "max_tokens": 2_000_000}
    config = RunConfig.from_preset("tiny", typed, tmp_path / "run")
    assert config.train.compile is False and config.train.model_overrides == {"bias": False}
    assert config.hellaswag.hellaswag_limit is None and config.train.hellaswag_limit is None  # a shared knob
    assert config.prepare.errors == "replace" and config.sample.stop == ("\n\n", "THE END")
    assert config.prepare.max_tokens == 2_000_000


@pytest.mark.parametrize("name, value, message", [
    ("max_steps", "abc", "max_steps must be int, got 'abc'"),
    ("compile", "maybe", "compile must be bool, got 'maybe'"),
    ("top_k", "1.5", "top_k must be int or none, got '1.5'"),
    ("n_embd", "none", "n_embd must be int, got 'none'"),
    ("tokenizer", "bpe", "tokenizer must be one of gpt2, char, got 'bpe'"),
    ("n_head", "3", "GPTConfig.n_embd=64 is not divisible by n_head=3"),
    ("max_tokens", "0", "max_tokens must be positive"),
    ("threads", "0", "threads must be at least 1"),  # torch would refuse it in notebook 03, in a traceback
    ("precision", "fp8", "precision must be one of auto, fp32, bf16, fp16, got 'fp8'"),
])
def test_bad_values_name_the_parameter(tmp_path, name, value, message):
    with pytest.raises(RunError, match="invalid configuration: " + message):
        check_run("tiny", {name: value}, tmp_path)


def test_cli_flags_use_the_same_parser():
    parser = build_parser()
    args = parser.parse_args(["sample", "--checkpoint", "run", "--top-k", "none", "--stop-at-eot", "False",
                              "--prompt", "ROMEO:", "--num-return-sequences", "3"])
    config = SampleConfig(**given(args, SampleConfig))
    assert (config.top_k, config.stop_at_eot, config.prompt, config.num_return_sequences) == (None, False,
                                                                                              "ROMEO:", 3)
    train = parser.parse_args(["train", "--bias", "false", "--compile", "0", "--position", "rope",
                               "--rope-base", "500", "--max-seconds", "null"])
    assert given(train, TrainConfig) == {"compile": False, "max_seconds": None}
    config = TrainConfig.from_dict(given(train, TrainConfig, GPTConfig))
    assert config.compile is False
    assert config.model_overrides == {"bias": False, "position": "rope", "rope_base": 500.0}


def test_cli_rejects_a_bad_flag_naming_it(tmp_path):
    result = nbgpt("train", "--data-dir", str(tmp_path), "--max-steps", "abc")
    assert result.returncode == 2 and "max_steps must be int, got 'abc'" in result.stderr


def test_cli_train_reaches_gpt_fields(char_data, tmp_path):
    out = tmp_path / "run"
    result = nbgpt("train", "--data-dir", str(char_data), "--out-dir", str(out), "--bias", "false",
                   "--position", "rope", "--rope-base", "500", "--block-size", "32", "--total-batch-tokens", "256",
                   "--micro-batch", "8", "--max-steps", "2", "--warmup-steps", "1", "--eval-batches", "1",
                   "--precision", "fp32", "--progress", "false")
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = resolve_checkpoint(out)
    assert checkpoint["model_config"]["bias"] is False and checkpoint["model_config"]["rope_base"] == 500.0
    assert not any(name.endswith(".bias") for name in checkpoint["model"])
    assert checkpoint["train_config"]["model_overrides"] == {"bias": False, "position": "rope", "rope_base": 500.0,
                                                             "block_size": 32}


def test_unknown_names_get_a_suggestion(tmp_path):
    with pytest.raises(RunError, match=r"unknown parameter\(s\) \['max_step'\] \(did you mean 'max_steps'\?\)"):
        check_run("tiny", {"max_step": "30"}, tmp_path)
    with pytest.raises(ConfigError, match="did you mean 'n_layer'"):
        TrainConfig(model_overrides={"n_layers": 2})
    with pytest.raises(ConfigError, match="unknown run preset 'cpu_demo' \\(did you mean 'cpu-demo'\\?\\)"):
        RunConfig.from_preset("cpu_demo")
    result = nbgpt("train", "--data-dir", str(tmp_path), "--max-stepz", "5")  # argparse's own flags too
    assert result.returncode == 2
    assert "unrecognized arguments: --max-stepz 5 (did you mean '--max-steps'?)" in result.stderr
    preset = nbgpt("run", "--preset", "gpt2-124m-speedrn")  # and argparse's choices
    assert preset.returncode == 2 and preset.stderr.strip().splitlines()[-1].endswith(
        "(did you mean 'gpt2-124m-speedrun'?)")


def test_bad_configuration_stops_before_any_notebook(tmp_path):
    """The batch must split over nproc processes: found in the parent process, before papermill starts."""
    result = nbgpt("run", "--runs-dir", str(tmp_path), "--preset", "gpt2-124m", "-p", "nproc", "3")
    assert result.returncode == 2
    assert ("total_batch_tokens=524288 is not a multiple of micro_batch × seq_len × world_size = 1 × 1024 × 3 = "
            "3072 (micro_batch=auto, at its smallest)" in result.stderr)
    assert "[nbgpt] 01_tokenize.ipynb" not in result.stdout and not (tmp_path / "gpt2-124m").exists()
    typo = nbgpt("run", "--runs-dir", str(tmp_path), "--preset", "tiny", "-p", "max_step", "30")
    assert typo.returncode == 2 and "did you mean 'max_steps'" in typo.stderr
    assert not (tmp_path / "tiny").exists()


def test_contradictions_warn(tmp_path):
    with pytest.warns(ConfigWarning, match="warmup_steps=715 >= max_steps=500: the learning rate never reaches"):
        TrainConfig(max_steps=500, warmup_steps=715)
    with pytest.warns(ConfigWarning, match="eval_interval=250 > max_steps=100"):
        TrainConfig(max_steps=100, eval_interval=250)
    with pytest.warns(ConfigWarning, match="rope_base=500.0 has no effect with learned absolute positions"):
        TrainConfig(model="tiny", model_overrides={"rope_base": 500.0})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TrainConfig(model="small-char", model_overrides={"rope_base": 500.0})  # rotary by its preset
    lines = []
    check_run("tiny", {"warmup_steps": "40"}, tmp_path, echo=lines.append)
    assert lines == ["[nbgpt] warning: warmup_steps=40 >= max_steps=30: the learning rate never reaches max_lr; "
                     "lower warmup_steps (e.g. to 1)"]


@pytest.mark.parametrize("preset", sorted(RUN_PRESETS))
def test_presets_and_defaults_are_coherent(preset):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run = RunConfig.from_preset(preset)
        RunConfig()
    prep = run.prepare
    if prep.max_tokens is not None:  # a capped dataset holds the whole run: no token is read twice
        val = prep.val_tokens if prep.val_tokens is not None else round(prep.max_tokens * (prep.val_fraction or 0))
        assert prep.max_tokens - val >= run.train.max_steps * run.train.total_batch_tokens


def recipe_values(config: TrainConfig, recipe: str = "speedrun") -> dict:
    """The values of every field `recipe`'s bundle sets, as this TrainConfig holds them (model fields included)."""

    model = config.model_config(vocab_size=256).to_dict()
    return {name: model[name] if name in model else getattr(config, name) for name in RECIPES[recipe]}


def test_recipe_overrides_the_preset_and_explicit_values_override_the_recipe(tmp_path):

    plain = RunConfig.from_preset("gpt2-124m").train
    assert plain.recipe == "gpt2" and recipe_values(plain, "gpt2") == RECIPES["gpt2"]
    speedrun = RunConfig.from_preset("gpt2-124m", check_run("gpt2-124m", {"recipe": "speedrun"}, tmp_path / "a")).train
    assert recipe_values(speedrun) == RECIPES["speedrun"] and speedrun.max_lr != 6e-4  # not the 2019 rate
    assert (speedrun.micro_batch, speedrun.model_overrides["vocab_multiple"]) == ("auto", 64)  # the preset's stand
    typed = check_run("gpt2-124m", {"recipe": "speedrun", "qk_norm": "False", "max_lr": "0.02"}, tmp_path / "b")
    ablated = RunConfig.from_preset("gpt2-124m", typed).train
    assert recipe_values(ablated) == {**RECIPES["speedrun"], "qk_norm": False, "max_lr": 0.02}
    back = RunConfig.from_preset("gpt2-124m-speedrun", {"recipe": "gpt2"}).train
    assert back.recipe == "gpt2" and recipe_values(back, "gpt2") == RECIPES["gpt2"]  # switching back is symmetric
    demo = RunConfig.from_preset("cpu-demo").train
    assert (demo.optimizer, demo.recipe) == ("muon", None)  # no recipe named: the preset stands, and says so
    for name, preset in RUN_PRESETS.items():  # a preset naming a recipe sets none of its knobs (they'd be overruled)
        assert not set(preset) & set(RECIPES.get(preset.get("recipe"), {})), name
    code = TrainConfig.from_dict({"recipe": "speedrun", "qk_norm": False, "model": "gpt2"})
    assert recipe_values(code) == {**RECIPES["speedrun"], "qk_norm": False}
    assert TrainConfig.from_dict(asdict(code)) == code  # a checkpoint's train_config means the same run


def test_cli_train_applies_the_recipe_under_its_flags(char_data, tmp_path):
    parser = build_parser()
    args = parser.parse_args(["train", "--recipe", "speedrun", "--logit-softcap", "0", "--max-lr", "3e-3"])
    config = TrainConfig.from_dict(given(args, TrainConfig, GPTConfig))
    assert recipe_values(config) == {**RECIPES["speedrun"],
                                     "logit_softcap": 0.0, "max_lr": 3e-3}
    out = tmp_path / "run"
    result = nbgpt("train", "--data-dir", str(char_data), "--out-dir", str(out), "--recipe", "speedrun",
                   "--qk-norm", "false", "--block-size", "32", "--total-batch-tokens", "256", "--micro-batch", "8",
                   "--max-steps", "2", "--warmup-steps", "0", "--eval-batches", "1", "--precision", "fp32",
                   "--progress", "false")
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = resolve_checkpoint(out)
    assert checkpoint["train_config"]["recipe"] == "speedrun" and checkpoint["train_config"]["optimizer"] == "muon"
    assert checkpoint["model_config"]["qk_norm"] is False and checkpoint["model_config"]["position"] == "rope"
    assert "lm_head.weight" in checkpoint["model"]  # untied: the head is saved as a tensor of its own


def test_recipe_and_schedule_values_are_checked(tmp_path):
    for name, value, message in [("recipe", "modded", "unknown recipe 'modded'; choose one of"),
                                 ("schedule", "linear", "TrainConfig.schedule must be 'cosine' or 'trapezoid'"),
                                 ("cooldown_fraction", "0", r"cooldown_fraction must be in \(0, 1\]"),
                                 ("embedding_lr_scale", "-1", "embedding_lr_scale must be positive"),
                                 ("activation", "swish", "GPTConfig.activation must be one of 'gelu', 'relu2'")]:
        with pytest.raises(RunError, match="invalid configuration: " + message):
            check_run("tiny", {name: value}, tmp_path)
    with pytest.warns(ConfigWarning, match="cooldown_fraction=0.2 has no effect with schedule='cosine'"):
        TrainConfig(cooldown_fraction=0.2)
    with pytest.warns(ConfigWarning, match="warmup_steps=80 runs into the cooldown, which starts at step 60"):
        TrainConfig(schedule="trapezoid", max_steps=100, warmup_steps=80)
    bare = TrainConfig(recipe="speedrun")  # a recipe named in code is applied like one named anywhere else
    assert recipe_values(bare) == RECIPES["speedrun"]
    assert recipe_values(TrainConfig(recipe="speedrun", max_lr=0.02)) == {**RECIPES["speedrun"], "max_lr": 0.02}
    with pytest.raises(ConfigError, match="precision must be one of auto, fp32, bf16, fp16, got 'fp8'"):
        SampleConfig(precision="fp8")  # checked where it is configured, for every step that reads it
    assert TrainConfig().max_lr == 1e-3 and TrainConfig(optimizer="muon").optimizer == "muon"  # no recipe named
    launched = TrainConfig(model="small-char")  # a multi-GPU launch hands its workers the config as JSON
    assert TrainConfig.from_dict(asdict(launched)).model_config(65).position == "rope"


def test_old_checkpoint_train_configs_load():
    """Before model_overrides, TrainConfig held GPTConfig fields flat, None meaning the preset's value."""
    old = {"model": "tiny", "n_layer": None, "n_head": 4, "n_embd": None, "block_size": 32, "position": None,
           "dropout": 0.1, "vocab_multiple": 1, "max_steps": 20, "warmup_steps": 3, "eval_interval": 10}
    config = TrainConfig.from_dict(old)
    assert config.model_overrides == {"n_head": 4, "block_size": 32, "dropout": 0.1, "vocab_multiple": 1}
    assert config.model_config(vocab_size=65).n_head == 4


def test_a_malformed_config_json_is_one_line(tmp_path):
    broken = tmp_path / "config.json"
    broken.write_text('{"max_steps": 5,')
    result = nbgpt("train", "--config-json", str(broken))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{broken} is not valid JSON" in result.stderr and result.stderr.strip().count("\n") == 0


def test_every_flag_has_its_knobs_one_line_of_help():
    """--help shows each knob's own line (its knob() beside the field), then its default."""
    import argparse

    from nbgpt.run_config import knobs

    shown = subprocess.run([sys.executable, "-m", "nbgpt", "train", "--help"], capture_output=True, text=True,
                           timeout=300, env={**os.environ, "COLUMNS": "200"})
    assert shown.returncode == 0
    assert "--max-lr MAX_LR peak learning rate, reached after warmup_steps (default: 0.001)" in " ".join(
        shown.stdout.split())
    assert "--n-layer N_LAYER transformer blocks (default: 12; a GPTConfig field: it reshapes the --model preset)" \
        in " ".join(shown.stdout.split())
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    bare = [f"{command} {action.option_strings[-1]}" for command, parser in commands.items()
            for action in parser._actions if action.option_strings and not action.help
            or (action.help or "").startswith("(default")]
    assert bare == []
    from nbgpt.knobs import knob_help
    from nbgpt.run_config import STEPS

    classes = [*STEPS.values(), GPTConfig]  # every class a -p name reaches, and so every knob of nbgpt run
    unhelped = [name for name in knobs() if name != "nproc" and not any(knob_help(c).get(name) for c in classes)]
    assert unhelped == []


@pytest.mark.parametrize("preset,batch,lr", [("gpt3-small", 2**19, 6e-4), ("gpt3-xl", 2**20, 2e-4)])
def test_gpt3_run_presets_follow_the_papers_recipe(preset, batch, lr):
    """Table 2.1's batch (0.5M, 1M tokens) and peak rate; warmup over 375M tokens, a cosine down to 10 %."""
    train = RunConfig.from_preset(preset).train
    assert (train.total_batch_tokens, train.max_lr, train.min_lr_ratio, train.schedule) == (batch, lr, 0.1, "cosine")
    assert train.model_config(vocab_size=50257).block_size == 2048 and train.seq_len is None
    assert abs(train.warmup_steps * batch - 375e6) <= batch / 2


def test_expected_failures_share_one_base_class_that_main_prints_as_one_line(tmp_path):
    """`python -m nbgpt` catches NbgptError, so each module's own failure is a line there, not a traceback."""
    from nbgpt.assets import AssetError
    from nbgpt.device import DeviceError
    from nbgpt.errors import NbgptError
    from nbgpt.files import WriteError
    from nbgpt.hellaswag import HellaSwagError, HellaSwagUnavailable
    from nbgpt.model_files import HFFormatError
    from nbgpt.shards import DataError
    from nbgpt.sources import SourceError
    from nbgpt.tokenizer import TokenizerError

    for error in (AssetError, ConfigError, DataError, DeviceError, HellaSwagError, HellaSwagUnavailable,
                  HFFormatError, RunError, SourceError, TokenizerError, WriteError):
        assert issubclass(error, NbgptError), error
    assert issubclass(WriteError, OSError) and issubclass(ConfigError, ValueError)  # their callers' excepts hold
    result = nbgpt("eval", "--checkpoint", str(tmp_path / "nothing-here"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("nbgpt: ") and result.stderr.strip().count("\n") == 0


def test_one_answer_to_whether_hellaswag_can_score_a_model(char_data, tmp_path):
    """nbgpt eval, the trainer and notebook 04 ask nbgpt.hellaswag.load_examples_for; a char model cannot be."""
    from nbgpt.hellaswag import HellaSwagUnavailable, load_examples_for
    from nbgpt.tokenizer import CharTokenizer

    with pytest.raises(HellaSwagUnavailable, match="HellaSwag is English text in GPT-2 BPE, and this model uses "
                                                   "the char tokenizer"):
        load_examples_for(CharTokenizer.from_text("abc"))
    out = tmp_path / "run"
    trained = nbgpt("train", "--data-dir", str(char_data), "--out-dir", str(out), "--block-size", "32",
                    "--total-batch-tokens", "256", "--micro-batch", "8", "--max-steps", "1", "--warmup-steps", "0",
                    "--eval-batches", "1", "--precision", "fp32", "--progress", "false")
    assert trained.returncode == 0, trained.stderr[-2000:]
    result = nbgpt("eval", "--checkpoint", str(out), "--device", "cpu")
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0
    assert "HellaSwagUnavailable: HellaSwag is English text in GPT-2 BPE" in result.stderr


def test_a_recipe_named_over_a_preset_keeps_the_presets_shape():
    """Notebook 02 shows the speedrun's model on the run's own shape, built as `-p recipe speedrun` builds it."""
    model = RunConfig.from_preset("tiny", {"recipe": "speedrun"}).train.model_config(65)
    assert {name: getattr(model, name) for name in RECIPES["speedrun"] if name in asdict(model)} == {
        name: value for name, value in RECIPES["speedrun"].items() if name in asdict(model)}
    assert (model.position, model.n_layer, model.n_embd, model.tie_embeddings) == ("rope", 2, 64, False)
    with pytest.raises(ConfigError, match="unknown recipe 'modded'"):
        RunConfig.from_preset("tiny", {"recipe": "modded"})
