"""GPT-2 as a PyTorch module, plus the bigram baseline the notebooks start from.

Shapes in comments use B = batch, T = time (tokens), C = n_embd, H = n_head, D = C // H, V = vocab.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from .knobs import ConfigError, check_known, fill_defaults, knob


@dataclass
class GPTConfig:
    block_size: int = knob(1024, "context length: the most tokens the model attends over")
    vocab_size: int = knob(50257, "real tokens; ids >= vocab_size never appear in data")
    n_layer: int = knob(12, "transformer blocks")
    n_head: int = knob(12, "attention heads per block (must divide n_embd)")
    n_embd: int = knob(768, "width of the residual stream: the embedding size")
    dropout: float = knob(0.0, "dropout probability while training (0: none, as in GPT-2 pretraining at this scale)")
    bias: bool = knob(True, "biases in the Linear and LayerNorm layers, as GPT-2 has")
    position: str = knob("absolute", "absolute (learned, GPT-2) or rope (rotary)")
    rope_base: float = knob(10000.0, "base of the rotary frequencies (with position=rope)")
    # Round the embedding/LM-head rows up to a multiple of this: 50257 -> 50304 with 64 makes matmuls use
    # friendlier shapes. The extra rows are sliced off the logits, so outputs over real tokens are unchanged.
    vocab_multiple: int = knob(1, "round the embedding and LM-head rows up to a multiple of this (64: 50257 -> "
                                  "50304, friendlier matmul shapes); the extra rows are sliced off the logits, so "
                                  "outputs are unchanged")
    # The speedrun recipe's architecture (nbgpt.run_config); every default is GPT-2's, so parity with it holds.
    activation: str = knob("gelu", "the MLP's nonlinearity: gelu (tanh-approximated, GPT-2) or relu2 "
                           "(relu(x)²)")
    qk_norm: bool = knob(False, "RMS-normalise each head's queries and keys, so attention logits stay within ±√D")
    zero_init_proj: bool = knob(False, "the blocks' output projections start at zero: every block starts as identity")
    tie_embeddings: bool = knob(True, "the LM head is the token embedding (GPT-2); false gives it a matrix of its "
                                      "own")
    logit_softcap: float = knob(0.0, "c > 0 squashes logits smoothly into (-c, c): c·tanh(logits / c); 0 = off")

    def __post_init__(self) -> None:
        fill_defaults(self)
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "vocab_multiple"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise ConfigError(f"GPTConfig.n_embd={self.n_embd} is not divisible by n_head={self.n_head}; "
                              f"each head gets n_embd/n_head channels, so pick n_head dividing {self.n_embd}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.position not in ("absolute", "rope"):
            raise ConfigError(f"GPTConfig.position must be 'absolute' or 'rope', got {self.position!r}")
        if self.position == "rope" and (self.n_embd // self.n_head) % 2:
            raise ConfigError(f"rotary embeddings need an even head size, got n_embd/n_head="
                              f"{self.n_embd // self.n_head}")
        if not self.rope_base > 1:  # also refuses NaN
            raise ConfigError(f"GPTConfig.rope_base must be greater than 1 (GPT-NeoX and Llama use 10000), got "
                              f"{self.rope_base}")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"GPTConfig.activation must be one of {', '.join(map(repr, ACTIVATIONS))}, got "
                              f"{self.activation!r}")
        if not (self.logit_softcap == 0 or self.logit_softcap > 0):  # also refuses NaN
            raise ConfigError(f"GPTConfig.logit_softcap must be 0 (off) or positive (e.g. 30), got "
                              f"{self.logit_softcap}")

    @property
    def padded_vocab_size(self) -> int:
        return math.ceil(self.vocab_size / self.vocab_multiple) * self.vocab_multiple

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "GPTConfig":
        check_known(values, {f.name for f in fields(cls)}, f"{cls.__name__} field")
        return cls(**values)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "GPTConfig":
        if name not in MODEL_PRESETS:
            raise ConfigError(f"unknown model preset {name!r}; choose one of {sorted(MODEL_PRESETS)}")
        return cls.from_dict({**MODEL_PRESETS[name], **overrides})


MODEL_PRESETS: dict[str, dict] = {
    # OpenAI's four GPT-2 sizes (124M, 350M, 774M, 1558M parameters).
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024, block_size=1024, vocab_size=50257),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280, block_size=1024, vocab_size=50257),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600, block_size=1024, vocab_size=50257),
    # GPT-3's sizes (Brown et al., 2020, Table 2.1): GPT-2's architecture at a 2048-token context. GPT-3
    # alternated dense and locally banded sparse attention layers; these are dense throughout, as
    # build-nanogpt's GPT-3 remarks assume. The table gives XL 24 heads of d_head 128, which cannot both hold
    # at d_model 2048 (24 × 128 = 3072): here XL has 16 heads of 128, keeping the width and head size.
    "gpt3-small": dict(n_layer=12, n_head=12, n_embd=768, block_size=2048, vocab_size=50257),  # 125M
    "gpt3-medium": dict(n_layer=24, n_head=16, n_embd=1024, block_size=2048, vocab_size=50257),  # 350M
    "gpt3-large": dict(n_layer=24, n_head=16, n_embd=1536, block_size=2048, vocab_size=50257),  # 760M
    "gpt3-xl": dict(n_layer=24, n_head=16, n_embd=2048, block_size=2048, vocab_size=50257),  # 1.3B
    "gpt3-2.7b": dict(n_layer=32, n_head=32, n_embd=2560, block_size=2048, vocab_size=50257),
    "gpt3-6.7b": dict(n_layer=32, n_head=32, n_embd=4096, block_size=2048, vocab_size=50257),
    # Small models that train in minutes on a laptop CPU (vocab_size is set from the tokenizer).
    "tiny": dict(n_layer=2, n_head=2, n_embd=64, block_size=64),
    "mini": dict(n_layer=4, n_head=4, n_embd=128, block_size=128),
    "small-char": dict(n_layer=4, n_head=4, n_embd=256, block_size=128, position="rope"),
    # The fastest to a good char-level loss on a 2-core CPU (bench/cpu_time_to_quality.py).
    "cpu-char": dict(n_layer=4, n_head=4, n_embd=128, block_size=64),
    "small": dict(n_layer=6, n_head=6, n_embd=384, block_size=256),
}


# ---------------------------------------------------------------------------------------------- KV cache


class KVCache:
    """Preallocated keys and values for incremental decoding, shared by all layers.

    Prompts of different lengths are left-padded to a common length: row b's first `pad[b]` slots hold
    padding that no query may attend to, and its positions start at 0 on its first real token.
    """

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int, device: torch.device | str,
                 dtype: torch.dtype, pad: torch.Tensor | None = None):
        if max_len > config.block_size:
            raise ConfigError(f"a KV cache of {max_len} slots exceeds block_size={config.block_size}")
        shape = (config.n_layer, batch_size, config.n_head, max_len, config.head_size)
        # Uninitialised: attention only ever reads the slots written so far (GPT-2's is ~75 MB to zero).
        self.k = torch.empty(shape, device=device, dtype=dtype)  # (L, B, H, max_len, D)
        self.v = torch.empty(shape, device=device, dtype=dtype)
        self.layer_k, self.layer_v = self.k.unbind(0), self.v.unbind(0)  # per-layer views, (B, H, max_len, D)
        self.max_len = max_len
        self.length = 0  # slots filled so far, same for every row
        self.pad = pad.to(device) if pad is not None and bool(pad.any()) else None  # (B,) left padding

    def positions(self, T: int) -> torch.Tensor:
        """Positions of the next T tokens, (B, T) when rows are padded else (T,)."""
        device = self.k.device
        pos = torch.arange(self.length, self.length + T, device=device)
        if self.pad is None:
            return pos
        return (pos[None, :] - self.pad[:, None]).clamp(min=0)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store k, v (B, H, T, D) for `layer` and return all keys/values so far plus the attention mask."""
        T = k.size(2)
        start, end = self.length, self.length + T
        if end > self.max_len:
            raise ConfigError(f"KV cache overflow: {end} tokens in a cache of {self.max_len}")
        keys, values = self.layer_k[layer][:, :, :end], self.layer_v[layer][:, :, :end]  # (B, H, end, D)
        keys[:, :, start:].copy_(k)
        values[:, :, start:].copy_(v)
        if self.pad is None and (T == 1 or start == 0):
            return keys, values, None  # plain causal (or a single query that may see everything)
        # Query i (slot start+i) sees key slot s iff s <= start+i and s is not left padding of its row.
        slots = torch.arange(end, device=k.device)
        mask = slots[None, :] <= (start + torch.arange(T, device=k.device))[:, None]  # (T, end)
        if self.pad is not None:
            mask = mask[None, None] & (slots[None, :] >= self.pad[:, None])[:, None, None, :]  # (B,1,T,end)
        return keys, values, mask

    def advance(self, T: int) -> None:
        self.length += T

    def repeat_rows(self, times: int) -> None:
        """Give every row `times` copies (row b -> rows b*times .. b*times+times-1): one shared prefix,
        several continuations."""
        self.k = self.k.repeat_interleave(times, dim=1)
        self.v = self.v.repeat_interleave(times, dim=1)
        self.layer_k, self.layer_v = self.k.unbind(0), self.v.unbind(0)
        if self.pad is not None:
            self.pad = self.pad.repeat_interleave(times)


