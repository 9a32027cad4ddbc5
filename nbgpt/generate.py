"""Text generation: prefill the prompt once, then decode one token per step from a KV cache.

Without a cache, producing token t means re-running the model over all t previous tokens: O(t²) work per
sequence. The cache keeps every layer's keys and values, so each new token costs one position's worth of
compute. When the context window is full, the window slides: the newest half is re-encoded at positions
0..n so positions stay correct (never "position 1024 of a 1024-position model").
"""

from __future__ import annotations

import codecs
import copy
import mmap
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
import torch.nn as nn

from .knobs import ConfigError, fill_defaults, knob
from .device import DTYPES, autocast, choose_precision
from .model import KVCache
from .distributed import from_rank_zero, is_sharded
from .tokenizer import Tokenizer


@dataclass
class SamplingConfig:
    max_new_tokens: int = knob(200, "tokens to generate after the prompt")
    temperature: float = knob(1.0, "divides the logits: below 1 sharpens the distribution, above 1 flattens "
                                   "it; 0 is greedy (always the most likely token)")
    top_k: int | None = knob(None, "sample only among the k most likely tokens")
    top_p: float | None = knob(None, "nucleus: the smallest set of tokens whose probability reaches p")
    seed: int | None = knob(None, "a seed reproduces a sample exactly")
    stop: Sequence[str] = knob(help="stop (and cut) at the first of these strings", default_factory=tuple)
    stop_at_eot: bool = knob(True, "stop at the end-of-text token")
    num_return_sequences: int = knob(1, "independent samples of the prompt")

    def __post_init__(self) -> None:
        fill_defaults(self)
        # ConfigError: the one-line error of every bad setting, whether a flag, -p or a notebook set it
        if self.max_new_tokens < 0:
            raise ConfigError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0 (0 means greedy: always the most likely token), got "
                              f"{self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(f"top_k must be a positive integer or none, got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1] or none, got {self.top_p}")
        if self.num_return_sequences < 1:
            raise ConfigError(f"num_return_sequences must be >= 1, got {self.num_return_sequences}")
        if isinstance(self.stop, str):
            self.stop = (self.stop,)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def sample_next(logits: torch.Tensor, config: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    """Pick one token per row from logits (N, V) -> (N,)."""
    if config.greedy:
        return logits.argmax(dim=-1)
    logits = logits.float() / config.temperature
    if config.top_k is not None and config.top_k < logits.size(-1):
        kth = torch.topk(logits, config.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if config.top_p is not None and config.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p (the first one always stays).
        drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= config.top_p
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module behind torch.compile and DDP wrappers.

    Decoding changes the sequence length every step; a compiled training graph would recompile for each
    new shape, so generation runs the eager module, which shares the very same weights.
    """
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


class DecodeLinear(nn.Module):
    """A Linear layer for decoding in fp32, its output columns split into `parts` slices, one per CPU thread.

    Decoding one token multiplies each weight matrix by a single vector, which is bound by how fast the
    weights stream from memory. MKL's matrix-vector product (what `addmm` runs for one row) streams at about
    the same rate with one thread as with two, well below what the memory delivers (measured in
    bench/RESULTS.md). A batched product over `parts` slices, each stored contiguously as (in, width), hands
    every thread a slice of its own to stream, which on 2 cores takes the block matrices from ~21 to ~33
    GB/s and the LM head from ~25 to ~43. Each output is still one dot product over the whole input, so the
    result is that of nn.Linear. For bf16 (oneDNN) nn.Linear's own layout is the fast one: bf16 keeps it.
    """

    def __init__(self, linear: nn.Linear, parts: int = 1):
        super().__init__()
        out_features, in_features = linear.weight.shape
        width = -(-out_features // parts)  # columns per slice; the last slice is padded with zero columns
        weight = linear.weight.new_zeros(parts * width, in_features)
        weight[:out_features] = linear.weight.detach()
        # (parts, in, width): slice p holds output columns p*width .. (p+1)*width-1, transposed
        self.weight = nn.Parameter(weight.view(parts, width, in_features).transpose(1, 2).contiguous(),
                                   requires_grad=False)
        self.bias = None
        if linear.bias is not None:
            bias = linear.bias.new_zeros(parts * width)
            bias[:out_features] = linear.bias.detach()
            self.bias = nn.Parameter(bias.view(parts, 1, width), requires_grad=False)  # (parts, 1, width)
        self.out_features = out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts, in_features, width = self.weight.shape
        rows = x.reshape(1, -1, in_features).expand(parts, -1, -1)  # (parts, M, in): every slice sees all rows
        if self.bias is not None:
            out = torch.baddbmm(self.bias, rows, self.weight)  # (parts, M, width)
        else:
            out = torch.bmm(rows, self.weight)
        out = out.transpose(0, 1).reshape(-1, parts * width)[:, : self.out_features]  # (M, out); a view if M = 1
        return out.view(*x.shape[:-1], self.out_features)


def inference_copy(model: nn.Module, precision: str, parts: int = 1) -> nn.Module:
    """A snapshot of `model` with its Linear layers (the tied LM head too) laid out for fast decoding.

    fp32: each Linear becomes a DecodeLinear in `parts` slices (one per CPU thread; 1 elsewhere).
    bf16/fp16: the weights are cast once to that precision. Under autocast the matmuls would run in bf16
    anyway, but autocast re-casts the fp32 weights on every call; casting once halves the bytes each decoded
    token reads. Embeddings, LayerNorms and the residual stream stay fp32, as in autocast training. Being a
    snapshot, the copy does not follow further training: make a new Generator for that.
    """
    clone = copy.deepcopy(model)
    for parent in list(clone.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear):
                continue
            if precision == "fp32":
                setattr(parent, name, DecodeLinear(child, parts))
            else:  # the tied LM head gets its own half-width copy of wte; wte itself stays fp32
                child.weight = nn.Parameter(child.weight.detach().to(DTYPES[precision]), requires_grad=False)
                if child.bias is not None:
                    child.bias = nn.Parameter(child.bias.detach().to(DTYPES[precision]), requires_grad=False)
    return clone


def huge_page_tensor(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A zero-filled 1-D CPU tensor in memory that Linux may back with 2 MB pages instead of 4 KB ones.

    Transparent huge pages are often granted only to memory that asks for them ("madvise" mode), and torch's
    allocator does not ask. Elsewhere (macOS, Windows) this is ordinary memory.
    """
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.zeros(numel, dtype=dtype)
    # Private: shared anonymous memory counts as shmem, which has its own (usually disabled) huge-page switch.
    buffer = mmap.mmap(-1, max(numel * dtype.itemsize, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    buffer.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(buffer, dtype=dtype, count=numel)  # zero-filled; the tensor keeps the buffer alive


def pack_parameters(module: nn.Module) -> None:
    """Move every parameter of a CPU decoding snapshot into one huge-page buffer per dtype, side by side.

    Decoding a token streams every weight from memory once. With 4 KB pages the ~0.5 GB of GPT-2 (124M) in
    fp32 spans ~120k pages, and the address translations for them miss the TLB all the time; 2 MB pages
    cut that 512-fold (measured in bench/RESULTS.md, "Decoding speed").
    """
    params = list(module.parameters())  # tied parameters appear once
    for dtype in {p.dtype for p in params}:
        group = [p for p in params if p.dtype == dtype]
        align = max(1, 64 // dtype.itemsize)  # each tensor starts on a 64-byte cache line
        sizes = [-(-p.numel() // align) * align for p in group]
        flat = huge_page_tensor(sum(sizes), dtype)
        offset = 0
        for p, size in zip(group, sizes):
            packed = flat[offset:offset + p.numel()].view_as(p)
            packed.copy_(p.detach())
            p.data = packed
            offset += size


class Decoder:
    """The token loop of one model: prefill the prompts once, then one step per new token.

    The model is a decoding snapshot (`inference_copy`) in the chosen precision. Rows of different lengths are
    left-padded; the KV cache masks the padding and starts each row's positions at its first real token.
    A model sharded with FSDP (nbgpt.distributed) is no snapshot's: no process may hold it whole, so it decodes
    through its shards, every rank alongside the others with rank 0's tokens, the live model itself.
    """

    def __init__(self, model: nn.Module, device: torch.device | str | None = None, precision: str = "fp32",
                 use_cache: bool = True):
        """`precision` "auto" follows the training choice for the device (bf16 on CPUs with native bf16)."""
        model = unwrap(model)
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.precision = choose_precision(self.device, precision)
        self.sharded = is_sharded(model)
        self.model = model if self.sharded else self._snapshot(model)
        self.block_size = model.block_size
        self.use_cache = use_cache and model.kv_cache  # the bigram model has nothing to cache

    def _snapshot(self, model: nn.Module) -> nn.Module:
        parts = torch.get_num_threads() if self.device.type == "cpu" else 1  # DecodeLinear's slices
        snapshot = inference_copy(model, self.precision, parts).to(self.device)
        if self.device.type == "cpu":
            pack_parameters(snapshot)
        return snapshot

    def _forward(self, idx: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        with autocast(self.device, self.precision):
            logits, _ = self.model(idx, cache=cache, keep_logits=1)
        return logits[:, -1, :].float()

    def _new_cache(self, batch: int, pad: torch.Tensor) -> KVCache:
        return KVCache(self.model.config, batch, self.block_size, self.device, DTYPES[self.precision], pad=pad)

    @torch.no_grad()
    def steps(self, rows: list[list[int]], config: SamplingConfig, pad_id: int,
              should_stop: Callable[[], bool] | None = None) -> Iterator[torch.Tensor]:
        """Yield the next token of every row (N,) per step, up to config.max_new_tokens steps; the caller
        decides when a row is done and may stop iterating."""
        self.model.eval()
        tokens, pad = _left_pad(rows, pad_id)
        # Only a cache masks left padding; a model that attends over its context (one with a cache) would
        # read the padding without it.
        if not self.use_cache and self.model.kv_cache and bool(pad.any()):
            raise ConfigError("use_cache=False needs prompts of equal length (nothing masks the padding); "
                             "generate them one at a time or use the cache")
        tokens = tokens.to(self.device)
        generator = None
        if config.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(config.seed)
        cache = self._new_cache(len(rows), pad) if self.use_cache else None
        logits = self._forward(tokens, cache)
        for _ in range(config.max_new_tokens):
            if should_stop is not None and should_stop():
                return
            next_ids = sample_next(logits, config, generator)
            if self.sharded:
                next_ids = from_rank_zero(next_ids)
            yield next_ids
            tokens = torch.cat([tokens, next_ids[:, None]], dim=1)
            if cache is None:
                logits = self._forward(tokens[:, -self.block_size:], None)  # (pad columns are cropped first)
            elif cache.length == cache.max_len:
                # Slide: re-encode the newest half from position 0 (positions must stay < block_size).
                keep = max(1, self.block_size // 2)
                pad = (pad - (tokens.size(1) - keep)).clamp(min=0)
                tokens = tokens[:, -keep:]
                cache = self._new_cache(len(rows), pad)
                logits = self._forward(tokens, cache)
            else:
                logits = self._forward(next_ids[:, None], cache)


def _left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of token ids -> (N, longest) tensor, each row right-aligned, and each row's padding count (N,)."""
    lengths = torch.tensor([len(r) for r in rows])
    width = int(lengths.max())
    tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for i, row in enumerate(rows):
        tokens[i, width - len(row):] = torch.tensor(row)
    return tokens, width - lengths


class Generator:
    """Text in, text out: prompts are encoded, decoded by a `Decoder`, and cut at end-of-text or a stop string.

    Generation reads a snapshot of the model taken here: after further training, make a new Generator.
    """

    def __init__(self, model: nn.Module, tokenizer: Tokenizer, device: torch.device | str | None = None,
                 precision: str = "fp32", use_cache: bool = True):
        self.tokenizer = tokenizer
        self.decoder = Decoder(model, device, precision, use_cache)
        self.last_stats: dict = {}

    @property
    def model(self) -> nn.Module:
        """The snapshot that generates (in the decoding precision): inspect it, e.g. its attention maps."""
        return self.decoder.model

    def encode_prompt(self, prompt: str) -> list[int]:
        """Prompt -> ids; an empty prompt starts from end-of-text, an overlong one keeps its tail."""
        ids = self.tokenizer.encode(prompt) if prompt else []
        if not ids:
            return [self.tokenizer.eot]
        block_size = self.decoder.block_size
        if len(ids) > block_size:
            warnings.warn(f"prompt of {len(ids)} tokens is longer than the context ({block_size}); "
                          f"keeping its last {block_size} tokens", stacklevel=3)
            ids = ids[-block_size:]
        return ids

    def token_steps(self, prompts: list[list[int]], config: SamplingConfig,
                    should_stop: Callable[[], bool] | None = None) -> Iterator[torch.Tensor]:
        """The next token of every row per step; rows are the prompts, each num_return_sequences times."""
        rows = [p for p in prompts for _ in range(config.num_return_sequences)]
        return self.decoder.steps(rows, config, self.tokenizer.eot, should_stop)

    def generate_ids(self, prompts: list[list[int]], config: SamplingConfig) -> list[list[int]]:
        """New token ids per row, ending before end-of-text when stop_at_eot (stop strings: see complete)."""
        outputs: list[list[int]] = [[] for _ in range(len(prompts) * config.num_return_sequences)]
        done = [False] * len(outputs)
        start = time.perf_counter()
        produced = 0
        for step_ids in self.token_steps(prompts, config):
            for i, token in enumerate(step_ids.tolist()):
                if done[i]:
                    continue
                if config.stop_at_eot and token == self.tokenizer.eot:
                    done[i] = True
                else:
                    outputs[i].append(token)
                    produced += 1
            if all(done):
                break
        self._record_stats(produced, time.perf_counter() - start)
        return outputs

    def complete(self, prompt: str, config: SamplingConfig | None = None) -> str:
        return self.generate([prompt], config)[0]

    def generate(self, prompts: Sequence[str], config: SamplingConfig | None = None) -> list[str]:
        """Completions (without the prompts), num_return_sequences per prompt, cut at a stop string."""
        config = config or SamplingConfig()
        ids = self.generate_ids([self.encode_prompt(p) for p in prompts], config)
        texts = [self.tokenizer.decode(row) for row in ids]
        return [_cut_at_stop(text, config.stop)[0] for text in texts]

    def stream(self, prompt: str, config: SamplingConfig | None = None,
               should_stop: Callable[[], bool] | None = None) -> Iterator[str]:
        """Yield the completion of one prompt piece by piece as tokens arrive (see StreamingText)."""
        config = config or SamplingConfig()
        if config.num_return_sequences != 1:
            raise ConfigError("stream() produces one sequence; use generate() for num_return_sequences > 1")
        text = StreamingText(config.stop)
        start, produced = time.perf_counter(), 0
        for step_ids in self.token_steps([self.encode_prompt(prompt)], config, should_stop):
            token = int(step_ids[0])
            if config.stop_at_eot and token == self.tokenizer.eot:
                break
            produced += 1
            if ready := text.push(self.tokenizer.decode_bytes([token])):
                yield ready
            if text.stopped:
                break
        else:
            text.flush()
        if rest := text.rest():
            yield rest
        self._record_stats(produced, time.perf_counter() - start)

    def _record_stats(self, tokens: int, seconds: float) -> None:
        self.last_stats = {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / max(seconds, 1e-9)}


class StreamingText:
    """Token bytes in, text safe to show out.

    Bytes go through an incremental UTF-8 decoder, so a character split across two BPE tokens is emitted
    whole once its last byte arrives, never as a replacement character; text that might be the start of a
    stop string is held back until it is clearly not one.
    """

    def __init__(self, stops: Sequence[str]):
        self.stops = stops
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.pending = ""
        self.stopped = False  # a stop string has appeared: nothing after it will be shown

    def push(self, data: bytes) -> str:
        self.pending += self.decoder.decode(data)
        self.pending, self.stopped = _cut_at_stop(self.pending, self.stops)
        ready = len(self.pending) - _held_back(self.pending, self.stops)
        shown, self.pending = self.pending[:ready], self.pending[ready:]
        return shown

    def flush(self) -> None:
        """The sequence ended: decode what the UTF-8 decoder still holds."""
        self.pending += self.decoder.decode(b"", final=True)

    def rest(self) -> str:
        """The held-back text, once nothing more will come."""
        return _cut_at_stop(self.pending, self.stops)[0]


def _cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    cuts = [text.find(s) for s in stops if s and s in text]
    return (text[: min(cuts)], True) if cuts else (text, False)


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest


def load_generator(source: str, device: str = "auto", precision: str = "auto") -> Generator:
    """A generator for a run, checkpoint file, HF folder or hub name (nbgpt.model_files.load_model), with the
    tokenizer it was trained with."""
    from .model_files import load_model

    loaded = load_model(source, device=device)
    return Generator(loaded.model, loaded.tokenizer, precision=precision)
