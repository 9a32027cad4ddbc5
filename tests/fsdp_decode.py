"""Run by torchrun (tests/test_distributed.py): a tiny GPT sharded over the ranks samples and scores HellaSwag
through its shards; rank 0 writes what every rank got to the JSON file named first, with the forward passes
each rank's first block ran and the real HellaSwag batches it had (FILLER batches make up the difference)."""

import gc
import json
import sys

import torch

from nbgpt.distributed import all_gather_objects, init_distributed, shard, shutdown
from nbgpt.generate import Generator, SamplingConfig
from nbgpt.hellaswag import _fit_to_context, _shared_context_batches, evaluate_hellaswag, read_examples
from nbgpt.model import GPT, GPTConfig
from nbgpt.tokenizer import GPT2Tokenizer

out, fixture, limit, *budgets = sys.argv[1:]
info = init_distributed("cpu")
torch.manual_seed(0)  # every rank builds the same weights, then keeps its shard of them
model = GPT(GPTConfig(vocab_size=50257, block_size=64, n_layer=2, n_head=2, n_embd=32))
shard(model, "fp32")
tokenizer, examples = GPT2Tokenizer(), read_examples(fixture, int(limit))
forwards = []
model.h[0].register_forward_pre_hook(lambda module, args: forwards.append(1))
result = {"hellaswag": {}, "passes": {}, "batches": {}}
for budget in map(int, budgets):
    forwards.clear()
    result["hellaswag"][budget] = evaluate_hellaswag(model, tokenizer, examples, max_batch_tokens=budget,
                                                     dist_info=info)
    result["passes"][budget] = all_gather_objects(len(forwards), info)
    mine = [_fit_to_context(e, tokenizer, 64) for i, e in enumerate(examples) if i % info.world_size == info.rank]
    order = sorted(range(len(mine)), key=lambda i: (len(mine[i][0]), max(map(len, mine[i][1]))))
    result["batches"][budget] = all_gather_objects(len(list(_shared_context_batches(mine, order, budget, 64))), info)
generator = Generator(model, tokenizer, device="cpu", precision="fp32")
samples = [generator.generate(["The", "Once upon a time"], SamplingConfig(max_new_tokens=24, top_k=50, seed=seed,
                                                                         num_return_sequences=2))
           for seed in (1, 2)]
result["samples"] = all_gather_objects(samples, info)
result["training"] = all_gather_objects(model.training, info)
try:
    evaluate_hellaswag(model, tokenizer, examples, dist_info=info, per_example=True)
except ValueError as refusal:
    result["per_example"] = all_gather_objects(str(refusal), info)
if info.is_main:
    with open(out, "w") as f:
        json.dump(result, f)
torch.distributed.barrier()  # no rank leaves the group while another still uses it
shutdown(info)
del model, generator  # the sharded model's device mesh freed before the interpreter's exit (as tests/train_each.py)
gc.collect()
