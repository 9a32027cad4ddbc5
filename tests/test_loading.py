"""The one model loader: HF folders, hub names through the Hugging Face cache, and the offline message,
exercised through `python -m nbgpt sample` as a user runs it."""

import os
import subprocess
import sys

import pytest
import torch

from nbgpt.generate import Generator, SamplingConfig
from nbgpt.hf import HFFormatError, load_hf
from nbgpt.loading import load_model
from nbgpt.widgets import prompt_panel

transformers = pytest.importorskip("transformers")

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def tiny_gpt2_folder(folder, vocab_size=50257):
    """A small random GPT2LMHeadModel with GPT-2's vocabulary, saved by transformers."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=vocab_size, n_positions=64, n_embd=32, n_layer=2, n_head=2)
    model = transformers.GPT2LMHeadModel(config).eval()
    model.save_pretrained(folder)
    return model


def sample(checkpoint, hub_cache, prompt="Hello"):
    cmd = [sys.executable, "-m", "nbgpt", "sample", "--checkpoint", str(checkpoint), "--prompt", prompt,
           "--max-new-tokens", "8", "--temperature", "0", "--device", "cpu", "--precision", "fp32"]
    env = {**os.environ, "HF_HUB_CACHE": str(hub_cache), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def test_sample_from_hf_folder_and_from_hf_cache(tmp_path, gpt2_tokenizer):
    reference = tiny_gpt2_folder(tmp_path / "hf")
    prompt_ids = gpt2_tokenizer.encode("Hello")
    with torch.no_grad():
        out = reference.generate(torch.tensor([prompt_ids]), max_new_tokens=8, do_sample=False,
                                 pad_token_id=gpt2_tokenizer.eot)
    expected = gpt2_tokenizer.decode(out[0, len(prompt_ids):].tolist()) + "\n"

    from_folder = sample(tmp_path / "hf", tmp_path / "empty-cache")
    assert from_folder.returncode == 0, from_folder.stderr[-2000:]
    assert from_folder.stdout == expected

    # The same weights as the hub's "gpt2" in the Hugging Face cache (its documented layout): offline, the
    # hub name resolves to the cached snapshot.
    snapshot = tmp_path / "hub" / "models--gpt2" / "snapshots" / COMMIT
    snapshot.parent.mkdir(parents=True)
    (tmp_path / "hub" / "models--gpt2" / "refs").mkdir()
    (tmp_path / "hub" / "models--gpt2" / "refs" / "main").write_text(COMMIT)
    (tmp_path / "hf").rename(snapshot)
    from_cache = sample("gpt2", tmp_path / "hub")
    assert from_cache.returncode == 0, from_cache.stderr[-2000:]
    assert from_cache.stdout == expected


def test_hub_name_offline_without_a_cached_copy_says_so(tmp_path):
    result = sample("gpt2", tmp_path / "empty-cache")
    assert result.returncode != 0
    assert ("'gpt2' is no local path, and as a hub model name it is not in the Hugging Face cache and "
            "NBGPT_OFFLINE/HF_HUB_OFFLINE is set") in result.stderr
    assert "hf download gpt2" in result.stderr


def test_hf_folder_with_another_vocabulary_is_refused(tmp_path):
    tiny_gpt2_folder(tmp_path / "hf", vocab_size=300)
    with pytest.raises(HFFormatError, match="vocab_size 300, fewer than GPT-2 BPE's 50257"):
        load_model(tmp_path / "hf")


def test_loaded_hf_folder_describes_itself(tmp_path):
    tiny_gpt2_folder(tmp_path / "hf")
    loaded = load_model(tmp_path / "hf")
    assert loaded.step is None and loaded.tokenizer.name == "gpt2" and not loaded.model.training
    assert loaded.describe() == f"GPT-2-format weights from {tmp_path / 'hf'}"


def test_prompt_panel_loads_a_model_source(tmp_path, gpt2_tokenizer):
    tiny_gpt2_folder(tmp_path / "hf")
    panel = prompt_panel(str(tmp_path / "hf"), prompt="Hello", precision="fp32")
    panel.max_tokens.value, panel.temperature.value = 6, 0.0
    panel.generate_button.click()
    assert panel.wait(60)
    expected = Generator(load_hf(tmp_path / "hf"), gpt2_tokenizer).complete(
        "Hello", SamplingConfig(max_new_tokens=6, temperature=0.0))
    assert panel.text == expected and "done:" in panel.status.value


def test_a_mistyped_local_path_is_not_sent_to_the_hub(tmp_path):
    (tmp_path / "runs" / "mine").mkdir(parents=True)
    with pytest.raises(HFFormatError, match=r"runs/mnie does not exist \(in .*runs: mine\), so it is not a directory"):
        load_model(tmp_path / "runs" / "mnie")
    relative = subprocess.run([sys.executable, "-m", "nbgpt", "sample", "--checkpoint", "runs/mnie"], cwd=tmp_path,
                              capture_output=True, text=True, timeout=300)
    assert relative.returncode == 2 and "hf download" not in relative.stderr
    assert relative.stderr.strip().count("\n") == 0 and "runs/mnie does not exist" in relative.stderr
