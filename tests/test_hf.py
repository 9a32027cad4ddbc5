"""Parity with the reference implementation: transformers' GPT2LMHeadModel on the same weights."""

import pickle

import pytest
import torch

from nbgpt.model_files import HFFormatError, export_hf, load_hf
from nbgpt.model import GPT, ConfigError, GPTConfig

transformers = pytest.importorskip("transformers")


def random_hf_model(tmp_path, seed=0, safe=True):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=211, n_positions=48, n_embd=64, n_layer=3, n_head=4,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # make biases and LayerNorm params non-trivial so layout mistakes show
        for name, p in model.named_parameters():
            if "ln" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "hf")
    if not safe:  # the legacy pickle format that older checkpoints (and OpenAI's originals on the hub) use
        from safetensors.torch import load_file

        weights = tmp_path / "hf" / "model.safetensors"
        torch.save(load_file(weights), tmp_path / "hf" / "pytorch_model.bin")
        weights.unlink()
    return model


@pytest.mark.parametrize("safe", [True, False])
def test_import_matches_transformers(tmp_path, safe):
    reference = random_hf_model(tmp_path, safe=safe)
    ours = load_hf(tmp_path / "hf").eval()
    idx = torch.randint(0, 211, (2, 40))
    with torch.no_grad():
        expected = reference(idx, labels=idx)
        logits, _ = ours(idx)
        _, loss = ours(idx[:, :-1], idx[:, 1:])
    assert (logits - expected.logits).abs().max().item() <= 1e-4
    assert abs(loss.item() - expected.loss.item()) <= 1e-5


def test_import_with_vocab_padding(tmp_path):
    reference = random_hf_model(tmp_path)
    ours = load_hf(tmp_path / "hf", vocab_multiple=64).eval()
    assert ours.wte.weight.shape[0] == 256
    idx = torch.randint(0, 211, (1, 30))
    with torch.no_grad():
        assert (ours(idx)[0] - reference(idx).logits).abs().max().item() <= 1e-4


def test_export_loads_in_transformers(tmp_path):
    torch.manual_seed(1)
    ours = GPT(GPTConfig(vocab_size=150, block_size=32, n_layer=2, n_head=2, n_embd=32, vocab_multiple=64)).eval()
    export_hf(ours, tmp_path / "out")
    theirs = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    idx = torch.randint(0, 150, (2, 32))
    with torch.no_grad():
        assert (ours(idx)[0] - theirs(idx).logits).abs().max().item() <= 1e-4


def test_round_trip_is_exact(tmp_path):
    torch.manual_seed(2)
    ours = GPT(GPTConfig(vocab_size=150, block_size=32, n_layer=2, n_head=2, n_embd=32))
    export_hf(ours, tmp_path / "out")
    again = load_hf(tmp_path / "out")
    for (name, a), (_, b) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name


def test_speedrun_architecture_is_refused_naming_what_hf_cannot_represent(tmp_path):
    model = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=16, position="rope",
                          qk_norm=True, logit_softcap=30.0, activation="relu2", tie_embeddings=False))
    with pytest.raises(ConfigError) as refused:
        export_hf(model, tmp_path / "out")
    assert str(refused.value) == ("HF's GPT-2 cannot represent position='rope', qk_norm=True, logit_softcap=30; "
                                  "save this model in nbgpt's own format instead (nbgpt.model_files.export_nbgpt, or "
                                  "`nbgpt export --format nbgpt`)")
    assert not (tmp_path / "out").exists()


def test_relu2_and_an_untied_head_export_to_transformers_and_back(tmp_path):
    """The speedrun techniques HF's GPT-2 can express (ReLU², untied head, zero-initialised projections)."""
    torch.manual_seed(3)
    ours = GPT(GPTConfig(vocab_size=150, block_size=32, n_layer=2, n_head=2, n_embd=32, vocab_multiple=64,
                         activation="relu2", tie_embeddings=False, zero_init_proj=True)).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.05 * torch.randn_like(p))  # trained-like: no zero matrices, head unlike the embedding
    export_hf(ours, tmp_path / "out")
    theirs = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    idx = torch.randint(0, 150, (2, 32))
    with torch.no_grad():
        assert (ours(idx)[0] - theirs(idx).logits).abs().max().item() <= 1e-4
        again = load_hf(tmp_path / "out", vocab_multiple=64).eval()
        assert (again.config.activation, again.config.tie_embeddings) == ("relu2", False)
        torch.testing.assert_close(again(idx)[0], ours(idx)[0], atol=0, rtol=0)


class Payload:
    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(MARKER),))


MARKER = ""


def test_pickle_bin_payload_refused(tmp_path):
    global MARKER
    random_hf_model(tmp_path, safe=False)
    MARKER = str(tmp_path / "pwned")
    with open(tmp_path / "hf" / "pytorch_model.bin", "wb") as f:
        pickle.dump({"wte.weight": Payload()}, f)
    with pytest.raises(HFFormatError, match="refused"):
        load_hf(tmp_path / "hf")
    assert not (tmp_path / "pwned").exists()


def test_bad_directories(tmp_path):
    with pytest.raises(HFFormatError, match="not a directory"):
        load_hf(tmp_path / "missing-dir/")
    (tmp_path / "empty").mkdir()
    with pytest.raises(HFFormatError, match="no config.json"):
        load_hf(tmp_path / "empty")
    with pytest.raises(HFFormatError, match="OFFLINE"):
        load_hf("openai-community/gpt2")
