"""HellaSwag: pick the most plausible of 4 endings, scored the way the GPT-2 reproduction scores it.

For each ending the model reads context + " " + ending; the ending's tokens are scored by their
cross-entropy. `acc_norm` picks the ending with the lowest *average* loss per token (longer endings are not
penalised for having more tokens), `acc` the lowest *summed* loss. GPT-2 124M reaches acc_norm 0.2955 on the
10,042 validation examples, GPT-3 124M 0.337; random guessing is 0.25.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from .assets import Asset, fetch
from .knobs import ConfigError
from .device import DTYPES, autocast
from .distributed import DistInfo, all_reduce_sum, claim_root, is_sharded, most_on_any_rank, root_gathered
from .errors import NbgptError
from .model import KVCache
from .tokenizer import Tokenizer

HELLASWAG_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
HELLASWAG_ENV = "NBGPT_HELLASWAG"
VAL_EXAMPLES = 10_042
GPT2_124M_ACC_NORM = 0.2955
GPT3_124M_ACC_NORM = 0.337


class HellaSwagError(NbgptError, ValueError):
    """A malformed HellaSwag file."""


class HellaSwagUnavailable(NbgptError, RuntimeError):
    """No HellaSwag data on this machine and no way to download it."""


@dataclass(frozen=True)
class Example:
    context: str
    endings: tuple[str, str, str, str]
    label: int


def parse_line(line: str, where: str) -> Example:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise HellaSwagError(f"{where}: not JSON ({exc})") from None
    if not isinstance(row, dict):
        raise HellaSwagError(f"{where}: expected a JSON object")
    missing = [k for k in ("ctx", "endings", "label") if k not in row]
    if missing:
        raise HellaSwagError(f"{where}: missing field(s) {missing}")
    endings, label = row["endings"], row["label"]
    if not isinstance(endings, list) or len(endings) != 4 or not all(isinstance(e, str) for e in endings):
        raise HellaSwagError(f"{where}: 'endings' must be a list of 4 strings, got "
                             f"{len(endings) if isinstance(endings, list) else type(endings).__name__}")
    if isinstance(label, str) and label.isdigit():
        label = int(label)
    if not isinstance(label, int) or not 0 <= label < 4:
        raise HellaSwagError(f"{where}: 'label' must be 0..3, got {label!r}")
    if not isinstance(row["ctx"], str) or not row["ctx"]:
        raise HellaSwagError(f"{where}: 'ctx' must be a non-empty string")
    return Example(row["ctx"], tuple(endings), label)


def read_examples(path: str | os.PathLike, limit: int | None = None) -> list[Example]:
    examples = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                examples.append(parse_line(line, f"{path} line {number}"))
                if limit is not None and len(examples) >= limit:
                    break
    if not examples:
        raise HellaSwagError(f"{path} holds no examples")
    return examples


def _check_validation_file(data: bytes, origin: str) -> None:
    """A downloaded file must be the whole validation set, every line a well-formed example."""
    lines = [line for line in data.decode("utf-8").splitlines() if line.strip()]
    if len(lines) != VAL_EXAMPLES:
        raise HellaSwagError(f"{origin} holds {len(lines)} examples, expected {VAL_EXAMPLES}")
    for number, line in enumerate(lines, 1):
        parse_line(line, f"{origin} line {number}")


# A file the user names is used as is: a subset of the validation set is a legitimate quick evaluation.
HELLASWAG_VAL = Asset(name="HellaSwag's validation set", filename="hellaswag_val.jsonl", url=HELLASWAG_URL,
                      env=HELLASWAG_ENV, check=_check_validation_file, error=HellaSwagUnavailable)


def hellaswag_path(path: str | os.PathLike | None = None) -> Path:
    """The validation file: an explicit path, $NBGPT_HELLASWAG, the cache, or a one-time download."""
    return fetch(HELLASWAG_VAL, path)


def load_examples(path: str | os.PathLike | None = None, limit: int | None = None) -> list[Example]:
    return read_examples(hellaswag_path(path), limit)


def load_examples_for(tokenizer: Tokenizer, path: str | os.PathLike | None = None,
                      limit: int | None = None) -> list[Example]:
    """The examples to score a model of this tokenizer on, or HellaSwagUnavailable saying why it cannot be
    scored: HellaSwag is English text in GPT-2 BPE, and another tokenizer's scores would mean nothing."""
    if tokenizer.name != "gpt2":
        raise HellaSwagUnavailable(f"HellaSwag is English text in GPT-2 BPE, and this model uses the "
                                   f"{tokenizer.name} tokenizer: score a model trained on gpt2 tokens")
    return load_examples(path, limit)


