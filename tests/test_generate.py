import re
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from nbgpt.generate import DecodeLinear, Generator, SamplingConfig, sample_next
from nbgpt.model import GPT, BigramLM, GPTConfig, KVCache
from nbgpt.tokenizer import CharTokenizer, TokenizerError

transformers = pytest.importorskip("transformers")

TEXT = "the quick brown fox jumps over the lazy dog. THE QUICK BROWN FOX!\n"


@pytest.fixture(scope="module")
def char_tok():
    return CharTokenizer.from_text(TEXT)


def tiny_model(vocab, position="absolute", block_size=64, seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=vocab, block_size=block_size, n_layer=2, n_head=2, n_embd=32,
                         position=position)).eval()


@pytest.mark.parametrize("position", ["absolute", "rope"])
def test_cached_decoding_equals_full_recompute_every_step(char_tok, position):
    model = tiny_model(char_tok.vocab_size, position)
    generator = Generator(model, char_tok)
    prompt = char_tok.encode("the quick")
    config = SamplingConfig(max_new_tokens=40, temperature=0.0, stop_at_eot=False)
    tokens = torch.tensor([prompt])
    cache = KVCache(model.config, 1, 64, "cpu", torch.float32)
    with torch.no_grad():
        logits = model(tokens, cache=cache)[0][:, -1]
        for _ in range(40):
            full = model(tokens)[0][:, -1]
            assert (logits - full).abs().max().item() <= 1e-4
            next_id = logits.argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, next_id], 1)
            logits = model(next_id, cache=cache)[0][:, -1]
    assert generator.generate_ids([prompt], config)[0] == tokens[0, len(prompt):].tolist()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_decoding_snapshot_packs_the_same_weights_side_by_side(char_tok, precision):
    model = tiny_model(char_tok.vocab_size)
    snapshot = Generator(model, char_tok, precision=precision).model
    params = list(snapshot.parameters())
    for dtype in {p.dtype for p in params}:  # one buffer per dtype (bf16: the Linear weights; fp32: the rest)
        assert len({p.untyped_storage().data_ptr() for p in params if p.dtype == dtype}) == 1
    assert torch.equal(snapshot.wte.weight, model.wte.weight)
    linear = snapshot.h[1].mlp.c_fc
    expected = model.h[1].mlp.c_fc.weight
    if precision == "fp32":  # stored transposed, in one column slice per thread
        parts, _, width = linear.weight.shape
        assert parts == torch.get_num_threads()
        columns = linear.weight.transpose(0, 1).reshape(expected.size(1), parts * width)
        assert torch.equal(columns[:, :expected.size(0)], expected.t())
    else:
        assert torch.equal(linear.weight, expected.to(torch.bfloat16))


@pytest.mark.parametrize("parts", [1, 2, 3])
@pytest.mark.parametrize("bias", [True, False])
def test_decode_linear_slices_compute_the_linear_layer(parts, bias):
    torch.manual_seed(0)
    linear = nn.Linear(24, 37, bias=bias)  # 37 columns: with 2 or 3 slices the last one is zero-padded
    sliced = DecodeLinear(linear, parts)
    for shape in [(1, 1, 24), (2, 5, 24)]:  # one decoded token; a prefill of ragged rows
        x = torch.randn(shape)
        with torch.no_grad():
            out, expected = sliced(x), linear(x)
        assert out.shape == expected.shape and torch.allclose(out, expected, atol=1e-6)


def test_greedy_matches_transformers_generate(tmp_path):
    from nbgpt.model_files import load_hf

    torch.manual_seed(3)
    config = transformers.GPT2Config(vocab_size=300, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                                     bos_token_id=299, eos_token_id=299)
    reference = transformers.GPT2LMHeadModel(config).eval()
    reference.save_pretrained(tmp_path / "hf")
    ours = load_hf(tmp_path / "hf")
    char = CharTokenizer([chr(0x100 + i) for i in range(299)])  # 299 symbols + eot = 300 ids
    prompt = torch.randint(0, 299, (1, 7))
    expected = reference.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                  max_new_tokens=30, min_new_tokens=30, pad_token_id=299)
    produced = Generator(ours, char).generate_ids([prompt[0].tolist()], SamplingConfig(
        max_new_tokens=30, temperature=0.0, stop_at_eot=False))[0]
    assert produced == expected[0, 7:].tolist()


def test_seeds_top_k_and_top_p(char_tok):
    generator = Generator(tiny_model(char_tok.vocab_size), char_tok)
    sample = lambda **kw: generator.complete("the", SamplingConfig(max_new_tokens=30, stop_at_eot=False, **kw))
    assert sample(seed=1) == sample(seed=1)
    assert sample(seed=1) != sample(seed=2)
    assert sample(seed=5, top_k=1) == sample(temperature=0.0)  # (a negative temperature is refused)
    assert sample(seed=5, top_p=1e-6) == sample(temperature=0.0)  # nucleus of one token is greedy


def test_top_k_and_top_p_restrict_support():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    gen = torch.Generator().manual_seed(0)
    seen_k = {int(sample_next(logits, SamplingConfig(top_k=2), gen)) for _ in range(300)}
    assert seen_k == {0, 1}
    seen_p = {int(sample_next(logits, SamplingConfig(top_p=0.7), gen)) for _ in range(300)}
    assert seen_p == {0, 1}  # 0.5 < 0.7, 0.5 + 0.3 reaches it: tokens 2 and 3 are cut