# ---------------------------------------------------------------------------------------------- layers


def relu_squared(x: torch.Tensor) -> torch.Tensor:
    """relu(x)²: as cheap as ReLU, smooth at 0 (its slope is 2x), and sparse: about half the hidden units
    are exactly zero for any token. In the modded-nanogpt speedrun it trained faster than GELU (record 5)."""
    return F.relu(x).square()


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU with the tanh approximation, as GPT-2 was trained with (HF: "gelu_new")."""
    return F.gelu(x, approximate="tanh")


ACTIVATIONS = {"gelu": gelu_tanh, "relu2": relu_squared}


def rotary_tables(config: GPTConfig, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (block_size, D/2): channel pair i rotates by angle pos * base^(-2i/D)."""
    half = config.head_size // 2
    inv_freq = config.rope_base ** (-torch.arange(0, half, device=device, dtype=torch.float32) / half)
    angles = torch.outer(torch.arange(config.block_size, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, T, D) by position: the two halves of the head are the (real, imaginary) parts."""
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return rotated.type_as(x)


# Up to this many keys the explicit path wins for bf16 on a CPU (measured up to 256; the fused kernel wins at 512).
EXPLICIT_ATTENTION_MAX_LEN = 256


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
              dropout: float = 0.0) -> torch.Tensor:
    """softmax(q kᵀ / √D) v for queries (B, H, T, D) over keys and values (B, H, S, D).

    Each query sees the keys that `mask` (broadcastable to (B, H, T, S), True = visible) allows; without a
    mask, the causal prefix up to its own position, where the T queries are the last of the S positions
    (T == S in training, T == 1 when decoding with a cache).

    PyTorch's fused kernel (flash attention) is the right choice on GPUs, in fp32 and for long sequences. On
    a CPU in bf16/fp16 with short sequences its backward pass is several times slower than two plain matmuls
    (measured in bench/RESULTS.md) and the explicit (B, H, T, S) score matrix is small, so there the matmuls
    are spelled out.
    """
    T, S = q.size(2), k.size(2)
    if q.device.type != "cpu" or q.dtype == torch.float32 or S > EXPLICIT_ATTENTION_MAX_LEN:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                              dropout_p=dropout)
    return F.dropout(attention_probs(q, k, mask).to(v.dtype), dropout) @ v  # (B, H, T, D)


def causal_mask(T: int, S: int | None = None, device: torch.device | str | None = None) -> torch.Tensor:
    """(T, S) booleans, True where query t may see key s. The T queries are the last of the S positions (S = T
    in training, the default), so row t sees the keys up to its own position."""
    S = T if S is None else S
    return torch.ones(T, S, dtype=torch.bool, device=device).tril(diagonal=S - T)


def attention_probs(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q kᵀ / √D) in fp32, (B, H, T, S): how much each query takes from each key it may see (`mask`,
    default causal_mask). The explicit path of `attention`, and the weights notebook 02 draws."""
    scores = (q @ k.transpose(-2, -1)).float() * q.size(-1) ** -0.5  # (B, H, T, S): how well q matches k
    if mask is None:
        mask = causal_mask(q.size(2), k.size(2), q.device)
    # A finite fill rather than -inf: a query that may see nothing (a left-padding slot) then gets harmless
    # uniform weights instead of NaNs, which would leak into real rows through its cached keys and values.
    return scores.masked_fill(~mask, torch.finfo(scores.dtype).min).softmax(dim=-1)


class CausalSelfAttention(nn.Module):
    """Multi-head attention in which token t only attends to tokens <= t."""

    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.residual_scale = True  # its init shrinks with depth, see GPT._init_weights
        self.dropout = config.dropout
        self.qk_norm = config.qk_norm

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                cache: KVCache | None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x, rope)
        dropout = self.dropout if self.training else 0.0
        mask = None
        if cache is not None:
            k, v, mask = cache.update(self.layer, k, v)  # everything cached so far, (B, H, S, D)
        y = attention(q, k, v, mask, dropout)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble the heads side by side
        return self.c_proj(y)

    def qkv(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None):
        """Queries, keys and values of x (B, T, C), each (B, H, T, D), as attention compares them."""
        B, T, C = x.shape
        qkv = self.c_attn(x).view(B, T, 3, self.n_head, C // self.n_head)  # q, k, v side by side per token
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, T, D)
        if self.qk_norm:
            # Every q and k gets RMS 1, i.e. length √D, so a logit q·k/√D lies within ±√D (±8 at D = 64):
            # bounded, so no head can saturate its softmax by growing its weights, yet wide enough (e^16
            # between two keys) for sharp attention, so the usual 1/√D scale stays. Before the rotation or
            # after makes no difference, as a rotation keeps lengths; the keys are cached normalised.
            q, k = F.rms_norm(q, (q.size(-1),)), F.rms_norm(k, (k.size(-1),))
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        return q, k, v