# ---------------------------------------------------------------------------------------------- scoring


@dataclass
class Candidate:
    example: int
    ending: int
    tokens: list[int]
    ending_start: int  # index of the ending's first token in `tokens`


def candidates(examples: Sequence[Example], tokenizer: Tokenizer, block_size: int) -> list[Candidate]:
    """Context + ending token rows, 4 per example; the context is cut from the left to fit the model."""
    rows = []
    for i, example in enumerate(examples):
        context = tokenizer.encode(example.context)
        for j, ending in enumerate(example.endings):
            tail = tokenizer.encode(" " + ending)  # the ending continues the sentence after a space
            keep = max(1, block_size - len(tail))
            ctx = context[-keep:]
            tokens = (ctx + tail)[-block_size:]
            rows.append(Candidate(i, j, tokens, max(1, len(tokens) - len(tail))))
    return rows


@torch.no_grad()
def score_candidates(model: torch.nn.Module, rows: Sequence[Candidate], device: torch.device | str = "cpu",
                     precision: str = "fp32", max_batch_tokens: int = 4096, sort: bool = True
                     ) -> list[tuple[float, int]]:
    """(summed ending loss, ending token count) per row, many rows per forward pass.

    Rows are right-padded to the longest in their batch; with causal attention, padding after a row's last
    token cannot change its earlier logits, and the mask keeps it out of the loss. Sorting by length first
    keeps the padding small.
    """
    device = torch.device(device)
    model.eval()
    order = sorted(range(len(rows)), key=lambda r: len(rows[r].tokens)) if sort else list(range(len(rows)))
    results: list[tuple[float, int]] = [(0.0, 0)] * len(rows)
    start = 0
    while start < len(order):
        end = start + 1
        while end < len(order) and (end + 1 - start) * len(rows[order[end]].tokens) <= max_batch_tokens:
            end += 1
        batch = [rows[r] for r in order[start:end]]
        width = max(len(c.tokens) for c in batch)
        tokens = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width - 1)
        for b, c in enumerate(batch):
            tokens[b, : len(c.tokens)] = torch.tensor(c.tokens)
            mask[b, c.ending_start - 1: len(c.tokens) - 1] = 1  # predictions of the ending's tokens
        tokens = tokens.to(device)
        with autocast(device, precision):
            logits, _ = model(tokens)
        losses = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), tokens[:, 1:], reduction="none").cpu()
        sums = (losses * mask).sum(1)
        counts = mask.sum(1)
        for b, r in enumerate(order[start:end]):
            results[r] = (float(sums[b]), int(counts[b]))
        start = end
    return results


HEAD_ROWS = 256  # positions per LM-head slice in score_shared_context
Item = tuple[list[int], list[list[int]]]  # one example as (context ids, the 4 endings' ids)


