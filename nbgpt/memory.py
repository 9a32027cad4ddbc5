"""Peak GPU memory of a run, phase by phase, predicted on any machine (a CPU-only laptop included).

Nothing comes from a formula: nbgpt's model takes its real steps (the run's optimizers, precision and loss
scaling) on fake tensors (torch's FakeTensorMode: shapes and dtypes, no data, no arithmetic), and torch's
MemTracker adds up the bytes of every tensor alive at each moment; the most it sees at once is the phase's
peak. Fake tensors compute nothing, so GPT-2 (124M) traces in seconds on a CPU.

Activations grow linearly with the micro-batch B, so each phase that depends on B is traced at B = 1 and
B = 2 and extended along that line: peak(B) = peak(1) + (B - 1) × (peak(2) - peak(1)). Every micro-batch
is then priced at the cost of two traces. Parts whose peak does not grow with B (the optimizer step) are
traced once and taken as the larger of the two, never added to the line.

What the figures are: one rank's bytes in torch's allocator (rounded up to the CUDA allocator's 512-byte
blocks). Under DDP each rank holds a whole replica; with gradient_as_bucket_view=True its all-reduce buckets
are the gradients' own memory, so nproc changes the per-rank micro-batch and nothing else. What torch's
allocator does not see (the CUDA context, cuBLAS and NCCL workspaces) is set aside as NON_TORCH_GIB of the
card, and the allocator's own slack (rounding to blocks, fragmentation) as MARGIN of the rest.

Under FSDP (parallel="fsdp", nbgpt.distributed) the plan prices one rank from the same single-process trace and
the sharding's known bytes (see RankShare): the trace's resident state divided by the ranks, the gathered 16-bit
weights of two blocks and the root, the whole model's unsharded fp32 gradients while micro-steps accumulate,
Muon's whole fp32 matrix, and activations as under DDP. (torch's FSDPMemTracker does trace a fully_shard'ed
GPT on fake tensors over a fake process group, with the device mesh built outside FakeTensorMode; wiring it
into every phase is left to do, and this model is checked against a real two-rank gloo run instead.)
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .knobs import ConfigError
from .device import DTYPES, autocast, resolve_device
from .model import GPT, GPTConfig, KVCache
from .speedups import (SpeedupCell, adamw_pair, attention_pair, cell_shapes, forward_backward,
                       timing_micro_batch)
from .train_setup import build_optimizers

from .run_config import AUTO

if TYPE_CHECKING:
    from .run_config import RunConfig, TrainConfig

GIB = 2 ** 30
NON_TORCH_GIB = 1.0  # CUDA context (~0.3-0.5 GiB), cuBLAS/cuDNN workspaces, NCCL buffers: outside the allocator
MARGIN = 0.10  # of what remains, left free for the caching allocator's rounding and fragmentation
CPU_AUTO_MICRO_BATCH = 16  # micro_batch="auto" off a GPU: the CPU demo's fp32 batch (nbgpt.presets.CPU_BATCH)
VOCAB = {"gpt2": 50257, "char": 256}  # a plan made before the data exists: BPE's size, or a byte-sized bound
COMPILED_MODEL = ("compiled = the eager trace, an upper bound: torch.compile saves about the same activations per "
                  "block (aot_autograd's min-cut partitioner, measured) and fuses away some temporaries the trace "
                  "still counts, e.g. the loss's fp32 copies of the logits")

# The memory torch reports as total_memory, GiB, whether autocast="auto" picks bf16 (compute capability >= 8),
# and the names `--gpu` accepts.
KNOWN_GPUS: dict[str, tuple[float, bool, tuple[str, ...]]] = {
    "A100 40GB": (39.4, True, ("a100-40gb", "a100-40", "a100", "a100-sxm4-40gb", "a100-pcie-40gb")),
    "A100 80GB": (79.1, True, ("a100-80gb", "a100-80", "a100-sxm4-80gb", "a100-80gb-pcie")),
    "H100 80GB": (79.1, True, ("h100", "h100-80gb", "h100-80gb-hbm3", "h100-pcie")),
    "H200": (139.8, True, ("h200", "h200-141gb")),
    "L4": (22.0, True, ("l4",)),
    "T4": (14.7, False, ("t4",)),
    "A10G": (22.0, True, ("a10g",)),
    "L40S": (44.4, True, ("l40s",)),
    "V100 16GB": (15.8, False, ("v100-16gb", "v100-16", "v100")),
    "V100 32GB": (31.7, False, ("v100-32gb", "v100-32")),
    "RTX 4090": (23.6, True, ("rtx-4090", "rtx4090", "4090")),
}


def find_gpu(name: str) -> str:
    """The KNOWN_GPUS key `name` means ("a100-40gb", "T4", "h100", or the name torch.cuda.get_device_name
    gives, e.g. "NVIDIA A100-SXM4-40GB", "Tesla T4"), else one line listing them."""
    wanted = re.sub(r"^(nvidia|tesla)-", "", re.sub(r"[\s_]+", "-", name.strip().lower()))
    for key, (_, _, aliases) in KNOWN_GPUS.items():
        if wanted in aliases or wanted == re.sub(r"\s+", "-", key.lower()):
            return key
    known = ", ".join(aliases[0] for _, _, aliases in KNOWN_GPUS.values())
    raise ConfigError(f"unknown GPU {name!r}; known: {known} (or give its memory: --gpu-memory GiB)")


# ------------------------------------------------------------------------------------------------ CUDA autocast

# CUDA autocast's op lists, for the torch functions nbgpt's model calls (ATen's autocast_mode.h).
_LOW_PRECISION = {F.linear, torch.matmul, torch.Tensor.__matmul__, torch.mm, torch.bmm, torch.addmm,
                  torch.baddbmm, F.scaled_dot_product_attention}
_FP32 = {F.layer_norm, F.rms_norm, F.group_norm, F.softmax, F.log_softmax, torch.softmax, torch.log_softmax,
         torch.Tensor.softmax, torch.Tensor.log_softmax, F.cross_entropy, F.nll_loss, torch.logsumexp}


class CudaAutocast(TorchFunctionMode):
    """CUDA's autocast, replayed on CPU tensors for a trace.

    torch.autocast("cuda") switches itself off without a GPU, and CPU autocast follows other lists: on a GPU
    rms_norm (QK-norm), layer_norm, softmax and the losses run in fp32, on a CPU rms_norm stays in 16 bits.
    What the backward pass keeps, and so the memory, follows those dtypes. So this mode casts as CUDA does, at
    the torch functions the model calls: matmuls and attention to the 16-bit dtype, normalisations, softmaxes
    and losses to fp32; anything else runs in the dtype it is given, as under autocast. The casts are
    differentiable `.to` calls, so autograd keeps what it would keep on the GPU. (CUDA autocast also caches
    each weight's 16-bit copy for the region; the backward pass holds those copies anyway: same peak.)
    """

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _LOW_PRECISION:
            args, kwargs = _cast((args, kwargs), lambda t: t.is_floating_point(), self.dtype)
        elif func in _FP32:
            args, kwargs = _cast((args, kwargs), lambda t: t.dtype in (torch.float16, torch.bfloat16), torch.float32)
        return func(*args, **kwargs)


def _cast(tree, which, dtype):
    return torch.utils._pytree.tree_map_only(torch.Tensor, lambda t: t.to(dtype) if which(t) else t, tree)


def _precision_context(precision: str, target: str):
    if precision == "fp32" or target == "cpu":
        return autocast(torch.device("cpu"), precision)  # the CPU's own autocast: what a CPU run does
    return CudaAutocast(DTYPES[precision])


# ------------------------------------------------------------------------------------------------------ tracing


@dataclass(frozen=True)
class Line:
    """Bytes at micro-batch B: at_one + (B - 1) * per_sample, from traces at B = 1 and 2."""

    at_one: int
    per_sample: int

    def __call__(self, batch: int) -> int:
        return self.at_one + (batch - 1) * self.per_sample


@dataclass(frozen=True)
class Traced:
    """One rank's peaks in bytes, per phase, of one model, optimizer, precision and shape."""

    resident: int  # parameters, gradients and optimizer state: what stays between steps
    optimizer: int  # the optimizer step (gradient clipping included)
    train: Line  # one micro-step's forward + backward, accumulating into earlier micro-steps' gradients
    eval: Line  # a validation batch, no gradients, the training state resident
    hellaswag: int  # the fullest batch the shared-context scorer may build, the training state resident
    sample: int  # prefill and a decoding step into a full-context KV cache, the training state resident


def _device_peak_tracker():
    """torch's MemTracker keeping the per-device peak only: after every op it also updates a peak for each
    module being run, which the plan does not use and which took ~40 % of a trace's time."""
    from torch.distributed._tools.mem_tracker import MemTracker

    class DevicePeakTracker(MemTracker):
        def _update_peak_stats(self, peak_state) -> None:
            for device, snapshot in self._curr_mem_snap.items():
                if self._peak_mem.get(device, 0) < snapshot["Total"]:
                    self._peak_mem[device] = snapshot["Total"]
                    self._peak_mem_snap[device] = dict(snapshot)

    return DevicePeakTracker()


class _Tracer:
    """Fake tensors, and a MemTracker that counts them: peak(fn) is the most bytes alive while fn runs."""

    def __init__(self):
        from torch._subclasses.fake_tensor import FakeTensorMode

        self.fake, self.tracker = FakeTensorMode(), _device_peak_tracker()

    def __enter__(self) -> "_Tracer":
        self.fake.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.fake.__exit__(*exc)

    def peak(self, fn) -> int:
        self.tracker.reset_mod_stats()  # MemTracker follows one pass of each module at a time
        with self.tracker:
            fn()
        return max(snap["Total"] for snap in self.tracker.get_tracker_snapshot("peak").values())

    def line(self, fn) -> Line:
        one, two = self.peak(lambda: fn(1)), self.peak(lambda: fn(2))
        return Line(one, two - one)

    def current(self) -> int:
        return sum(snap["Total"] for snap in self.tracker.get_tracker_snapshot().values())


def _tokens(rows: int, length: int) -> torch.Tensor:
    return torch.zeros(rows, length, dtype=torch.long)


def _with_gradients(model: torch.nn.Module) -> None:
    """Gradients as a micro-step after the first finds them: the earlier ones', being accumulated into."""
    for p in model.parameters():
        p.grad = torch.zeros_like(p)


def _trace_training(train: TrainConfig, config: GPTConfig, precision: str, seq_len: int, target: str,
                    sampling: tuple[int, int, int]) -> dict:
    """The training process's phases, in the order a run meets them."""
    from .hellaswag import HEAD_ROWS

    rows, prompt_tokens, max_batch_tokens = sampling
    cast = lambda: _precision_context(precision, target)  # noqa: E731 (a fresh context per use)
    dtype = DTYPES[precision]
    with _Tracer() as t:
        model = GPT(config)
        optimizers = build_optimizers(model, train, "cpu")  # (Muon's fp32 Newton-Schulz: a CPU's or a T4's)
        _with_gradients(model)
        t.tracker.track_external(model, *optimizers)
        # The first step creates the optimizer state. GradScaler's unscale_ works in place: no bytes of its own.
        optimizer = t.peak(lambda: _optimizer_step(model, optimizers, train.grad_clip))
        resident = t.current()
        scaler = torch.amp.GradScaler("cpu", enabled=precision == "fp16")
        step = t.line(lambda b: _micro_step(model, _tokens(b, seq_len), cast, scaler))
        model.eval()
        evaluation = t.line(lambda b: _no_grad_forward(model, _tokens(b, seq_len), cast))
        passes = t.tracker.reset_mod_stats  # MemTracker follows one pass of each module at a time
        hellaswag = t.peak(lambda: _hellaswag_batch(model, max_batch_tokens, HEAD_ROWS, cast, dtype, passes))
        sample = t.peak(lambda: _sample(model, rows, prompt_tokens, cast, dtype, passes))
    return dict(resident=resident, optimizer=optimizer, train=step, eval=evaluation, hellaswag=hellaswag,
                sample=sample)


def _optimizer_step(model: GPT, optimizers: list, grad_clip: float) -> None:
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    for optimizer in optimizers:
        optimizer.step()


def _micro_step(model: GPT, x: torch.Tensor, cast, scaler: torch.amp.GradScaler) -> None:
    with cast():
        _, loss = model(x, x)
    scaler.scale(loss / 2).backward()


@torch.no_grad()
def _no_grad_forward(model: GPT, x: torch.Tensor, cast) -> None:
    with cast():
        model(x, x)


@torch.no_grad()
def _hellaswag_batch(model: GPT, max_batch_tokens: int, head_rows: int, cast, dtype: torch.dtype,
                     next_pass) -> None:
    """nbgpt.hellaswag's shared-context scoring at its largest cache: contexts as long as max_batch_tokens
    and the model allow, one-token endings (N contexts of Lc tokens with N (Lc + 4) <= max_batch_tokens hold
    4 N (Lc + 1) cache slots after the rows are repeated for the 4 endings: the most any batch can)."""
    config = model.config
    context = max(1, min(config.block_size - 1, max_batch_tokens - 4))
    n = max(1, max_batch_tokens // (context + 4))
    cache = KVCache(config, n, context + 1, "cpu", dtype)
    with cast():
        last = model.hidden_states(_tokens(n, context), cache)[:, -1:]  # (N, 1, C)
        cache.repeat_rows(4)
        next_pass()
        rest = model.hidden_states(_tokens(4 * n, 1), cache)  # (4N, 1, C)
        states = torch.cat([last.repeat_interleave(4, dim=0), rest[:, :-1]], dim=1).flatten(0, 1)[:head_rows]
        F.cross_entropy(model.head(states).float(), torch.zeros(len(states), dtype=torch.long))


@torch.no_grad()
def _sample(model: GPT, rows: int, prompt_tokens: int, cast, dtype: torch.dtype, next_pass) -> None:
    """nbgpt.generate's decoding: a KV cache of the whole context for every row, the prompt's prefill (the
    LM head on its last position only) and one decoding step."""
    cache = KVCache(model.config, rows, model.config.block_size, "cpu", dtype)
    with cast():
        model(_tokens(rows, prompt_tokens), cache=cache, keep_logits=1)
        next_pass()
        model(_tokens(rows, 1), cache=cache, keep_logits=1)


def _trace_speedups(config: GPTConfig, seq_len: int, fast: torch.dtype, batch: int) -> int:
    """Peak bytes of notebook 03's speed-up cell (nbgpt.speedups) on a fresh model of `config`: its fp32 eager
    forward + backward (the second timing call accumulates into the first's gradients), its attention pair
    in the fast 16-bit dtype, and its two AdamWs (loop and fused) over the model: four moment buffers at once."""
    with _Tracer() as t:
        model = GPT(config)
        _with_gradients(model)
        t.tracker.track_external(model)
        step = t.peak(lambda: forward_backward(model, _tokens(batch, seq_len), None)())
        attention = t.peak(lambda: [f() for f in attention_pair(config, batch, seq_len, torch.device("cpu"), fast)])
        adamw = t.peak(lambda: [f() for f in adamw_pair(model)])
    return max(step, attention, adamw)


_CELL_TRACES: dict[tuple, int] = {}


def _cell_peak(config: GPTConfig, seq_len: int, fast: str, batch: int) -> int:
    key = (tuple(config.to_dict().items()), seq_len, fast, batch)
    if key not in _CELL_TRACES:
        _CELL_TRACES[key] = _trace_speedups(config, seq_len, DTYPES[fast], batch)
    return _CELL_TRACES[key]


def speedup_cell(config: GPTConfig, seq_len: int, fast: str, batch: int, gpu_memory_gib: float) -> SpeedupCell:
    """What notebook 03's speed-up cell times on a GPU of `gpu_memory_gib`, at `batch` sequences of `seq_len`
    with `fast` ("bf16" or "fp16") autocast: the whole model when its traced peak fits the plan's budget,
    else the deepest stand-in of fewer layers that does (the peak grows about linearly with depth, which
    picks the first guess; every guess is traced), else nothing."""
    budget = budget_gib(gpu_memory_gib)
    peak = lambda layers: _cell_peak(replace(config, n_layer=layers), seq_len, fast, batch) / GIB  # noqa: E731
    whole, layers = peak(config.n_layer), config.n_layer
    if whole > budget:
        one = peak(1)
        per_layer = (whole - one) / max(config.n_layer - 1, 1)
        layers = 0 if one > budget else min(config.n_layer - 1, 1 + int((budget - one) // per_layer))
        while layers > 1 and peak(layers) > budget:
            layers -= 1
        while 0 < layers < config.n_layer - 1 and peak(layers + 1) <= budget:
            layers += 1
    return SpeedupCell(config.n_layer, layers, whole, peak(layers) if layers else 0.0, budget)


def speedup_cell_for(train: TrainConfig, gpu_memory_gib: float | None = None) -> SpeedupCell | None:
    """What notebook 03's speed-up table (nbgpt.speedups) should time for `train` on a GPU of `gpu_memory_gib`
    (this GPU's when None); None off a GPU with no size given: a CPU times the whole model, its memory being
    the machine's."""
    config, batch, seq_len, fast, device = cell_shapes(train)
    if gpu_memory_gib is None and device.type == "cuda":
        gpu_memory_gib = torch.cuda.get_device_properties(device).total_memory / GIB
    if gpu_memory_gib is None:
        return None
    return speedup_cell(config, seq_len, "fp16" if fast == "fp16" else "bf16", batch, gpu_memory_gib)


_TRACES: dict[tuple, Traced] = {}  # one trace per process for each distinct question


def trace(train: TrainConfig, config: GPTConfig, precision: str, seq_len: int, target: str = "cuda",
          sampling: tuple[int, int, int] = (1, 8, 4096)) -> Traced:
    """Every phase of `train` with model `config` in `precision`, as on a `target` ("cuda" or "cpu") device;
    sampling = (rows decoded at once, prompt tokens, HellaSwag's max_batch_tokens)."""
    key = (tuple(config.to_dict().items()), train.optimizer, train.grad_clip, precision, seq_len, target, sampling)
    if key not in _TRACES:
        _TRACES[key] = Traced(**_trace_training(train, config, precision, seq_len, target, sampling))
    return _TRACES[key]


# -------------------------------------------------------------------------------------------------------- plans

@dataclass
class MemoryPlan:
    """Per-GPU peaks (GiB) of every phase of a run at the micro-batch it will use, and whether they fit."""

    gpu: str
    gpu_memory_gib: float  # the card's total memory, as torch reports it
    budget_gib: float  # what the plan lets torch use: (total - NON_TORCH_GIB) × (1 - MARGIN)
    nproc: int
    precision: str
    compile: bool
    sequences_per_rank: int  # per optimizer step: micro_batch × accumulation steps
    micro_batch: int | None  # None: not even one sequence fits
    why: str
    phases: dict[str, float] = field(default_factory=dict)
    fits: bool = False
    peak_at_one_gib: float = 0.0  # the least this run can need: every phase at micro-batch 1
    peak_at_one: str = ""  # the same, with the phase that sets it ("23.9 GiB in train_eager")
    notes: tuple[str, ...] = ()
    parallel: str = "ddp"  # what was priced: "ddp" (a whole replica per GPU), "fsdp" (a shard), "one process"
    instead: str = ""  # under ddp, when it does not fit and fsdp would: what fsdp needs
    speedup_layers: int = 0  # the layers notebook 03's speed-up cell times on this GPU (see speedup_cell)

    @property
    def peak_gib(self) -> float:
        return max(self.phases.values()) if self.phases else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "notes": list(self.notes), "peak_gib": round(self.peak_gib, 2),
                "margin_gib": round(self.budget_gib - self.peak_gib, 2), "margin_fraction": MARGIN,
                "non_torch_gib": NON_TORCH_GIB}


def budget_gib(gpu_memory_gib: float) -> float:
    return max(0.0, (gpu_memory_gib - NON_TORCH_GIB) * (1 - MARGIN))


@dataclass(frozen=True)
class RankShare:
    """What FSDP over `ranks` processes changes in one rank's bytes, from the model's shapes (nbgpt.distributed:
    each block a unit of its own, then the root; weights gathered in the run's 16-bit dtype)."""

    ranks: int
    weights: int  # the whole model's fp32 weights: 4 bytes per parameter
    gathered: int  # weights alive unsharded at once: the running block, the prefetched one, the root's
    block_grads: int  # one block's fp32 gradients before their reduce-scatter (a single micro-step)
    matrix: int  # Muon orthogonalises a whole matrix: the largest, gathered in fp32 (0 under AdamW)


def rank_share(config: GPTConfig, precision: str, ranks: int, optimizer: str) -> RankShare:
    with torch.device("meta"):
        model = GPT(config)
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    block, total = count(model.h[0]), count(model)
    gathered_bytes = DTYPES[precision].itemsize
    matrix = max(p.numel() for p in model.h[0].parameters() if p.ndim == 2) * 4 if optimizer == "muon" else 0
    return RankShare(ranks, 4 * total, gathered_bytes * (2 * block + total - config.n_layer * block), 4 * block, matrix)


def sharded(traced: Traced, shards: RankShare, accumulating: bool) -> Traced:
    """One FSDP rank's peaks from the single-process trace: its resident state (weights, gradients, optimizer
    moments) becomes 1/ranks of it plus the gathered weights; while micro-steps accumulate (gradient sync off)
    every rank also holds the whole model's gradients unsharded in fp32, else one block's before its
    reduce-scatter. Activations, caches and the optimizer's temporaries stay as traced (the 16-bit weight
    copies the trace's autocast keeps are counted too: an upper bound). Mid-training HellaSwag and samples
    run through the sharded model (nbgpt.distributed.root_gathered): like validation, a shard and what it gathers."""
    resident = traced.resident // shards.ranks + shards.gathered
    delta = resident - traced.resident
    grads = shards.weights if accumulating else shards.block_grads
    return Traced(resident, traced.optimizer - traced.resident + traced.resident // shards.ranks + shards.matrix,
                  Line(traced.train.at_one + delta + grads, traced.train.per_sample),
                  Line(traced.eval.at_one + delta, traced.eval.per_sample), traced.hellaswag + delta,
                  traced.sample + delta)


def phases_at(traced: Traced, batch: int, speedups_gib: float) -> dict[str, float]:
    """GiB per phase at micro-batch `batch`; the speed-up cell's peak is given (see speedup_cell)."""
    train = max(traced.train(batch), traced.optimizer)
    found = dict(train_eager=train, train_compiled=train, eval=traced.eval(batch), hellaswag=traced.hellaswag,
                 sample=traced.sample)
    return {**{name: round(found[name] / GIB, 2) for name in found}, "speedups": round(speedups_gib, 2)}


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def choose_micro_batch(price, sequences: int, budget: float, asked: int | str) -> tuple[int | None, str]:
    """The micro-batch a run uses and why: `asked` when it is a number, else the largest divisor of the
    per-rank sequences per step whose every phase fits the budget (GiB); price(batch) = GiB per phase."""
    if asked != AUTO:
        return asked, f"micro_batch={asked} as set"
    for batch in reversed(divisors(sequences)):
        if max(price(batch).values()) <= budget:
            larger = [d for d in divisors(sequences) if d > batch]
            beyond = f"; {larger[0]} would need {peak_phase(price(larger[0]))}" if larger else ""
            return batch, (f"micro_batch=auto: {batch}, the largest divisor of the {sequences} "
                           f"sequence{'s' if sequences != 1 else ''} per GPU "
                           f"per step whose peak fits {budget:.1f} GiB{beyond}")
    return None, (f"micro_batch=auto: not even 1 sequence per micro-step fits {budget:.1f} GiB "
                  f"({peak_phase(price(1))})")


def peak_phase(phases: dict[str, float]) -> str:
    """'23.9 GiB in train_eager': the phase that sets the peak, so a plan that does not fit says what to change."""
    name = max(phases, key=phases.get)
    return f"{phases[name]:.1f} GiB in {name}"


def plan_for(train: TrainConfig, vocab_size: int, nproc: int, precision: str, gpu: str, gpu_memory_gib: float,
             sampling: tuple[int, int, int] = (1, 8, 4096)) -> MemoryPlan:
    """The plan of `train` on `nproc` GPUs of `gpu_memory_gib` each (the core of plan_memory and of
    micro_batch="auto" at train start)."""
    config = train.model_config(vocab_size)
    seq_len, _ = train.batch_layout(config.block_size, nproc, micro_batch=1)
    sequences = train.total_batch_tokens // (seq_len * nproc)
    traced = trace(train, config, precision, seq_len, "cuda", sampling)
    parallel = train.parallel if nproc > 1 else "one process"
    # notebook 03's cell, at the shapes it times on a GPU; it sizes its model to the card, whatever the run's
    cell = speedup_cell(config, train.seq_len or config.block_size, "fp16" if precision == "fp16" else "bf16",
                        timing_micro_batch(train.micro_batch, "cuda"), gpu_memory_gib)
    price, notes = pricer(traced, config, train, precision, nproc, sequences, cell.peak_gib)
    budget = budget_gib(gpu_memory_gib)
    micro_batch, why = choose_micro_batch(price, sequences, budget, train.micro_batch)
    phases = price(micro_batch or 1)
    notes += () if cell.layers == cell.n_layer else (f"notebook 03's speed-up cell times {cell.timed_on}",)
    return MemoryPlan(gpu, round(gpu_memory_gib, 2), round(budget, 2), nproc, precision, train.compile, sequences,
                      micro_batch, why, phases, micro_batch is not None and max(phases.values()) <= budget,
                      max(price(1).values()), peak_phase(price(1)), (COMPILED_MODEL, *notes), parallel,
                      speedup_layers=cell.layers)


def pricer(traced: Traced, config: GPTConfig, train: TrainConfig, precision: str, nproc: int, sequences: int,
           speedups_gib: float):
    """(price, notes): price(batch) = GiB per phase on one GPU of the run's parallel layout at micro-batch
    `batch` (a whole replica under DDP or in one process, a shard under FSDP), and what the figures count."""
    if train.parallel != "fsdp" or nproc == 1:
        return (lambda batch: phases_at(traced, batch, speedups_gib)), (
            f"eval, hellaswag and sample are counted with the training state resident ({traced.resident / GIB:.2f} "
            f"GiB: weights, gradients, optimizer state)",)
    shards = rank_share(config, precision, nproc, train.optimizer)
    return (lambda batch: phases_at(sharded(traced, shards, sequences // batch > 1), batch, speedups_gib)), (
        f"fsdp over {nproc} GPUs, modelled from the one-process trace: 1/{nproc} of its resident state "
        f"({traced.resident / GIB:.2f} GiB), {shards.gathered / GIB:.2f} GiB of gathered weights (two blocks and "
        f"the root), {shards.weights / GIB:.2f} GiB of unsharded fp32 gradients while micro-steps accumulate, "
        f"activations as one process's",)


def target_gpu(gpu: str | None, gpu_memory_gib: float | None) -> tuple[str, float, bool]:
    """(name, total GiB, has bf16) of the GPU a plan is for: a known name, a size, or this machine's GPU."""
    if gpu_memory_gib is not None:
        if not gpu_memory_gib > 0:
            raise ConfigError(f"--gpu-memory must be a positive number of GiB, got {gpu_memory_gib}")
        name = find_gpu(gpu) if gpu else f"{gpu_memory_gib:g} GiB GPU"
        return name, gpu_memory_gib, KNOWN_GPUS[name][1] if gpu else True
    if gpu:
        name = find_gpu(gpu)
        return name, KNOWN_GPUS[name][0], KNOWN_GPUS[name][1]
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return props.name, props.total_memory / GIB, props.major >= 8
    raise ConfigError("no GPU to plan for: this machine has none; name one with --gpu (e.g. --gpu a100-40gb) "
                      "or give its memory with --gpu-memory GiB")


def plan_memory(run: RunConfig, gpu: str | None = None, gpu_memory_gib: float | None = None) -> MemoryPlan:
    """Peak memory per GPU of every phase of `run` on `gpu` (a KNOWN_GPUS name or alias) or on a card of
    `gpu_memory_gib`, or on this machine's first GPU when neither is given; the micro-batch it will use."""
    name, memory, has_bf16 = target_gpu(gpu, gpu_memory_gib)
    train = run.train
    precision = train.precision if train.precision != "auto" else ("bf16" if has_bf16 else "fp16")
    if precision == "bf16" and not has_bf16:
        raise ConfigError(f"precision=bf16 on a {name}, which has no native bf16: use fp16 (or auto)")
    vocab = VOCAB.get(run.prepare.tokenizer, VOCAB["gpt2"])
    prompt_tokens = max(1, min(len(run.sample.prompt), train.model_config(vocab).block_size - 1))  # tokens <= chars
    sampling = (run.sample.num_return_sequences, prompt_tokens, run.hellaswag.max_batch_tokens)
    plan = plan_for(train, vocab, run.nproc, precision, name, memory, sampling)
    if plan.parallel == "ddp" and not plan.fits:  # the user's setting stays; the plan only says what fsdp would do
        sharded_plan = plan_for(replace(train, parallel="fsdp"), vocab, run.nproc, precision, name, memory, sampling)
        if sharded_plan.fits:
            plan.instead = (f"-p parallel fsdp fits: micro_batch {sharded_plan.micro_batch}, peak "
                            f"{sharded_plan.peak_gib:.2f} GiB of {sharded_plan.budget_gib:.2f} GiB usable per GPU")
    return plan


def resolve_micro_batch(train: TrainConfig, vocab_size: int, world_size: int, device: torch.device,
                        precision: str) -> tuple[int, str]:
    """(micro_batch, why) for a trainer: a number stays; "auto" on a GPU is the plan's choice for the card
    this rank has, and off a GPU the largest divisor of the per-rank sequences up to CPU_AUTO_MICRO_BATCH
    (a CPU's memory is rarely the limit, its throughput stops growing long before; no trace needed)."""
    if train.micro_batch != AUTO:
        return train.micro_batch, f"micro_batch={train.micro_batch} as set"
    seq_len, _ = train.batch_layout(train.model_config(vocab_size).block_size, world_size, micro_batch=1)
    sequences = train.total_batch_tokens // (seq_len * world_size)
    if device.type != "cuda":
        batch = max(d for d in divisors(sequences) if d <= CPU_AUTO_MICRO_BATCH)
        return batch, (f"micro_batch=auto on {device.type}: {batch}, the largest divisor of the {sequences} "
                       f"sequences per process per step up to {CPU_AUTO_MICRO_BATCH}")
    props = torch.cuda.get_device_properties(device)
    plan = plan_for(train, vocab_size, world_size, precision, props.name, props.total_memory / GIB)
    if plan.micro_batch is None:
        raise ConfigError(f"the model does not fit this {props.name}: {plan.why}; use a smaller model or seq_len")
    return plan.micro_batch, f"{plan.why} (this {props.name}: {props.total_memory / GIB:.1f} GiB)"


def refuse_unfit(run: RunConfig, gpu: str | None = None, gpu_memory_gib: float | None = None) -> None:
    """ConfigError, one line, when not even micro-batch 1 fits the target GPU (this machine's when none is
    named); nothing when the run will not train on a GPU this machine has."""
    if gpu is None and gpu_memory_gib is None and resolve_device(run.train.device).type != "cuda":
        return
    plan = plan_memory(run, gpu, gpu_memory_gib)
    if plan.peak_at_one_gib > plan.budget_gib:
        raise ConfigError(f"the model does not fit a {plan.gpu} ({plan.gpu_memory_gib:g} GiB) even at micro_batch=1: "
                          f"{plan.peak_at_one} needed, {plan.budget_gib:.1f} GiB usable; use a smaller "
                          f"model or seq_len, or a larger GPU (nbgpt plan shows every phase)")
