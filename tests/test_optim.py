import os
import platform
import subprocess
import sys

import pytest
import torch

from nbgpt.device import choose_precision, fast_dtype
from nbgpt.model import GPT, GPTConfig
from nbgpt.optim import Muon, build_adamw, build_muon, orthogonalise
from nbgpt.presets import CPU_BATCH, cpu_settings, get_preset

CPU = torch.device("cpu")


def tiny_gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=50))


def test_adamw_decays_only_matrices():
    model = tiny_gpt()
    decay, no_decay = build_adamw(model, 0.1, 1e-3, (0.9, 0.95), "cpu").param_groups
    assert decay["weight_decay"] == 0.1 and all(p.dim() >= 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.dim() < 2 for p in no_decay["params"])
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == model.num_params()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(48, 160), (160, 48)])
def test_orthogonalise_pushes_singular_values_toward_one(dtype, shape):
    g = torch.Generator().manual_seed(1)
    # a badly conditioned matrix: singular values spread over two orders of magnitude
    u, _ = torch.linalg.qr(torch.randn(shape[0], shape[0], generator=g))
    v, _ = torch.linalg.qr(torch.randn(shape[1], shape[1], generator=g))
    s = torch.logspace(0, -2, min(shape))
    m = u[:, : len(s)] @ torch.diag(s) @ v[:, : len(s)].T
    out = orthogonalise(m, dtype=dtype)
    assert out.dtype == dtype and out.shape == m.shape
    sv = torch.linalg.svdvals(out.float())
    assert sv.min() > 0.5 and sv.max() < 1.3  # ~1 everywhere, not 1e-2 .. 1 as before
    cos = (out.float() * m).sum() / (out.float().norm() * m.norm())
    assert cos > 0.3  # still a descent direction: aligned with the input


def test_matches_torch_muon_and_loads_its_state():
    """One step of nbgpt's Muon (bf16 orthogonalisation) equals torch.optim.Muon's, also after loading its
    state (checkpoints written before nbgpt had its own Muon resume)."""
    g = torch.Generator().manual_seed(2)
    weights = [torch.randn(24, 40, generator=g), torch.randn(40, 24, generator=g)]
    grads = [[torch.randn(w.shape, generator=g) for w in weights] for _ in range(2)]
    ours = [w.clone().requires_grad_() for w in weights]
    theirs = [w.clone().requires_grad_() for w in weights]
    reference = torch.optim.Muon(theirs, lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    for p, gr in zip(theirs, grads[0]):
        p.grad = gr.clone()
    reference.step()
    with torch.no_grad():
        for o, t in zip(ours, theirs):
            o.copy_(t)
    mine = Muon(ours, lr=0.02, weight_decay=0.1, ns_dtype=torch.bfloat16)
    mine.load_state_dict(reference.state_dict())
    for opt, params in ((reference, theirs), (mine, ours)):
        for p, gr in zip(params, grads[1]):
            p.grad = gr.clone()
        opt.step()
    for o, t in zip(ours, theirs):
        torch.testing.assert_close(o, t, atol=5e-3, rtol=0)  # bf16 rounding; a step moves ~3e-2


@pytest.mark.parametrize("ns_dtype", [torch.float32, torch.bfloat16])
def test_muon_learns_in_either_dtype(ns_dtype):
    model = tiny_gpt()
    data = torch.arange(17).repeat(4, 1) % 50  # (4, 17) a fixed pattern
    muon = Muon([p for p in model.h.parameters() if p.dim() == 2], lr=0.02, weight_decay=0.0, ns_dtype=ns_dtype)
    adamw = build_adamw([p for n, p in model.named_parameters() if not (n.startswith("h.") and p.dim() == 2)],
                        0.0, 0.02, (0.9, 0.95), "cpu")
    first = None
    for _ in range(40):
        loss = model(data[:, :-1], data[:, 1:])[1]
        first = first or loss.item()
        for o in (muon, adamw):
            o.zero_grad()
        loss.backward()
        for o in (muon, adamw):
            o.step()
    assert loss.item() < 0.1 * first


def test_muon_rejects_vectors():
    with pytest.raises(ValueError, match="2-D weights only, got a parameter of shape \\(8,\\); give vectors"):
        Muon([torch.zeros(8, requires_grad=True)])


def test_orthogonalisation_dtype_follows_the_device_choice():
    muon, _ = build_muon(tiny_gpt(), 0.1, 1e-3, (0.9, 0.95), "cpu")
    assert muon.ns_dtype == fast_dtype(CPU)
    assert (muon.ns_dtype == torch.bfloat16) == (choose_precision(CPU, "auto") == "bf16")


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="the AVX2 emulation is x86-only")
def test_avx2_cpu_measures_slow_bf16_and_stays_fp32():
    """On a CPU without native bf16 (emulated with the same variables users can set on an AVX-512 machine)
    the measured bf16 matmul is slow, so "auto" and Muon's orthogonalisation use fp32, and forcing bf16 warns."""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    script = ("import torch; from nbgpt.device import choose_precision, cpu_matmul_speedup\n"
              "from nbgpt.optim import build_muon; from nbgpt.model import GPT, GPTConfig\n"
              "cpu = torch.device('cpu')\n"
              "muon, _ = build_muon(GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=4, vocab_size=5)),"
              " 0.1, 1e-3, (0.9, 0.95), 'cpu')\n"
              "from nbgpt.presets import get_preset; demo = get_preset('cpu-demo')\n"
              "from nbgpt.device import peak_flops\n"
              "print(cpu_matmul_speedup() < 1.0, choose_precision(cpu, 'auto'), muon.ns_dtype,"
              " choose_precision(cpu, 'bf16'), demo['precision'], demo['micro_batch'],"
              " peak_flops(cpu, 'bf16') == peak_flops(cpu, 'fp32'))")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    # an explicit choice still wins, with a warning that says how slow it is; the demo recipe trains in fp32
    # with its fp32 batch
    # MFU compares with the fp32 peak: an emulated bf16 matmul is no peak
    assert out.stdout.split() == ["True", "fp32", "torch.float32", "bf16", "fp32", str(CPU_BATCH["fp32"]), "True"]
    assert "ConfigWarning: precision='bf16' runs this CPU's matmuls at" in out.stderr
    assert "precision='auto' picks fp32 here" in out.stderr


def test_cpu_demo_recipe_follows_the_precision():
    demo = get_preset("cpu-demo")
    assert demo["precision"] == choose_precision(CPU, "auto")
    assert demo["micro_batch"] == CPU_BATCH[demo["precision"]] and demo["total_batch_tokens"] == demo["micro_batch"] * 64
    assert cpu_settings("fp32") == dict(precision="fp32", micro_batch=CPU_BATCH["fp32"],
                                      total_batch_tokens=CPU_BATCH["fp32"] * 64)
    assert cpu_settings("bf16")["micro_batch"] == CPU_BATCH["bf16"] != CPU_BATCH["fp32"]
