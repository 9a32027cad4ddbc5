"""FSDP (parallel="fsdp", nbgpt.distributed) on the CPU with gloo: the same training as DDP, checkpoints in the
same format, and the gather Muon needs."""

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from conftest import tiny_train_config
from nbgpt.checkpoint import load_latest
from nbgpt.model_files import load_model
from nbgpt.metrics import read_metrics

HERE = Path(__file__).parent


def torchrun_each(configs: list, nproc: int, tmp_path: Path, script: str = "train_each.py", *extra) -> None:
    """Run every config in one torchrun of `nproc` gloo processes (tests/train_each.py: train each). A
    (config, N) pair trains it up to step N, where the same config listed next resumes it."""
    paths = []
    for config in configs:
        config, until = config if isinstance(config, tuple) else (config, None)
        path = tmp_path / f"{Path(config.out_dir).name}.json"
        path.write_text(json.dumps(asdict(config)))
        paths.append(f"{path}@{until}" if until else str(path))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(HERE / script), *paths, *map(str, extra)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]


CASES = [(optimizer, precision) for optimizer in ("adamw", "muon") for precision in ("fp32", "bf16")]


def test_fsdp_trains_as_ddp_does(char_data, tmp_path):
    """2 ranks under FSDP == 2 ranks under DDP, step for step: the losses, the gradient norm clipping saw (the
    whole model's, from the sharded gradients), the final weights and every optimizer state (AdamW's moments,
    Muon's momentum, gathered from the shards into the checkpoint's format) for AdamW and Muon in fp32; in
    bf16 the losses, norms and the weights as a whole.
    Two micro-steps per step: the first accumulates without reducing. Eval runs through the sharded model. The
    fp32 FSDP runs stop at step 1 and resume: the weights, moments and momentum go back into their shards."""
    common = dict(max_steps=3, warmup_steps=1, eval_interval=3, checkpoint_interval=3, total_batch_tokens=16 * 32,
                  micro_batch=4, block_size=32)
    configs = []
    for optimizer, precision in CASES:
        for parallel in ("ddp", "fsdp"):
            config = tiny_train_config(char_data, tmp_path / f"{parallel}-{optimizer}-{precision}", parallel=parallel,
                                       optimizer=optimizer, precision=precision, **common)
            configs += [(config, 1), config] if (parallel, precision) == ("fsdp", "fp32") else [config]
    torchrun_each(configs, 2, tmp_path)
    for optimizer, precision in CASES:
        ddp, fsdp = (tmp_path / f"{parallel}-{optimizer}-{precision}" for parallel in ("ddp", "fsdp"))
        tol = dict(rtol=1e-5, atol=2e-6) if precision == "fp32" else dict(rtol=2e-2, atol=2e-3)
        ours, theirs = read_metrics(fsdp, "train"), read_metrics(ddp, "train")
        assert [r["step"] for r in ours] == [0, 1, 2]
        assert ("resumed from step 1" in (fsdp / "train.log").read_text()) == (precision == "fp32")
        for key in ("loss", "grad_norm"):
            torch.testing.assert_close(torch.tensor([r[key] for r in ours]), torch.tensor([r[key] for r in theirs]),
                                       **tol, msg=f"{optimizer} {precision} {key}")
        assert [r["val_loss"] for r in read_metrics(fsdp, "eval")] == pytest.approx(
            [r["val_loss"] for r in read_metrics(ddp, "eval")], rel=tol["rtol"] * 10)
        a, b = load_latest(fsdp / "checkpoints"), load_latest(ddp / "checkpoints")
        assert a["step"] == b["step"] == 3 and a["model"].keys() == b["model"].keys()
        loaded = load_model(fsdp)  # what export, sample, eval and the panel load
        assert loaded.step == 3 and all(torch.equal(t, a["model"][k]) for k, t in loaded.model.state_dict().items())
        if precision == "bf16":
            # FSDP computes with bf16 copies of every weight, DDP's autocast casts per op: AdamW's normalised
            # steps turn the rounding differences of near-zero gradients (the key bias, whose exact gradient
            # is 0) into steps of ±lr in a few entries, so the weights agree as a whole, not entry by entry.
            difference = sum(((a["model"][k] - t) ** 2).sum() for k, t in b["model"].items()).sqrt()
            assert difference / sum((t ** 2).sum() for t in b["model"].values()).sqrt() < 1e-2
            continue
        for name, tensor in b["model"].items():
            torch.testing.assert_close(a["model"][name], tensor, **tol, msg=f"{optimizer} {name}")
        for mine, reference in zip(a["optimizer"], b["optimizer"], strict=True):
            assert mine["param_groups"] == reference["param_groups"] and mine["state"].keys() == reference["state"].keys()
            for index, state in reference["state"].items():
                for key, value in state.items():
                    torch.testing.assert_close(mine["state"][index][key].cpu(), value.cpu(), **tol,
                                               msg=f"{optimizer} state {index} {key}")


def test_parallel_is_ddp_or_fsdp():
    from nbgpt.model import ConfigError
    from nbgpt.run_config import RunConfig

    assert RunConfig.from_preset("gpt3-xl").train.parallel == "fsdp"
    with pytest.raises(ConfigError, match="parallel must be 'ddp' .* or 'fsdp' .*, got 'zero3'"):
        RunConfig.from_preset("tiny", {"parallel": "zero3"})


