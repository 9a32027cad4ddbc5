import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_train_config
from nbgpt.hellaswag import (Example, HellaSwagError, HellaSwagUnavailable, candidates, evaluate_hellaswag,
                             load_examples, read_examples, score_candidates,
                             score_shared_context)
from nbgpt.model import GPT, GPTConfig

FIXTURE = Path(__file__).parent / "data" / "hellaswag_fixture.jsonl"


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=50257, block_size=128, n_layer=2, n_head=2, n_embd=32)).eval()


def straightforward_acc_norm(model, tokenizer, examples):
    """An independent reference: one ending at a time, mean cross-entropy of its tokens."""
    correct = 0
    for example in examples:
        context = tokenizer.encode(example.context)
        means = []
        for ending in example.endings:
            tail = tokenizer.encode(" " + ending)
            tokens = torch.tensor([context + tail])
            with torch.no_grad():
                logits = model(tokens)[0][0]
            n = len(tail)
            means.append(F.cross_entropy(logits[-n - 1:-1], tokens[0, -n:]).item())
        correct += min(range(4), key=means.__getitem__) == example.label
    return correct / len(examples)


def test_fixture_parses(gpt2_tokenizer):
    examples = load_examples(FIXTURE)
    assert len(examples) == 20 and all(len(e.endings) == 4 for e in examples)
    assert len(load_examples(FIXTURE, limit=5)) == 5


def test_batched_equals_one_example_at_a_time(model, gpt2_tokenizer):
    examples = read_examples(FIXTURE)
    rows = candidates(examples, gpt2_tokenizer, 128)
    batched = score_candidates(model, rows, max_batch_tokens=2048)
    single = [s for i in range(0, len(rows), 4) for s in score_candidates(model, rows[i:i + 4], sort=False)]
    for (a, n), (b, m) in zip(batched, single):
        assert n == m and a == pytest.approx(b, abs=1e-4)
    shared = score_shared_context(model, examples, gpt2_tokenizer, max_batch_tokens=1024)
    for (a, n), (b, m) in zip(shared, single):
        assert n == m and a == pytest.approx(b, abs=1e-4)
    one = evaluate_hellaswag(model, gpt2_tokenizer, examples, per_example=True)
    many = evaluate_hellaswag(model, gpt2_tokenizer, examples)
    assert one == many and many["count"] == 20


def test_acc_norm_matches_straightforward_implementation(model, gpt2_tokenizer):
    examples = read_examples(FIXTURE)
    ours = evaluate_hellaswag(model, gpt2_tokenizer, examples)
    assert ours["acc_norm"] == straightforward_acc_norm(model, gpt2_tokenizer, examples)
    assert ours["correct_norm"] == round(ours["acc_norm"] * 20)


def test_briefly_trained_model_prefers_the_ending_it_has_read(tmp_path, gpt2_tokenizer):
    from nbgpt.shards import prepare
    from nbgpt.train import Trainer

    example = Example("The old lighthouse keeper climbed the stairs and",
                      ("sold his boots to a passing whale.", "lit the great lamp to guide the ships home.",
                       "baked a cake shaped like a mountain.", "forgot how to count to seven."), 1)
    text = " ".join([example.context + " " + example.endings[1]] * 300)
    (tmp_path / "story.txt").write_text(text)
    prepare(str(tmp_path / "story.txt"), "gpt2", tmp_path / "ds", shard_tokens=100_000, val_fraction=0.0,
            progress=False)
    before = GPT(GPTConfig.from_preset("tiny", vocab_size=50257, block_size=32))
    trainer = Trainer(tiny_train_config(tmp_path / "ds", tmp_path / "run", max_steps=40, eval_interval=0,
                                        checkpoint_interval=0, hellaswag_interval=20, hellaswag_path=str(FIXTURE)))
    trainer.fit()
    from nbgpt.metrics import read_metrics

    periodic = read_metrics(tmp_path / "run", "hellaswag")  # the trainer's own periodic evaluation
    assert [r["step"] for r in periodic] == [20, 40] and all(r["count"] == 20 for r in periodic)
    result = evaluate_hellaswag(trainer.model, gpt2_tokenizer, [example])
    assert result["acc_norm"] == 1.0 and result["acc"] == 1.0
    assert before is not None


def test_ddp_two_ranks_give_the_same_totals(tmp_path, model, gpt2_tokenizer):
    from nbgpt.checkpoint import save_checkpoint
    from nbgpt.tokenizer import tokenizer_spec

    save_checkpoint(tmp_path / "run" / "checkpoints", 0, {"model": model.state_dict(),
                                                          "model_config": model.config.to_dict(),
                                                          "tokenizer": tokenizer_spec(gpt2_tokenizer)})
    single = evaluate_hellaswag(model, gpt2_tokenizer, read_examples(FIXTURE))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "nbgpt",
           "eval", "--checkpoint", str(tmp_path / "run"), "--hellaswag-path", str(FIXTURE), "--precision", "fp32"]
    result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    totals = json.loads(result.stdout.strip().splitlines()[-1])
    assert totals == single


@pytest.mark.parametrize("line,message", [
    ('{"ctx": "a", "endings": ["x", "y", "z", "w"]}', "line 2: missing field\\(s\\) \\['label'\\]"),
    ('{"ctx": "a", "endings": ["x", "y", "z"], "label": 0}', "line 2: 'endings' must be a list of 4 strings, got 3"),
    ('{"ctx": "a", "endings": ["x", "y", "z", "w"], "label": 4}', "line 2: 'label' must be 0..3, got 4"),
    ('{"ctx": "a", "endings": ["x", "y", "z", "w"], "label": 0', "line 2: not JSON"),
])
def test_malformed_lines_are_named(tmp_path, line, message):
    good = FIXTURE.read_text().splitlines()[0]
    (tmp_path / "bad.jsonl").write_text(good + "\n" + line + "\n")
    with pytest.raises(HellaSwagError, match=message):
        read_examples(tmp_path / "bad.jsonl")


def test_unavailable_offline_says_how(tmp_path, monkeypatch):
    monkeypatch.setenv("NBGPT_CACHE", str(tmp_path))
    monkeypatch.delenv("NBGPT_HELLASWAG", raising=False)
    with pytest.raises(HellaSwagUnavailable, match="NBGPT_HELLASWAG=/path/to/hellaswag_val.jsonl"):
        load_examples()


def test_a_directory_as_hellaswag_path_is_named_as_one(tmp_path, model, gpt2_tokenizer):
    from nbgpt.checkpoint import save_checkpoint
    from nbgpt.tokenizer import tokenizer_spec

    save_checkpoint(tmp_path / "run" / "checkpoints", 0, {"model": model.state_dict(),
                                                          "model_config": model.config.to_dict(),
                                                          "tokenizer": tokenizer_spec(gpt2_tokenizer)})
    result = subprocess.run([sys.executable, "-m", "nbgpt", "eval", "--checkpoint", str(tmp_path / "run"),
                             "--hellaswag-path", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert (result.returncode, result.stderr) == (2, (
        f"nbgpt: HellaSwagUnavailable: HellaSwag's validation set: {tmp_path} (from the path argument) is a "
        f"directory; expected the file itself, e.g. {tmp_path / 'hellaswag_val.jsonl'}\n"))