class MLP(nn.Module):
    """Position-wise feed-forward: widen 4x, the nonlinearity (GPT-2: tanh-approximated GELU), project back."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.residual_scale = True
        self.activation = ACTIVATIONS[config.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.activation(self.c_fc(x)))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x)).

    Normalising before each sub-layer keeps the residual stream an untouched sum, which is what lets deep
    stacks train without careful warmup of every layer.
    """

    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, rope, cache):
        x = x + self.dropout(self.attn(self.ln_1(x), rope, cache))
        return x + self.dropout(self.mlp(self.ln_2(x)))


# ---------------------------------------------------------------------------------------------- GPT


class GPT(nn.Module):
    kv_cache = True  # forward(idx, cache=KVCache(...)) decodes incrementally

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.padded_vocab_size, config.n_embd)  # token embeddings (V', C)
        self.wpe = nn.Embedding(config.block_size, config.n_embd) if config.position == "absolute" else None
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        if config.tie_embeddings:
            # Weight tying: the matrix that maps token -> vector also scores vector -> token. Tokens that are
            # used alike get similar rows in both roles, and it saves V*C parameters (38.6M at GPT-2 size).
            self.lm_head.weight = self.wte.weight
        if config.position == "rope":
            cos, sin = rotary_tables(config)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        if not config.tie_embeddings:
            # An untied head starts at zero (as in the speedrun): the first prediction is uniform (loss ln V)
            # rather than noise, and the input embedding is free to learn what inputs need.
            nn.init.zeros_(self.lm_head.weight)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "residual_scale", False):
                # Each block adds two outputs to the residual stream; scaling their init by 1/sqrt(2 L)
                # keeps the stream's variance from growing with depth (GPT-2 paper, section 2.3).
                # zero_init_proj goes all the way: every block starts as the identity, the stream is the
                # embedding alone, and each block's first gradients reach its output projection only.
                std = 0.0 if self.config.zero_init_proj else std * (2 * self.config.n_layer) ** -0.5
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @property
    def block_size(self) -> int:
        return self.config.block_size

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters, counting a tied embedding once; `non_embedding` leaves out wte, wpe and the LM head
        (tied or not): what remains is the blocks and the final LayerNorm."""
        total = sum(p.numel() for p in self.parameters())  # parameters() yields a tied matrix once
        if non_embedding:
            total -= sum(p.numel() for p in self.embedding_parameters())
            total -= 0 if self.config.tie_embeddings else self.lm_head.weight.numel()
        return total

    def embedding_parameters(self) -> list[nn.Parameter]:
        """The input embeddings, tables indexed by token (wte) and position (wpe): the optimizers may give
        them a learning rate of their own (TrainConfig.embedding_lr_scale). A tied LM head is wte itself."""
        return [self.wte.weight] + ([self.wpe.weight] if self.wpe is not None else [])

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None,
                keep_logits: int | None = None):
        """idx (B, T) token ids -> logits (B, T, V) and, when targets (B, T) are given, the mean loss.

        With a `cache`, idx holds only the new tokens; their keys/values are appended and attention covers
        everything cached so far. Targets equal to -1 are ignored by the loss. `keep_logits=n` computes the
        LM head for the last n positions only (a prefill needs one): at GPT-2 size the head is a third of
        the compute.
        """
        x = self.hidden_states(idx, cache)
        if keep_logits is not None:
            x = x[:, -keep_logits:]
        logits = self.head(x)  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                                   ignore_index=-1)
        return logits, loss

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Final hidden states (..., C) -> next-token logits (..., V) over the real vocabulary."""
        logits = self.lm_head(x)  # (..., V')
        if self.config.padded_vocab_size != self.config.vocab_size:
            logits = logits[..., : self.config.vocab_size]  # padding rows are not tokens
        if cap := self.config.logit_softcap:
            # Soft-capping (Gemma 2): about the identity for |logit| << c, and never beyond ±c. A confident
            # wrong prediction then costs at most ~2c nats, so no single token can produce a huge gradient,
            # and the head cannot buy loss by inflating all logits. In the logits' own dtype: near ±c a bf16
            # tanh resolves steps of c/256, as fine as bf16 logits of that size, and an fp32 copy costs time
            # (bench/RESULTS.md, "The soft cap's dtype").
            logits = cap * torch.tanh(logits / cap)
        return logits

    def hidden_states(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """idx (B, T) -> the final LayerNorm's output (B, T, C), from which `head` predicts each next token.

        Scorers that need only some positions' predictions (HellaSwag) run the head on those alone."""
        B, T = idx.shape
        start = cache.length if cache is not None else 0
        if start + T > self.config.block_size:
            raise ConfigError(f"sequence of {start + T} tokens is longer than the model's context "
                              f"block_size={self.config.block_size}; crop the input to its last "
                              f"{self.config.block_size} tokens")
        pos = cache.positions(T) if cache is not None else torch.arange(T, device=idx.device)  # (T,) or (B,T)
        x = self.wte(idx)  # (B, T, C)
        rope = None
        if self.wpe is not None:
            x = x + self.wpe(pos)
        else:
            rope = (self.rope_cos[pos], self.rope_sin[pos])  # (T, D/2) or (B, T, D/2)
            if pos.dim() == 2:
                rope = (rope[0][:, None], rope[1][:, None])  # broadcast over heads: (B, 1, T, D/2)
        x = self.drop(x)
        for block in self.h:
            x = block(x, rope, cache)
        if cache is not None:
            cache.advance(T)
        return self.ln_f(x)


# ---------------------------------------------------------------------------------------------- bigram


class BigramLM(nn.Module):
    """The simplest language model: each token's next-token logits are one row of a V x V table.

    It sees one token of context, so whatever GPT does better than this is what attention over the past
    buys. It has GPT's forward signature, `block_size` and `kv_cache`, so the generator samples it
    unchanged (notebook 02; nbgpt.train.train_bigram trains it). For a large vocabulary the table is
    factorised through `rank` dimensions (GPT-2's full 50257² table would be 2.5 B parameters); it is still a
    bigram model, only with a table of limited rank.
    """

    kv_cache = False  # nothing to cache: the next token depends on the current one alone

    def __init__(self, vocab_size: int, block_size: int = 1024, rank: int | None = None):
        super().__init__()
        self.block_size = block_size  # the longest input it is given (it reads only the last token)
        self.table = nn.Embedding(vocab_size, rank or vocab_size)
        self.unembed = nn.Linear(rank, vocab_size) if rank else None
        nn.init.zeros_(self.table.weight)  # start at the uniform distribution: loss = ln V
        if self.unembed is not None:
            nn.init.normal_(self.unembed.weight, std=0.02)
            nn.init.zeros_(self.unembed.bias)

    def num_params(self, non_embedding: bool = False) -> int:
        return sum(p.numel() for p in self.parameters()) - (self.table.weight.numel() if non_embedding else 0)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache=None,
                keep_logits: int | None = None):
        if cache is not None:
            raise ConfigError("the bigram model has no KV cache; generate with use_cache=False")
        if keep_logits is not None:
            idx = idx[:, -keep_logits:]  # each position's logits depend on its own token alone
        logits = self.table(idx)  # (B, T, V), or (B, T, rank) before the unembedding
        if self.unembed is not None:
            logits = self.unembed(logits)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss


