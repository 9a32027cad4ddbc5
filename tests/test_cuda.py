"""The CUDA paths on a real GPU. `make gpu-check` runs these first; without a GPU they skip and say why.

test_train.py checks each path through its CPU analogue; these check what only a GPU has: TF32 and bf16 on
tensor cores, fp16 with a GradScaler, torch.compile beside evaluation, HellaSwag and sampling, fused AdamW,
the fused attention kernels, pinned batches, NCCL, and parity with transformers. Each takes seconds.
"""

import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from conftest import prepared_works, tiny_train_config
from nbgpt.checkpoint import load_latest
from nbgpt.metrics import read_metrics
from nbgpt.train import Trainer

pytestmark = pytest.mark.cuda
FIXTURE = Path(__file__).resolve().parent / "data" / "hellaswag_fixture.jsonl"


def cuda_config(data_dir, out_dir, **overrides):
    return tiny_train_config(data_dir, out_dir, device="cuda", **overrides)


def finite_losses(run_dir) -> list[float]:
    losses = [r["loss"] for r in read_metrics(run_dir, "train")]
    assert losses and all(torch.isfinite(torch.tensor(losses))), losses
    return losses


@pytest.fixture(scope="module")
def gpt2_data(tmp_path_factory, shakespeare_works):
    """Two works in GPT-2 tokens: HellaSwag and sampling need the BPE tokenizer."""
    return prepared_works(tmp_path_factory, shakespeare_works[:2], "gpt2")


def test_bf16_autocast_with_tf32_learns(char_data, tmp_path):
    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip(f"{torch.cuda.get_device_name()} has no native bf16 (compute capability < 8.0)")
    trainer = Trainer(cuda_config(char_data, tmp_path / "r", precision="auto", max_steps=30, eval_interval=30))
    assert trainer.precision == "bf16" and not trainer.scaler.is_enabled()
    # TF32: any matmul left in fp32 (precision='fp32', or one autocast keeps in fp32) runs on the tensor cores
    assert torch.get_float32_matmul_precision() == "high" and torch.backends.cudnn.allow_tf32
    trainer.fit()
    trainer.close()
    losses = finite_losses(tmp_path / "r")
    assert losses[-1] < losses[0] - 0.5


def test_fp16_with_grad_scaler_stays_finite_and_learns(char_data, tmp_path):
    trainer = Trainer(cuda_config(char_data, tmp_path / "r", precision="fp16", max_steps=30, eval_interval=30))
    assert trainer.scaler.is_enabled()
    trainer.fit()
    trainer.close()
    losses = finite_losses(tmp_path / "r")
    records = read_metrics(tmp_path / "r", "train")
    # the scaler starts high and halves on overflow: a few skipped steps at the start are how it calibrates
    assert sum(r["skipped"] for r in records) <= 5 and records[-1]["grad_scale"] > 0
    assert losses[-1] < losses[0] - 0.5


