"""GPT-2 124M-shape training throughput on the CPU: tokens/s and MFU per micro-step and per full step.

A micro-step is forward + backward under the chosen precision (what gradient accumulation repeats); a full
step adds gradient clipping and the fused AdamW update. MFU = achieved FLOP/s (6N + attention, see
nbgpt.model.flops_per_token) over the measured matmul peak of the same precision on this machine.
Usage: python bench/gpt2_throughput.py [--batches 1 2 4] [--precisions fp32 bf16] [--compile] [--repeats 3]
"""

import argparse
import statistics
import time

import torch
from common import cpu_precisions, report

from nbgpt.device import autocast, measured_matmul_flops
from nbgpt.model import GPT, GPTConfig, flops_per_token


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--precisions", nargs="+", default=cpu_precisions())
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile (slow to compile)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=1024)
    args = parser.parse_args()
    torch.manual_seed(0)
    config = GPTConfig.from_preset("gpt2", vocab_multiple=64)
    model = GPT(config)
    optimizer = model.configure_optimizer(0.1, 6e-4, (0.9, 0.95), "cpu")
    device = torch.device("cpu")
    flops = flops_per_token(config, args.seq_len, non_embedding_params=model.num_params(non_embedding=True))
    rows = []
    variants = [(False, p) for p in args.precisions] + ([(True, p) for p in args.precisions] if args.compile else [])
    for compiled, precision in variants:
        forward = torch.compile(model) if compiled else model
        peak = measured_matmul_flops("cpu", precision)
        for batch in args.batches:
            x = torch.randint(0, config.vocab_size, (batch, args.seq_len))

            def micro_step():
                with autocast(device, precision):
                    _, loss = forward(x, x)
                loss.backward()

            def full_step():
                micro_step()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            for name, fn in (("micro-step", micro_step), ("full step", full_step)):
                fn()  # warm-up (and compilation)
                times = []
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    fn()
                    times.append(time.perf_counter() - start)
                optimizer.zero_grad(set_to_none=True)
                seconds = statistics.median(times)
                tokens_per_s = batch * args.seq_len / seconds
                rows.append({"precision": precision, "compile": compiled, "B": batch, "what": name,
                             "seconds": seconds, "tokens_per_s": tokens_per_s,
                             "mfu": tokens_per_s * flops / peak})
    report("gpt2_throughput", rows, {"flops_per_token": flops, "threads": torch.get_num_threads(),
                                     "peak_fp32": measured_matmul_flops("cpu", "fp32"),
                                     "peak_bf16": measured_matmul_flops("cpu", "bf16")})


if __name__ == "__main__":
    main()
