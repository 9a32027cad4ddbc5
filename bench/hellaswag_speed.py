"""HellaSwag scoring speed: batched (many examples per forward, sorted by length) vs one example per forward.

124M-shape GPT-2 with random weights on the CPU, over the 20-example test fixture repeated. Both ways must
predict identically; the speedup comes from fewer, fuller forward passes.
Usage: python bench/hellaswag_speed.py [--copies 5] [--max-batch-tokens 4096] [--repeats 3]
"""

import argparse

import torch
from common import ROOT, median_time, report

from nbgpt.device import choose_precision
from nbgpt.hellaswag import evaluate_hellaswag, read_examples
from nbgpt.model import GPT, GPTConfig
from nbgpt.tokenizer import GPT2Tokenizer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--copies", type=int, default=5)
    parser.add_argument("--max-batch-tokens", type=int, default=4096)
    parser.add_argument("--precision", default="auto", help="auto: what nbgpt picks for this CPU (measured)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    args.precision = choose_precision(torch.device("cpu"), args.precision)
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("gpt2", vocab_multiple=64)).eval()
    tokenizer = GPT2Tokenizer()
    examples = read_examples(ROOT / "tests" / "data" / "hellaswag_fixture.jsonl") * args.copies
    results = {}
    rows = []
    for name, per_example in (("one example per forward", True), ("batched, length-sorted", False)):
        def run():
            results[name] = evaluate_hellaswag(model, tokenizer, examples, precision=args.precision,
                                               max_batch_tokens=args.max_batch_tokens, per_example=per_example)
        seconds, _ = median_time(run, args.repeats, warmup=1)
        rows.append({"method": name, "seconds": seconds, "examples_per_s": len(examples) / seconds})
    same = results["one example per forward"] == results["batched, length-sorted"]
    speedup = rows[1]["examples_per_s"] / rows[0]["examples_per_s"]
    report("hellaswag_speed", rows, {"examples": len(examples), "precision": args.precision,
                                     "identical_results": same, "speedup": speedup})
    print(f"batched / per-example: {speedup:.2f}x, identical results: {same}")


if __name__ == "__main__":
    main()
