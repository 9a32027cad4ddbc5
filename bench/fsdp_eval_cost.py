"""What mid-training samples and HellaSwag cost under FSDP against DDP, on 2 gloo processes of this CPU.

Under DDP rank 0 samples alone from a snapshot of its whole model, and each rank scores its share of the
HellaSwag examples with its whole model. Under FSDP (nbgpt.distributed) every rank decodes through its shard,
gathering each block's weights for every token, and each rank scores its share through its shard, a rank
with fewer batches running one-token FILLER batches until it has run as many as the other. Times are rank
0's wall seconds (the step a run waits for), the median of 3 after one warm-up.

    python -m torch.distributed.run --standalone --nproc_per_node=2 bench/fsdp_eval_cost.py
"""

from __future__ import annotations

import common  # noqa: F401  (puts the repository on sys.path)
import torch
import torch.distributed as dist

from common import ROOT, median_time, report
from nbgpt.distributed import init_distributed, shard, shutdown
from nbgpt.generate import Generator, SamplingConfig
from nbgpt.hellaswag import evaluate_hellaswag, read_examples
from nbgpt.model import GPT, GPTConfig
from nbgpt.tokenizer import GPT2Tokenizer

SHAPE = dict(n_layer=4, n_head=4, n_embd=256, block_size=256, vocab_size=50257)
FIXTURE = ROOT / "tests" / "data" / "hellaswag_fixture.jsonl"
TOKENS = 64  # per sample
# (examples, max_batch_tokens): the fixture's 20 in one batch per rank; 13 one per batch (7 and 6 batches: a filler)
SCORING = [(20, 4096), (13, 100)]


def model_for(parallel: str) -> GPT:
    torch.manual_seed(0)  # the same weights on every rank and in both layouts
    model = GPT(GPTConfig(**SHAPE))
    if parallel == "fsdp":
        shard(model, "fp32")
    return model


def rows_for(parallel: str, info, tokenizer) -> list[dict]:
    model = model_for(parallel)
    sampling = SamplingConfig(max_new_tokens=TOKENS, top_k=50, seed=1, stop_at_eot=False)

    def sample() -> None:  # as Trainer.sample: rank 0 alone under ddp, every rank under fsdp
        if parallel == "fsdp" or info.is_main:
            Generator(model, tokenizer, precision="fp32").complete("The", sampling)
        dist.barrier()  # the other rank waits for rank 0 at its next collective

    rows = [{"parallel": parallel, "what": f"sample, {TOKENS} tokens", "seconds": median_time(sample)[0]}]
    for count, budget in SCORING:
        examples = read_examples(FIXTURE, count)
        def score() -> None:
            evaluate_hellaswag(model, tokenizer, examples, max_batch_tokens=budget, dist_info=info)
        rows.append({"parallel": parallel, "what": f"HellaSwag, {count} examples, max_batch_tokens {budget}",
                     "seconds": median_time(score)[0]})
    return rows


def main() -> None:
    info = init_distributed("cpu")
    tokenizer = GPT2Tokenizer()
    rows = rows_for("ddp", info, tokenizer) + rows_for("fsdp", info, tokenizer)
    for row in rows[len(rows) // 2:]:
        base = next(r for r in rows if r["what"] == row["what"])["seconds"]
        row["× ddp"] = round(row["seconds"] / base, 2)
    if info.is_main:
        report("fsdp_eval_cost", rows, {"shape": SHAPE, "ranks": info.world_size})
    dist.barrier()  # no rank leaves the group while another still uses it
    shutdown(info)


if __name__ == "__main__":
    main()