def test_fsdp_fp16_overflow_in_one_ranks_shard_skips_the_whole_step_on_every_rank(char_data, tmp_path):
    """GradScaler over sharded gradients: an inf in rank 0's shard alone is seen by every rank (the clipped
    norm is the whole model's), so no rank moves any parameter, under Muon + AdamW or AdamW alone, and both
    halve their loss scale alike; the next step goes through."""
    configs = [tiny_train_config(char_data, tmp_path / optimizer, parallel="fsdp", precision="fp16",
                                 optimizer=optimizer, micro_batch=4) for optimizer in ("adamw", "muon")]
    torchrun_each(configs, 2, tmp_path, "fsdp_overflow.py", tmp_path / "results.json")
    for result in json.loads((tmp_path / "results.json").read_text()):
        assert result["skipped"] and result["moved"] == [False, False] and not result["next_skipped"]
        (before, after), other = result["scales"]
        assert after == before / 2 and other == [before, after]


FIXTURE = HERE / "data" / "hellaswag_fixture.jsonl"


def test_a_sharded_model_samples_and_scores_hellaswag_as_one_process_does(tmp_path, gpt2_tokenizer):
    """2 gloo ranks, each holding half of a tiny GPT (FSDP): samples decoded through the shards (KV cache,
    rank 0's tokens) and HellaSwag's totals equal one process's with the same weights. At a small batch
    budget the ranks have different numbers of batches, and FILLER batches give every rank the same forward
    passes (else the run would hang, not fail)."""
    from nbgpt.generate import Generator, SamplingConfig
    from nbgpt.hellaswag import evaluate_hellaswag, read_examples
    from nbgpt.model import GPT, GPTConfig

    budgets, limit = (4096, 100), 13  # 7 examples on rank 0, 6 on rank 1; at 100 tokens a batch holds one
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(HERE / "fsdp_decode.py"), str(tmp_path / "out.json"), str(FIXTURE), str(limit), *map(str, budgets)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    sharded = json.loads((tmp_path / "out.json").read_text())
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50257, block_size=64, n_layer=2, n_head=2, n_embd=32))
    examples = read_examples(FIXTURE, limit)
    for budget in budgets:
        assert sharded["hellaswag"][str(budget)] == evaluate_hellaswag(model, gpt2_tokenizer, examples,
                                                                       max_batch_tokens=budget)
        passes, batches = sharded["passes"][str(budget)], sharded["batches"][str(budget)]
        # one token through forward first (claim_root), then two passes per batch (context, then endings)
        assert passes[0] == passes[1] == 1 + 2 * max(batches)
    assert sharded["batches"]["100"] == [7, 6] and sharded["batches"]["4096"] == [1, 1]  # rank 1 ran a filler
    assert sharded["per_example"] == ["per_example scoring needs a model that is not sharded; use the "
                                      "shared-context scorer"] * 2  # refused on every rank alike, not left to hang
    assert sharded["training"] == [False, False]  # scored in eval mode (a trainer's next step sets train mode)
    generator = Generator(model, gpt2_tokenizer, precision="fp32")
    single = [generator.generate(["The", "Once upon a time"], SamplingConfig(max_new_tokens=24, top_k=50, seed=seed,
                                                                             num_return_sequences=2))
              for seed in (1, 2)]
    assert sharded["samples"] == [single, single] and len({text for texts in single for text in texts}) > 1


@pytest.fixture(scope="module")
def gpt2_data(tmp_path_factory, shakespeare_works):
    from conftest import prepared_works

    return prepared_works(tmp_path_factory, shakespeare_works[:1], "gpt2")


def test_fsdp_training_samples_and_scores_hellaswag_as_it_goes(gpt2_data, tmp_path, gpt2_tokenizer):
    """parallel=fsdp on 2 processes with sample_interval and hellaswag_interval set (refused before): a
    sample before the first step, a sample and HellaSwag at step 2 with training going on after them, and
    the final step's sample and HellaSwag scores, logged by rank 0, equal one process's from the checkpoint
    of that step."""
    from nbgpt.generate import Generator, SamplingConfig
    from nbgpt.hellaswag import evaluate_hellaswag, read_examples
    from nbgpt.run_config import RunConfig

    assert RunConfig.from_preset("gpt3-xl", {"hellaswag_interval": 500, "sample_interval": 500}).nproc == 8
    config = tiny_train_config(gpt2_data, tmp_path / "run", parallel="fsdp", max_steps=3, warmup_steps=1,
                               micro_batch=4, total_batch_tokens=8 * 32, eval_interval=2, checkpoint_interval=2,
                               sample_interval=2, sample_prompt="The king", sample_tokens=16, hellaswag_interval=2,
                               hellaswag_path=str(FIXTURE), hellaswag_limit=13)
    torchrun_each([config], 2, tmp_path)
    samples, scores = read_metrics(tmp_path / "run", "sample"), read_metrics(tmp_path / "run", "hellaswag")
    assert [r["step"] for r in samples] == [0, 2, 3] and [r["step"] for r in scores] == [2, 3]
    loaded = load_model(tmp_path / "run")
    assert loaded.step == 3 and [r["step"] for r in read_metrics(tmp_path / "run", "train")] == [0, 1, 2]
    text = Generator(loaded.model, loaded.tokenizer, precision="fp32").complete(
        "The king", SamplingConfig(max_new_tokens=16, top_k=50, seed=3))
    assert samples[-1]["text"] == text and text
    single = evaluate_hellaswag(loaded.model, gpt2_tokenizer, read_examples(FIXTURE, 13))
    assert {key: scores[-1][key] for key in single} == single