def test_ragged_batch_and_num_return_sequences(char_tok):
    model = tiny_model(char_tok.vocab_size, "rope")
    generator = Generator(model, char_tok)
    greedy = SamplingConfig(max_new_tokens=20, temperature=0.0, stop_at_eot=False)
    batched = generator.generate(["the", "the quick brown"], greedy)
    assert batched == [generator.complete("the", greedy), generator.complete("the quick brown", greedy)]
    several = generator.generate(["fox"], SamplingConfig(max_new_tokens=15, seed=0, num_return_sequences=3,
                                                        stop_at_eot=False))
    assert len(several) == 3 and len(set(several)) > 1


def test_context_slides_with_correct_positions(char_tok):
    model = tiny_model(char_tok.vocab_size, block_size=16)
    generator = Generator(model, char_tok)
    config = SamplingConfig(max_new_tokens=40, temperature=0.0, stop_at_eot=False)
    prompt = char_tok.encode("the quick brown")  # 15 of 16 positions used
    produced = generator.generate_ids([prompt], config)[0]
    assert len(produced) == 40
    # Recompute the reference: whenever the window is full, restart from its newest half at position 0.
    context, expected = list(prompt), []
    for _ in range(40):
        with torch.no_grad():
            next_id = int(model(torch.tensor([context]))[0][0, -1].argmax())
        expected.append(next_id)
        context.append(next_id)
        if len(context) > 16:
            context = context[-8:]
    assert produced == expected


def test_streaming_never_splits_a_character(gpt2_tokenizer):
    text = "naïve café — 日本語 ☃ ok"
    ids = gpt2_tokenizer.encode(text)
    assert any("\ufffd" in gpt2_tokenizer.decode([i]) for i in ids)  # some tokens are partial characters

    class Scripted(torch.nn.Module):
        """Emits a fixed token sequence, to drive the streamer through split characters."""

        block_size, kv_cache = 64, False  # what Generator needs from a model

        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def forward(self, idx, targets=None, cache=None, keep_logits=None):
            logits = torch.full((idx.size(0), idx.size(1), 50257), -1e9)
            step = idx.size(1) - self.prompt_len
            logits[:, -1, ids[step] if step < len(ids) else 50256] = 0
            return logits, None

    model = Scripted()
    model.prompt_len = len(gpt2_tokenizer.encode("x"))
    generator = Generator(model, gpt2_tokenizer, use_cache=False)
    pieces = list(generator.stream("x", SamplingConfig(max_new_tokens=50, temperature=0.0)))
    assert "".join(pieces) == text
    assert not any("\ufffd" in piece for piece in pieces)
    assert len(pieces) > 5
    stopped = list(generator.stream("x", SamplingConfig(max_new_tokens=50, temperature=0.0, stop=["日本"])))
    assert "".join(stopped) == "naïve café — "


def test_stop_string_and_eot_end_generation(char_tok):
    generator = Generator(tiny_model(char_tok.vocab_size), char_tok)
    free = generator.complete("the", SamplingConfig(max_new_tokens=30, temperature=0.0, stop_at_eot=False))
    stop = free[3:5]
    cut = generator.complete("the", SamplingConfig(max_new_tokens=30, temperature=0.0, stop=[stop]))
    assert cut == free[: free.index(stop)]


def test_bad_inputs(char_tok):
    generator = Generator(tiny_model(char_tok.vocab_size, block_size=16), char_tok)
    assert generator.encode_prompt("") == [char_tok.eot]
    with pytest.warns(UserWarning, match="keeping its last 16 tokens"):
        assert len(generator.encode_prompt("the quick brown fox jumps")) == 16
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        SamplingConfig(top_p=1.5)
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0.0)
    with pytest.raises(ValueError, match="top_k"):
        SamplingConfig(top_k=0)
    with pytest.raises(TokenizerError, match=r"'@' \(U\+0040\) at position 3"):
        generator.complete("the@", SamplingConfig(max_new_tokens=2))
    assert isinstance(generator.complete("", SamplingConfig(max_new_tokens=5, seed=0)), str)


def test_bigram_generates_without_cache(char_tok):
    bigram = BigramLM(char_tok.vocab_size)
    text = Generator(bigram, char_tok).complete("the", SamplingConfig(max_new_tokens=10, seed=0, stop_at_eot=False))
    assert len(text) == 10


@pytest.mark.parametrize("flag,value,message", [
    ("--top-k", "0", "top_k must be a positive integer or none, got 0"),
    ("--top-p", "1.5", "top_p must be in (0, 1] or none, got 1.5"),
    ("--max-new-tokens", "-1", "max_new_tokens must be >= 0, got -1"),
    ("--temperature", "-1", "temperature must be >= 0 (0 means greedy: always the most likely token), got -1.0")])
def test_bad_sampling_settings_are_one_line_from_the_cli_and_the_dataclass(flag, value, message):
    """SamplingConfig checks them, so `nbgpt sample`, `-p` and the notebooks all get the same line."""
    from nbgpt.knobs import ConfigError

    result = subprocess.run([sys.executable, "-m", "nbgpt", "sample", "--checkpoint", "no-such-run", flag, value],
                            capture_output=True, text=True, timeout=300)
    assert (result.returncode, result.stderr) == (2, f"nbgpt: ConfigError: {message}\n")
    with pytest.raises(ConfigError, match=re.escape(message.rsplit(", got", 1)[0])):
        SamplingConfig(**{flag[2:].replace("-", "_"): float(value)})
