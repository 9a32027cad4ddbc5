import math

import pytest
import torch

from nbgpt.optim import build_adamw
from nbgpt.model import (GPT, MODEL_PRESETS, BigramLM, ConfigError, GPTConfig, KVCache, attention,
                         flops_per_token)


def tiny(**overrides) -> GPTConfig:
    return GPTConfig.from_preset("tiny", **{"vocab_size": 97, **overrides})


def test_gpt2_parameter_count_exact():
    with torch.device("meta"):
        model = GPT(GPTConfig.from_preset("gpt2"))
    assert model.num_params() == 124_439_808


def test_presets_build():
    for name in MODEL_PRESETS:
        config = GPTConfig.from_preset(name, vocab_size=50257)
        assert config.n_embd % config.n_head == 0


@pytest.mark.parametrize("position", ["absolute", "rope"])
def test_forward_shapes_and_initial_loss(position):
    torch.manual_seed(0)
    model = GPT(tiny(position=position))
    idx, targets = torch.randint(0, 97, (2, 3, 20))
    logits, loss = model(idx, targets)
    assert logits.shape == (3, 20, 97)
    # A freshly initialised model predicts nearly uniformly: loss ~ ln(V).
    assert abs(loss.item() - math.log(97)) < 0.3
    assert model(idx)[1] is None


def test_causality():
    """Changing a future token never changes the logits of earlier positions."""
    torch.manual_seed(0)
    model = GPT(tiny()).eval()
    idx = torch.randint(0, 97, (1, 16))
    changed = idx.clone()
    changed[0, 10] = (idx[0, 10] + 1) % 97
    a, b = model(idx)[0], model(changed)[0]
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_vocab_padding_keeps_outputs():
    torch.manual_seed(0)
    plain = GPT(tiny())
    padded = GPT(tiny(vocab_multiple=64))
    assert padded.wte.weight.shape[0] == 128
    with torch.no_grad():
        state = plain.state_dict()
        for name, tensor in padded.state_dict().items():
            if name in ("wte.weight", "lm_head.weight"):
                tensor[:97] = state[name]
                tensor[97:] = 5.0  # padding rows: whatever they hold must not leak into outputs
            else:
                tensor.copy_(state[name])
    idx = torch.randint(0, 97, (2, 12))
    (la, lossa), (lb, lossb) = plain(idx, idx), padded(idx, idx)
    assert lb.shape[-1] == 97
    torch.testing.assert_close(la, lb)
    torch.testing.assert_close(lossa, lossb)


def test_init_std_and_weight_tying():
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=1000, n_layer=8, n_head=4, n_embd=256, block_size=32)
    model = GPT(config)
    assert model.lm_head.weight is model.wte.weight
    assert abs(model.h[0].mlp.c_fc.weight.std().item() - 0.02) < 0.002
    assert abs(model.h[0].mlp.c_proj.weight.std().item() - 0.02 / math.sqrt(16)) < 0.0005


@pytest.mark.parametrize("overrides,field", [
    (dict(n_embd=100, n_head=3), "n_embd=100 is not divisible by n_head=3"),
    (dict(n_layer=0), "n_layer must be a positive integer"),
    (dict(block_size=-4), "block_size must be a positive integer"),
    (dict(position="alibi"), "position must be 'absolute' or 'rope'"),
    (dict(dropout=1.5), "dropout"),
    (dict(activation="swiglu"), "activation must be one of 'gelu', 'relu2'"),
    (dict(logit_softcap=-1.0), "logit_softcap must be 0 .off. or positive"),
])
def test_bad_config(overrides, field):
    with pytest.raises(ConfigError, match=field):
        tiny(**overrides)


def test_unknown_preset_and_field():
    with pytest.raises(ConfigError, match="unknown model preset 'gpt5'"):
        GPTConfig.from_preset("gpt5")
    with pytest.raises(ConfigError, match="unknown GPTConfig field"):
        GPTConfig.from_dict({"n_layers": 3})


def test_input_longer_than_context():
    model = GPT(tiny())
    with pytest.raises(ConfigError, match="longer than the model's context block_size=64"):
        model(torch.zeros(1, 65, dtype=torch.long))


# The speedrun recipe's architecture (nbgpt.run_config), with its zero-initialised matrices made random, as
# after training: otherwise the head's zero logits would make any two computations agree.
SPEEDRUN = dict(position="rope", activation="relu2", qk_norm=True, zero_init_proj=True, tie_embeddings=False,
                logit_softcap=30.0)


def trained_like(model: GPT) -> GPT:
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2 and not p.any():
                p.normal_(std=0.02)
    return model


@pytest.mark.parametrize("architecture", [dict(position="absolute"), dict(position="rope"), SPEEDRUN])
def test_kv_cache_matches_full_forward(architecture):
    torch.manual_seed(0)
    model = trained_like(GPT(tiny(**architecture))).eval()
    idx = torch.randint(0, 97, (2, 30))
    full = model(idx)[0]
    cache = KVCache(model.config, 2, 30, "cpu", torch.float32)
    with torch.no_grad():
        parts = [model(idx[:, :12], cache=cache)[0]]
        parts += [model(idx[:, t:t + 1], cache=cache)[0] for t in range(12, 20)]
        parts += [model(idx[:, 20:], cache=cache)[0]]  # multi-token step after a prefix
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-4, rtol=0)


