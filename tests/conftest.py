import os

import pytest
import torch

# Tests never reach the internet: only the package registry, through the same routes users get offline.
os.environ.setdefault("NBGPT_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def gpt2_tokenizer():
    from nbgpt.tokenizer import GPT2Tokenizer

    return GPT2Tokenizer()