@torch.no_grad()
def score_shared_context(model: torch.nn.Module, examples: Sequence[Example], tokenizer: Tokenizer,
                         device: torch.device | str = "cpu", precision: str = "fp32", max_batch_tokens: int = 4096
                         ) -> list[tuple[float, int]]:
    """Like score_candidates over `candidates(examples)`, but each context is run once, not four times.

    A batch of examples is prefilled into a KV cache (contexts left-padded), every cache row is repeated for
    the 4 endings, and only the ending tokens run through the model: the context, usually most of the
    tokens, costs a quarter. The first ending token is predicted by the context's last position.

    A model sharded with FSDP gathers its weights from every rank in each forward pass, so every rank must
    run as many batches: a rank with fewer than another runs FILLER batches (one token of context and of
    each ending, scores dropped) until it has run as many.
    """
    device = torch.device(device)
    model.eval()
    items = [_fit_to_context(example, tokenizer, model.block_size) for example in examples]
    # Similar lengths side by side: little padding in each batch.
    order = sorted(range(len(items)), key=lambda i: (len(items[i][0]), max(map(len, items[i][1]))))
    batches = list(_shared_context_batches(items, order, max_batch_tokens, model.block_size))
    fillers = 0
    if is_sharded(model):
        claim_root(model)  # before _ending_losses calls the blocks outside forward
        fillers = most_on_any_rank(len(batches), device) - len(batches)
    scores: list[tuple[float, int]] = [(0.0, 0)] * (4 * len(items))
    # One autocast context for every batch: each weight is cast to the low precision once, not per forward.
    # Under FSDP the root's weights are gathered once too: _ending_losses uses them outside forward.
    with autocast(device, precision), root_gathered(model):
        for chosen in batches:
            sums, counts = _ending_losses(model, [items[i] for i in chosen], device, DTYPES[precision])
            for b, index in enumerate(chosen):
                for j in range(4):
                    scores[4 * index + j] = (float(sums[4 * b + j]), int(counts[4 * b + j]))
        for _ in range(fillers):
            _ending_losses(model, [FILLER], device, DTYPES[precision])
    return scores


FILLER: Item = ([0], [[0], [0], [0], [0]])  # the smallest batch there is: a rank's forward passes, nothing scored


def _fit_to_context(example: Example, tokenizer: Tokenizer, block: int) -> Item:
    """(context, 4 endings) token ids that fit the model together: the context loses its start first."""
    endings = [tokenizer.encode(" " + e) for e in example.endings]  # the ending continues after a space
    longest = max(len(e) for e in endings)
    context = tokenizer.encode(example.context)[-max(1, block - longest):]
    return context, [e[: block - len(context)] for e in endings]