@pytest.mark.parametrize("architecture", [dict(position="absolute"), dict(position="rope"), SPEEDRUN])
def test_left_padded_rows_match_unpadded(architecture):
    torch.manual_seed(0)
    model = trained_like(GPT(tiny(**architecture))).eval()
    short = torch.randint(0, 97, (1, 5))
    long = torch.randint(0, 97, (1, 9))
    batch = torch.cat([torch.cat([torch.full((1, 4), 96), short], 1), long])
    cache = KVCache(model.config, 2, 12, "cpu", torch.float32, pad=torch.tensor([4, 0]))
    with torch.no_grad():
        logits = model(batch, cache=cache)[0]
        alone = model(short)[0]
    torch.testing.assert_close(logits[0, 4:], alone[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(logits[1], model(long)[0][0], atol=1e-4, rtol=0)


def test_relu2_is_relu_squared_and_gelu_is_gpt2s():
    x = torch.linspace(-3, 3, 13)
    relu2, gelu = GPT(tiny(activation="relu2")).h[0].mlp.activation, GPT(tiny()).h[0].mlp.activation
    torch.testing.assert_close(relu2(x), torch.where(x > 0, x * x, torch.zeros_like(x)))
    tanh_gelu = 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    torch.testing.assert_close(gelu(x), tanh_gelu)


def test_zero_init_proj_makes_every_block_the_identity():
    torch.manual_seed(0)
    model = GPT(tiny(zero_init_proj=True, n_layer=3))
    x = torch.randn(2, 10, 64)
    rope = None
    for block in model.h:
        torch.testing.assert_close(block(x, rope, None), x, atol=0, rtol=0)
        assert not block.attn.c_proj.weight.any() and not block.mlp.c_proj.weight.any()
        assert block.attn.c_attn.weight.std() > 0.01  # only the output projections start at zero
    default = GPT(tiny(n_layer=3)).h[0]
    assert not torch.allclose(default(x, rope, None), x)


def test_untied_head_is_its_own_zero_matrix_and_counted():
    torch.manual_seed(0)
    tied, untied = GPT(tiny()), GPT(tiny(tie_embeddings=False))
    assert tied.lm_head.weight is tied.wte.weight
    assert untied.lm_head.weight is not untied.wte.weight and not untied.lm_head.weight.any()
    assert untied.wte.weight.std() > 0.01
    head = untied.lm_head.weight.numel()
    assert untied.num_params() == tied.num_params() + head
    assert untied.num_params(non_embedding=True) == tied.num_params(non_embedding=True)  # blocks + final LN
    idx = torch.randint(0, 97, (2, 8))
    logits, loss = untied(idx, idx)
    assert not logits.any() and loss.item() == pytest.approx(math.log(97))  # a zero head: uniform at first
    assert untied.state_dict()["lm_head.weight"].data_ptr() != untied.state_dict()["wte.weight"].data_ptr()


def test_logit_softcap_bounds_logits_and_keeps_small_ones():
    torch.manual_seed(0)
    plain, capped = GPT(tiny()), GPT(tiny(logit_softcap=5.0))
    capped.load_state_dict(plain.state_dict())
    with torch.no_grad():
        for model in (plain, capped):
            model.wte.weight.mul_(30)  # large tied-head logits
    idx = torch.randint(0, 97, (2, 8))
    raw, soft = plain(idx)[0], capped(idx)[0]
    assert raw.abs().max() > 20 and soft.abs().max() <= 5.0
    torch.testing.assert_close(soft, 5.0 * torch.tanh(raw / 5.0), atol=1e-4, rtol=1e-4)
    x = torch.randn(3, 64) * 1e-3  # near zero the cap is the identity
    torch.testing.assert_close(capped.head(x), plain.head(x), atol=1e-6, rtol=1e-3)


@pytest.mark.parametrize("qk_norm", [True, False])
def test_qk_norm_makes_attention_blind_to_the_scale_of_q_and_k(qk_norm):
    """QK-norm gives every query and key length √D, so a logit stays within ±√D however large the q/k
    weights grow: scaling them 1000× changes nothing. Without it, the softmax saturates."""
    torch.manual_seed(0)
    model = trained_like(GPT(tiny(qk_norm=qk_norm, position="rope"))).eval()
    idx = torch.randint(0, 97, (2, 16))
    before = model(idx)[0]
    with torch.no_grad():
        for block in model.h:
            block.attn.c_attn.weight[:128].mul_(1000)  # the q and k rows of (q, k, v), C = 64 each
            block.attn.c_attn.bias[:128].mul_(1000)
    after = model(idx)[0]
    assert torch.allclose(before, after, atol=1e-4) == qk_norm


def test_bigram_baseline_learns():
    torch.manual_seed(0)
    model = BigramLM(5)
    data = torch.tensor([[0, 1, 2, 3, 4] * 6])
    assert abs(model(data[:, :-1], data[:, 1:])[1].item() - math.log(5)) < 1e-6
    opt = build_adamw(model, 0.0, 0.3, (0.9, 0.95), "cpu")
    for _ in range(100):
        loss = model(data[:, :-1], data[:, 1:])[1]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05  # the sequence is fully determined by the previous token


def test_flops_per_token_gpt2():
    config = GPTConfig.from_preset("gpt2")
    with torch.device("meta"):
        model = GPT(config)
    non_embedding = model.num_params(non_embedding=True)
    expected = 6 * (non_embedding + 50257 * 768) + 12 * 12 * 768 * 1024
    assert flops_per_token(config) == expected
    assert flops_per_token(config, non_embedding_params=non_embedding) == expected


def test_low_rank_bigram_for_large_vocabularies():
    model = BigramLM(50257, rank=64)
    assert model.num_params() == 50257 * 64 + 64 * 50257 + 50257
    logits, loss = model(torch.tensor([[1, 2, 3]]), torch.tensor([[2, 3, 4]]))
    assert logits.shape == (1, 3, 50257) and abs(loss.item() - math.log(50257)) < 0.01


def test_keep_logits_computes_only_the_last_positions():
    torch.manual_seed(0)
    model = GPT(tiny()).eval()
    idx = torch.randint(0, 97, (2, 12))
    full = model(idx)[0]
    torch.testing.assert_close(model(idx, keep_logits=3)[0], full[:, -3:])


@pytest.mark.parametrize("T", [16, 64, 300])  # 300: past the explicit path's limit, the fused kernel runs
def test_attention_paths_agree(T):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, T, 16, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    ours = attention(q, k, v)
    ours.float().pow(2).sum().backward()
    ours_grads = [t.grad.float() for t in (q, k, v)]
    exact_inputs = [t.detach().double().requires_grad_() for t in (q, k, v)]
    exact = torch.nn.functional.scaled_dot_product_attention(*exact_inputs, is_causal=True)
    exact.pow(2).sum().backward()
    torch.testing.assert_close(ours.double(), exact, atol=0.03, rtol=0.03)
    for got, want in zip(ours_grads, exact_inputs):
        assert (got.double() - want.grad).norm() < 0.03 * want.grad.norm()
    with torch.no_grad():  # token t never sees a later token: changing the last position moves only the last row
        changed = v.detach().clone()
        changed[:, :, -1] += 1
        moved = (attention(q, k, changed) != attention(q, k, v)).any(-1)
    assert moved[..., -1].all() and not moved[..., :-1].any()


def test_masked_attention_with_a_query_that_sees_nothing():
    torch.manual_seed(0)
    q = torch.randn(2, 2, 3, 8, dtype=torch.bfloat16)
    k, v = (torch.randn(2, 2, 5, 8, dtype=torch.bfloat16) for _ in range(2))
    mask = torch.ones(2, 1, 3, 5, dtype=torch.bool).tril(diagonal=2)
    mask[1, :, 0] = False  # row 1's first query is left padding: no key is visible to it
    mask[1, :, 1:, 0] = False
    ours = attention(q, k, v, mask)
    assert torch.isfinite(ours).all()
    exact = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask)
    torch.testing.assert_close(ours[0].double(), exact[0], atol=0.03, rtol=0.03)
    torch.testing.assert_close(ours[1, :, 1:].double(), exact[1, :, 1:], atol=0.03, rtol=0.03)
    decode = attention(q[:, :, -1:], k, v)  # one query with no mask sees every key
    torch.testing.assert_close(decode.double(), torch.nn.functional.scaled_dot_product_attention(
        q[:, :, -1:].double(), k.double(), v.double()), atol=0.03, rtol=0.03)


@pytest.mark.parametrize("name,paper", [("gpt3-small", 125e6), ("gpt3-medium", 350e6), ("gpt3-large", 760e6),
                                        ("gpt3-xl", 1.3e9), ("gpt3-2.7b", 2.7e9), ("gpt3-6.7b", 6.7e9)])
def test_gpt3_presets_have_the_papers_sizes(name, paper):
    """GPT-3's Table 2.1 names each model by its parameter count; the presets' counts (GPT-2's BPE, context
    2048, tied embeddings) come within 3 % of them, with the table's head size of 64, 96 or 128 (80 at 2.7B)."""
    config = GPTConfig.from_preset(name, vocab_size=50257)
    with torch.device("meta"):
        model = GPT(config)
    assert model.num_params() == pytest.approx(paper, rel=0.03)
    assert config.block_size == 2048
    head_size = {"gpt3-small": 64, "gpt3-medium": 64, "gpt3-large": 96, "gpt3-xl": 128, "gpt3-2.7b": 80,
                 "gpt3-6.7b": 128}
    assert config.head_size == head_size[name]