def test_compiled_training_with_validation_hellaswag_and_sampling(gpt2_data, tmp_path):
    """The combination build-nanogpt had to switch off: compile beside evaluation and sampling."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    config = cuda_config(gpt2_data, tmp_path / "r", precision="auto", compile=True, max_steps=10, eval_interval=5,
                         hellaswag_interval=5, hellaswag_path=str(FIXTURE), sample_interval=5,
                         sample_prompt="ROMEO:", sample_tokens=16, max_lr=1e-3)
    trainer = Trainer(config)
    trainer.fit()
    trainer.close()
    finite_losses(tmp_path / "r")
    steps = {kind: [r["step"] for r in read_metrics(tmp_path / "r", kind)] for kind in ("eval", "hellaswag", "sample")}
    assert steps == {"eval": [0, 5, 10], "hellaswag": [5, 10], "sample": [0, 5, 10]}
    assert all(r["count"] == 20 for r in read_metrics(tmp_path / "r", "hellaswag"))
    assert all(r["text"] for r in read_metrics(tmp_path / "r", "sample"))
    # one graph for training, one for no-grad evaluation: evaluations and samples recompile nothing
    assert counters["stats"]["unique_graphs"] <= 2


def test_fused_adamw_and_pinned_batches(char_data, tmp_path):
    trainer = Trainer(cuda_config(char_data, tmp_path / "r"))
    assert all(o.defaults["fused"] for o in trainer.optimizers)
    x, y = trainer.train_loader.next_batch()
    assert x.is_pinned() and y.is_pinned() and x.is_contiguous()
    trainer.fit()
    trainer.close()
    states = [s for o in trainer.optimizers for s in o.state.values()]
    assert states and all(s["exp_avg"].is_cuda for s in states)


def reference_attention(q, k, v, mask):
    q, k, v = q.detach(), k.detach(), v.detach()
    scores = (q.double() @ k.double().transpose(-2, -1)) * q.size(-1) ** -0.5
    return scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v.double()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_attention_runs_on_the_fused_kernels(dtype):
    """Training (causal, no mask) must fit flash attention (the memory-efficient kernel before compute
    capability 8.0, e.g. a T4); cached decoding (a padding mask) the memory-efficient kernel. Under sdpa_kernel
    a fallback to the slow math path raises instead of passing silently."""
    from nbgpt.model import attention

    modern = torch.cuda.get_device_capability()[0] >= 8
    if dtype == torch.bfloat16 and not modern:
        pytest.skip(f"{torch.cuda.get_device_name()} has no native bf16 (compute capability < 8.0)")
    q, k, v = (torch.randn(2, 4, 128, 64, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    causal = torch.ones(128, 128, dtype=torch.bool, device="cuda").tril()
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION if modern else SDPBackend.EFFICIENT_ATTENTION):
        out = attention(q, k, v)
        out.float().square().sum().backward()
    expected = reference_attention(q, k, v, causal)
    assert ((out.double() - expected).norm() / expected.norm()).item() < 1e-2
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))
    visible = causal[-1:].expand(2, 1, 1, 128).clone()
    visible[0, ..., :5] = False  # row 0 is left-padded by 5 tokens
    with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION), torch.no_grad():
        step = attention(q[:, :, -1:], k, v, visible)
    expected = reference_attention(q[:, :, -1:], k, v, visible)
    assert ((step.double() - expected).norm() / expected.norm()).item() < 1e-2


def test_nccl_ddp_two_gpus_match_one(char_data, tmp_path):
    from nbgpt.distributed import launch

    count = torch.cuda.device_count()
    if count < 2:
        pytest.skip(f"NCCL DDP needs at least 2 GPUs; this machine has {count}")
    common = dict(max_steps=2, eval_interval=0, checkpoint_interval=0, total_batch_tokens=8 * 32)
    single = Trainer(cuda_config(char_data, tmp_path / "one", micro_batch=8, **common))
    single.fit()
    single.close()
    lines = []
    launch(cuda_config(char_data, tmp_path / "two", micro_batch=4, **common), nproc=2, echo=lines.append)
    one, two = (load_latest(tmp_path / name / "checkpoints") for name in ("one", "two"))
    assert one["step"] == two["step"] == 2
    for name, tensor in one["model"].items():  # TF32 rounds differently for a batch of 8 and two of 4
        torch.testing.assert_close(tensor, two["model"][name], atol=1e-4, rtol=1e-3)
    assert [state.dtype for state in two["rng"]["cuda_per_rank"]] == [torch.uint8] * 2  # each rank's own GPU's


def test_launcher_warns_while_its_own_process_holds_gpu_memory():
    """In a fresh process (this one's earlier tests may hold memory): 256 MiB held, then freed."""
    script = ("import torch\n"
              "from nbgpt.distributed import held_gpu_memory_warning as warning\n"
              "print(warning())\n"
              "held = torch.empty(256, 2**20, dtype=torch.uint8, device='cuda')\n"
              "print(warning())\n"
              "del held\n"
              "torch.cuda.empty_cache()\n"
              "print(warning())\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    before, held, freed = result.stdout.splitlines()
    assert before == freed == "None", result.stdout + result.stderr
    assert held.startswith("warning: this process holds 0.25 GiB of GPU memory") and "empty_cache()" in held


def test_speedup_table_gives_back_all_gpu_memory(char_data, tmp_path):
    """notebook 03's table, at a micro-batch far above the one it times, in a fresh process: nothing stays
    reserved for the training processes to miss."""
    config = cuda_config(char_data, tmp_path / "r", micro_batch=64)
    script = ("import json, sys, torch\n"
              "from nbgpt.memory import speedup_cell_for\n"
              "from nbgpt.speedups import speedup_table\n"
              "from nbgpt.run_config import TrainConfig\n"
              "config = TrainConfig.from_dict(json.loads(sys.argv[1]))\n"
              "rows = speedup_table(config, speedup_cell_for(config))\n"
              "print(len(rows), torch.cuda.max_memory_allocated() > 0, torch.cuda.memory_reserved())\n")
    result = subprocess.run([sys.executable, "-c", script, json.dumps(asdict(config))], capture_output=True,
                            text=True, timeout=300)
    assert result.stdout.split() == ["6", "True", "0"], result.stdout + result.stderr[-3000:]


def test_resume_restores_this_ranks_own_cuda_generator(char_data, tmp_path):
    common = dict(max_steps=6, checkpoint_interval=3, eval_interval=0, dropout=0.1)
    Trainer(cuda_config(char_data, tmp_path / "r", **common)).fit(until=3)
    saved = load_latest(tmp_path / "r" / "checkpoints")["rng"]["cuda_per_rank"]
    torch.cuda.manual_seed_all(12345)  # another stream, which the resume must replace
    resumed = Trainer(cuda_config(char_data, tmp_path / "r", **common))
    assert resumed.step == 3 and torch.equal(torch.cuda.get_rng_state(resumed.device), saved[0])


def test_parity_with_transformers_on_cuda(tmp_path):
    """Same weights, same logits and the same greedy tokens as transformers on the GPU, in full fp32."""
    transformers = pytest.importorskip("transformers")
    from nbgpt.generate import Generator, SamplingConfig
    from nbgpt.model_files import load_hf
    from nbgpt.tokenizer import CharTokenizer

    torch.manual_seed(3)
    config = transformers.GPT2Config(vocab_size=300, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                                     bos_token_id=299, eos_token_id=299)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "hf")
    reference = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").cuda().eval()
    ours = load_hf(tmp_path / "hf").cuda().eval()
    prompt = torch.randint(0, 299, (1, 7), device="cuda")
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # TF32 (set by any Trainer) would blur a 1e-4 comparison
    try:
        with torch.no_grad():
            difference = (ours(prompt)[0] - reference(prompt).logits).abs().max().item()
        expected = reference.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                      max_new_tokens=30, min_new_tokens=30, pad_token_id=299)
        char = CharTokenizer([chr(0x100 + i) for i in range(299)])  # 299 symbols + eot = 300 ids
        produced = Generator(ours, char, precision="fp32").generate_ids(
            [prompt[0].tolist()], SamplingConfig(max_new_tokens=30, temperature=0.0, stop_at_eot=False))[0]
    finally:
        torch.set_float32_matmul_precision(previous)
    assert difference <= 1e-4
    assert produced == expected[0, 7:].tolist()