# ---------------------------------------------------------------------------------------------- helpers


def flops_per_token(config: GPTConfig, seq_len: int | None = None, non_embedding_params: int | None = None) -> float:
    """Training FLOPs per token: 6N for the matmuls (2 forward + 4 backward per weight) plus attention.

    Attention scores and the weighted sum cost 2 * 2 * T * C per token per layer forward, times 3 with the
    backward pass: 12 * L * C * T (PaLM, appendix B). N counts non-embedding parameters plus the LM head.
    """
    T = seq_len or config.block_size
    if non_embedding_params is None:
        C, L = config.n_embd, config.n_layer
        # per block: qkv 3C^2, attention out C^2, MLP 8C^2; biases 9C and two LayerNorms 4C (2C bias-free)
        per_layer = 12 * C * C + (13 * C if config.bias else 2 * C)
        non_embedding_params = L * per_layer + (2 * C if config.bias else C)  # + final LayerNorm
    lm_head = config.padded_vocab_size * config.n_embd
    return 6 * (non_embedding_params + lm_head) + 12 * config.n_layer * config.n_embd * T


def parameter_table(model: nn.Module) -> list[dict]:
    """Parameters grouped by top-level part (embeddings, each block, final LayerNorm), tied ones once."""
    seen: set[int] = set()
    rows: dict[str, dict] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        parts = name.split(".")
        group = ".".join(parts[:2]) if parts[0] == "h" else parts[0]
        row = rows.setdefault(group, {"part": group, "tensors": 0, "parameters": 0})
        row["tensors"] += 1
        row["parameters"] += p.numel()
    total = sum(r["parameters"] for r in rows.values())
    for row in rows.values():
        row["share"] = f"{100 * row['parameters'] / total:.1f} %"
    return list(rows.values())


@torch.no_grad()
def attention_weights(model: GPT, idx: torch.Tensor, layer: int = 0) -> torch.Tensor:
    """softmax(q kᵀ / √D) with the causal mask, for one sequence idx (1, T) at `layer`: (H, T, T).

    The model runs forward once while a hook catches what the layer's attention receives (the LayerNorm'd
    residual stream and the rotary tables); the layer's own `qkv` then gives its queries and keys.
    """
    attn = model.h[layer].attn
    device = next(model.parameters()).device
    # A Generator's inference copy keeps its Linear weights in bf16/fp16: run it under autocast as it does.
    low = ({p.dtype for p in model.parameters()} - {torch.float32} or {None}).pop()
    caught = {}
    hook = attn.register_forward_pre_hook(lambda module, args: caught.update(x=args[0], rope=args[1]))
    try:
        with torch.autocast(device.type, dtype=low or torch.bfloat16, enabled=low is not None):
            model.eval()
            model(idx.to(device))
            q, k, _ = attn.qkv(caught["x"], caught["rope"])  # each (1, H, T, D)
    finally:
        hook.remove()
    return attention_probs(q.float(), k.float())[0].cpu()  # the future is invisible: zero weight above the diagonal
