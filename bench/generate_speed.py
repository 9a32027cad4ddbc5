"""Decode speed on a 124M-shape GPT-2 with random weights, batch 1, 128 new tokens, greedy, CPU.

Compares nbgpt with its KV cache, nbgpt recomputing the full context every step (LM head at the last position
only), build-nanogpt's loop (full context, logits at every position) and transformers' `generate` with its
cache, on identical weights (loaded through nbgpt's HF interop). The methods take turns, one run each per
round, so a machine whose load drifts slows them all alike; each row is the median over the rounds.
Usage: python bench/generate_speed.py [--new-tokens 128] [--prompt-tokens 32] [--repeats 5] [--cached-only]
"""

import argparse
import copy
import statistics
import tempfile
import time

import torch
from common import report

from nbgpt.device import choose_precision
from nbgpt.generate import Generator, SamplingConfig
from nbgpt.model_files import export_hf
from nbgpt.model import GPT, GPTConfig
from nbgpt.tokenizer import GPT2Tokenizer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cached-only", action="store_true",
                        help="skip the two loops without a cache (slow; only the ratios against them need them)")
    parser.add_argument("--bf16", choices=("auto", "yes", "no"), default="auto",
                        help="the bf16 rows: auto runs them where bf16 is measured faster than fp32")
    args = parser.parse_args()
    args.bf16 = args.bf16 == "yes" or (args.bf16 == "auto" and choose_precision(torch.device("cpu")) == "bf16")
    import transformers

    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("gpt2")).eval()
    tokenizer = GPT2Tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        export_hf(model, tmp)
        reference = transformers.GPT2LMHeadModel.from_pretrained(tmp).eval()
    prompt = torch.randint(0, 50256, (1, args.prompt_tokens))
    config = SamplingConfig(max_new_tokens=args.new_tokens, temperature=0.0, stop_at_eot=False)
    outputs = {}

    def nbgpt_run(key: str, use_cache: bool, precision: str):
        generator = Generator(model, tokenizer, use_cache=use_cache, precision=precision)
        return lambda: outputs.__setitem__(key, generator.generate_ids([prompt[0].tolist()], config)[0])

    def naive_run():
        """build-nanogpt's sampling loop: the whole sequence through the model, logits at every position."""
        idx = prompt.clone()
        with torch.no_grad():
            for _ in range(args.new_tokens):
                logits, _ = model(idx)
                idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        outputs["fp32-naive"] = idx[0, args.prompt_tokens:].tolist()

    def hf_run(key: str, hf_model):
        def run():
            with torch.no_grad():
                out = hf_model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                        max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                        pad_token_id=50256, use_cache=True)
            outputs[key] = out[0, args.prompt_tokens:].tolist()
        return run

    runs = [("nbgpt fp32, KV cache", nbgpt_run("fp32", True, "fp32"))]
    if not args.cached_only:
        runs += [("nbgpt fp32, no cache (full recompute)", nbgpt_run("fp32-uncached", False, "fp32")),
                 ("fp32 loop without cache, logits at every position", naive_run)]
    runs += [("transformers fp32 generate, cache", hf_run("hf-fp32", reference))]
    if args.bf16:
        runs += [("nbgpt bf16 weights, KV cache (auto's choice here)", nbgpt_run("bf16", True, "bf16")),
                 ("transformers bf16 generate, cache", hf_run("hf-bf16", copy.deepcopy(reference).to(torch.bfloat16)))]
    times = {name: [] for name, _ in runs}
    for round_ in range(args.repeats + 1):  # round 0 warms every method up and is not counted
        for name, fn in runs:
            start = time.perf_counter()
            fn()
            if round_:
                times[name].append(time.perf_counter() - start)
    rows = [{"method": name, "seconds": statistics.median(t), "tokens_per_s": args.new_tokens / statistics.median(t)}
            for name, t in times.items()]
    speed = {r["method"].split(",")[0] + ("" if "no cache" not in r["method"] else " uncached"): r["tokens_per_s"]
             for r in rows}
    ratios = {"fp32 cached / transformers fp32": speed["nbgpt fp32"] / speed["transformers fp32 generate"]}
    if not args.cached_only:
        ratios["fp32 cached / fp32 uncached"] = speed["nbgpt fp32"] / speed["nbgpt fp32 uncached"]
        ratios["fp32 cached / loop with all logits"] = speed["nbgpt fp32"] / speed["fp32 loop without cache"]
    if args.bf16:
        ratios["bf16 cached / transformers fp32"] = speed["nbgpt bf16 weights"] / speed["transformers fp32 generate"]
        ratios["bf16 cached / transformers bf16"] = speed["nbgpt bf16 weights"] / speed["transformers bf16 generate"]
    fp32_outputs = [tokens for key, tokens in outputs.items() if "bf16" not in key]
    same = all(out == fp32_outputs[0] for out in fp32_outputs)
    report("generate_speed", rows, {"threads": torch.get_num_threads(), "fp32_outputs_identical": same,
                                    "ratios": ratios})
    for name, value in ratios.items():
        print(f"{name}: {value:.2f}x")
    print(f"greedy tokens identical across the fp32 runs: {same}")


if __name__ == "__main__":
    main()