def _ending_losses(model: torch.nn.Module, batch: list[Item], device: torch.device,
                   dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed loss and token count of each ending (4N,) for a batch of N (context, 4 endings)."""
    contexts, endings, scored, pad = _pack(batch)
    cache = KVCache(model.config, len(batch), contexts.size(1) + endings.size(1), device, dtype, pad=pad)
    last = model.hidden_states(contexts.to(device), cache=cache)[:, -1:]  # (N, 1, C): predicts ending[0]
    cache.repeat_rows(4)
    rest = model.hidden_states(endings.to(device), cache=cache)  # (4N, Le, C): position j predicts ending[j+1]
    states = torch.cat([last.repeat_interleave(4, dim=0), rest[:, :-1]], dim=1)  # position j predicts ending[j]
    # The LM head only where a loss is scored, (M, C) -> (M, V), in slices so that the fp32 logits stay
    # small (M × 50257 floats would be hundreds of MB for one batch).
    targets = endings[scored].to(device)  # (M,)
    losses = torch.cat([F.cross_entropy(model.head(rows).float(), row_targets, reduction="none")
                        for rows, row_targets in zip(states[scored.to(device)].split(HEAD_ROWS),
                                                     targets.split(HEAD_ROWS))]).cpu()  # (M,)
    counts = scored.sum(1)  # (4N,)
    owner = torch.arange(4 * len(batch)).repeat_interleave(counts)  # (M,) the ending each loss belongs to
    return torch.zeros(4 * len(batch)).index_add_(0, owner, losses), counts


def _pack(batch: list[Item]):
    """Contexts left-padded (N, Lc), endings right-padded (4N, Le), which ending tokens are real (4N, Le), and
    each context's left padding (N,)."""
    context_width = max(len(c) for c, _ in batch)
    ending_width = max(len(e) for _, endings in batch for e in endings)
    contexts = torch.zeros(len(batch), context_width, dtype=torch.long)
    endings = torch.zeros(4 * len(batch), ending_width, dtype=torch.long)
    scored = torch.zeros(4 * len(batch), ending_width, dtype=torch.bool)
    for b, (context, four) in enumerate(batch):
        contexts[b, context_width - len(context):] = torch.tensor(context)
        for j, ending in enumerate(four):
            endings[4 * b + j, : len(ending)] = torch.tensor(ending)
            scored[4 * b + j, : len(ending)] = True
    return contexts, endings, scored, torch.tensor([context_width - len(c) for c, _ in batch])


def _shared_context_batches(items: list, order: list[int], max_batch_tokens: int, block: int):
    """Consecutive runs of `order` whose padded contexts + 4 endings fit max_batch_tokens, and whose shared
    cache (longest context + longest ending slots) fits the model's context."""
    start = 0
    while start < len(order):
        end = start + 1
        while end < len(order):
            context_width = max(len(items[i][0]) for i in order[start:end + 1])
            ending_width = max(len(e) for i in order[start:end + 1] for e in items[i][1])
            if (end + 1 - start) * (context_width + 4 * ending_width) > max_batch_tokens or \
                    context_width + ending_width > block:
                break
            end += 1
        yield order[start:end]
        start = end


def evaluate_hellaswag(model: torch.nn.Module, tokenizer: Tokenizer, examples: Sequence[Example],
                       device: torch.device | str = "cpu", precision: str = "fp32", max_batch_tokens: int = 4096,
                       dist_info: DistInfo | None = None, per_example: bool = False) -> dict:
    """acc_norm, acc and count over `examples`; under DDP each rank scores every world_size-th example and
    the counts are summed. By default many examples share a forward pass and each context runs once
    (score_shared_context); `per_example` scores one example's 4 full rows per forward, as the reference does."""
    dist_info = dist_info or DistInfo()
    mine = [e for i, e in enumerate(examples) if i % dist_info.world_size == dist_info.rank]
    if per_example and is_sharded(model):  # its batches per rank are not counted alike (score_shared_context's are)
        raise ConfigError("per_example scoring needs a model that is not sharded; use the shared-context scorer")
    if per_example:
        rows = candidates(mine, tokenizer, model.block_size)
        scores = []
        for i in range(0, len(rows), 4):
            scores += score_candidates(model, rows[i:i + 4], device, precision, max_batch_tokens, sort=False)
    else:
        scores = score_shared_context(model, mine, tokenizer, device, precision, max_batch_tokens)
    predictions = predict(mine, scores)
    correct_norm = sum(p["pred_norm"] == e.label for p, e in zip(predictions, mine))
    correct = sum(p["pred"] == e.label for p, e in zip(predictions, mine))
    totals = torch.tensor([correct_norm, correct, len(mine)], dtype=torch.float64, device=torch.device(device))
    if dist_info.enabled and torch.device(device).type == "cpu":
        totals = totals.float()  # gloo reduces float32
    totals = all_reduce_sum(totals, dist_info).tolist()
    count = int(totals[2])
    return {"acc_norm": totals[0] / count, "acc": totals[1] / count, "count": count,
            "correct_norm": int(totals[0]), "correct": int(totals[1])}


def predict(examples: Sequence[Example], scores: Sequence[tuple[float, int]]) -> list[dict]:
    """Per example: pred (lowest summed loss), pred_norm (lowest mean loss) and the 4 mean losses."""
    out = []
    for i in range(len(examples)):
        four = scores[4 * i: 4 * i + 4]
        means = [s / max(n, 1) for s, n in four]
        sums = [s for s, _ in four]
        out.append({"pred": min(range(4), key=sums.__getitem__), "pred_norm": min(range(4), key=means.__getitem__),
                    "mean_losses": means})
    return out

