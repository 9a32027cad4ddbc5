"""Which device, which precision, and how fast the hardware can go.

Precision rules (overridable with precision="fp32"|"bf16"|"fp16"):
- CUDA with compute capability >= 8.0 (A100, H100, RTX 30xx+): bf16 autocast, TF32 for fp32 matmuls.
- older CUDA (T4, V100): fp16 autocast with a GradScaler. `torch.cuda.is_bf16_supported()` answers True on a
  T4 because bf16 can be emulated, but emulated bf16 is far slower than fp16, so capability decides.
- CPU: bf16 autocast when a short measured bf16 matmul is faster than the same fp32 one (CPUs with
  AVX512-BF16 or AMX: ~4x faster), else fp32. CPU flags alone can mislead: without native support bf16 is
  emulated and runs 10-600x slower than fp32, and a build or an environment (ONEDNN_MAX_CPU_ISA) can
  withhold an instruction set the CPU has.
"""

from __future__ import annotations

import contextlib
import functools
import time
import warnings

import torch

from .knobs import ConfigWarning
from .errors import NbgptError

PRECISIONS = ("fp32", "bf16", "fp16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Dense (no 2:4 sparsity) peak FLOP/s per precision, for MFU, keyed by the exact name torch.cuda.get_device_name
# gives: a name missing here (a MIG slice, a card not listed) has no known peak, and MFU is reported as unknown
# rather than borrowed from a similar name (an L40S is not an L4, an H100 PCIe not an SXM). "fp32" is the TF32
# tensor-core figure where the card has TF32 (configure_backends turns it on), plain FP32 on the T4 and V100,
# which also have no bf16. Datasheets list tensor figures with sparsity, twice the dense ones used here.
# Sources, NVIDIA datasheets: H100 (SXM5 "80GB HBM3", NVL; 2024 edition), H100 PCIe (2022 edition), H200 (SXM,
# NVL), A100 (SXM4 and PCIe, 40/80 GB alike), A10, L4, L40S, T4, V100 (SXM2, PCIe). The A10G, AWS's variant of
# the A10, has no public NVIDIA datasheet: the figures quoted for AWS's G5 instances (FP32 35, BF16 tensor 70
# TFLOP/s dense), as tabulated in Baseten's "NVIDIA A10 vs A10G for ML model inference".
_H100_SXM = {"bf16": 989e12, "fp16": 989e12, "fp32": 494e12}
_H100_NVL = {"bf16": 835e12, "fp16": 835e12, "fp32": 417e12}
_A100 = {"bf16": 312e12, "fp16": 312e12, "fp32": 156e12}
_V100_SXM2 = {"fp16": 125e12, "fp32": 15.7e12}
_V100_PCIE = {"fp16": 112e12, "fp32": 14e12}
GPU_PEAK_FLOPS = {
    "NVIDIA H100 80GB HBM3": _H100_SXM,
    "NVIDIA H100 NVL": _H100_NVL,
    "NVIDIA H100 PCIe": {"bf16": 756e12, "fp16": 756e12, "fp32": 378e12},
    "NVIDIA H200": _H100_SXM,  # the H100 SXM's compute with more and faster memory
    "NVIDIA H200 NVL": _H100_NVL,
    "NVIDIA A100-SXM4-40GB": _A100,
    "NVIDIA A100-SXM4-80GB": _A100,
    "NVIDIA A100-PCIE-40GB": _A100,
    "NVIDIA A100 80GB PCIe": _A100,
    "NVIDIA A10": {"bf16": 125e12, "fp16": 125e12, "fp32": 62.5e12},
    "NVIDIA A10G": {"bf16": 70e12, "fp16": 70e12, "fp32": 35e12},
    "NVIDIA L4": {"bf16": 121e12, "fp16": 121e12, "fp32": 60e12},
    "NVIDIA L40S": {"bf16": 362e12, "fp16": 362e12, "fp32": 183e12},
    "Tesla T4": {"fp16": 65e12, "fp32": 8.1e12},
    "Tesla V100-SXM2-16GB": _V100_SXM2,
    "Tesla V100-SXM2-32GB": _V100_SXM2,
    "Tesla V100-PCIE-16GB": _V100_PCIE,
    "Tesla V100-PCIE-32GB": _V100_PCIE,
}


class DeviceError(NbgptError, ValueError):
    """A device or precision that this machine cannot provide."""


def resolve_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device={requested!r} but torch sees no CUDA GPU (torch {torch.__version__}); "
                          f"use device='cpu' or install a CUDA build of torch")
    return device


def cpu_has_native_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


@functools.lru_cache(maxsize=None)
def cpu_matmul_speedup(dtype: torch.dtype = torch.bfloat16, size: int = 256) -> float:
    """How many times faster a (size × size) matmul in `dtype` runs than an fp32 one on one core of this CPU,
    measured once per process and dtype: bf16 ~3.6 with AVX512-BF16, ~0.005 where it is emulated (AVX2).
    Takes ~20 ms on the former, a few tenths of a second on the latter.

    One thread, the two dtypes in alternation, and each one's fastest run: a busy machine that takes the
    core away for a moment slows single runs, not the best of several. The operands are deterministic (no
    random draws), so measuring never disturbs a seeded run.
    """
    operands = {kind: (torch.arange(size * size, dtype=torch.float32).reshape(size, size) % 7 / 7).to(kind)
                for kind in (torch.float32, dtype)}
    best = {kind: float("inf") for kind in operands}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for kind, a in operands.items():
            torch.mm(a, a)  # warm-up: oneDNN picks and caches its kernel on the first call
        started = time.perf_counter()
        for rounds in range(1, 21):
            for kind, a in operands.items():
                start = time.perf_counter()
                torch.mm(a, a)
                best[kind] = min(best[kind], time.perf_counter() - start)
            if rounds >= 3 and time.perf_counter() - started > 0.02:
                break
    finally:
        torch.set_num_threads(threads)
    return best[torch.float32] / best[dtype]


def emulated(device: torch.device, precision: str) -> bool:
    """Whether this is a CPU that only emulates `precision`: its measured matmul runs slower than fp32's."""
    return device.type == "cpu" and precision != "fp32" and cpu_matmul_speedup(DTYPES[precision]) < 1.0


def choose_precision(device: torch.device, requested: str = "auto") -> str:
    """What `requested` (auto, or one of PRECISIONS: checked where it is configured, nbgpt.run_config) runs
    as on `device`."""
    if device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(device)
        if requested == "auto":
            return "bf16" if major >= 8 else "fp16"
        if requested == "bf16" and major < 8:
            raise DeviceError(f"{torch.cuda.get_device_name(device)} (compute capability {major}.x) has no native "
                              f"bf16; use precision='fp16' (with a GradScaler) or 'fp32'")
        return requested
    if requested == "auto":
        return "bf16" if device.type == "cpu" and cpu_matmul_speedup(torch.bfloat16) > 1.0 else "fp32"
    if emulated(device, requested):
        speedup = cpu_matmul_speedup(DTYPES[requested])
        warnings.warn(f"precision={requested!r} runs this CPU's matmuls at {speedup:.2g}× the speed of fp32 (no "
                      f"native {requested}: it is emulated); precision='auto' picks fp32 here", ConfigWarning,
                      stacklevel=2)
    return requested


def fast_dtype(device: torch.device) -> torch.dtype:
    """The dtype for internal matmuls that need no more precision (Muon's orthogonalisation): bf16 where
    "auto" picks bf16 for this device (CPUs with fast bf16, CUDA >= 8.0), fp32 elsewhere, the T4 included
    (Muon is published and tested with bf16 or fp32; the optimizer step is a small share of a GPU step)."""
    return torch.bfloat16 if choose_precision(device, "auto") == "bf16" else torch.float32


def configure_backends(device: torch.device) -> None:
    """TF32 matmuls on Ampere+: fp32 matmuls at tensor-core speed with a 10-bit mantissa, as GPT-2 training
    tolerates. The default matmul precision elsewhere stays 'highest'."""
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
        torch.backends.cudnn.allow_tf32 = True


def autocast(device: torch.device, precision: str):
    """The forward-pass context for `precision`: autocast to bf16/fp16, or nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@functools.lru_cache(maxsize=None)
def measured_matmul_flops(device_type: str, precision: str, max_size: int = 2048, seconds: float = 0.5) -> float:
    """FLOP/s of a square matmul in `precision`: the practical peak of this machine (used for CPU MFU).

    The size doubles from 256 until one matmul takes over 20 ms or reaches `max_size`, so a precision
    the hardware only emulates (fp16 on most CPUs) is measured in a fraction of a second too.
    """
    device = torch.device(device_type)
    dtype = DTYPES[precision]
    # A private generator: the global RNG belongs to training (dropout, data order), and this draws a
    # timing-dependent number of times, which would make runs irreproducible and resumes inexact.
    generator = torch.Generator(device=device).manual_seed(0)
    size = 256
    while True:
        a = torch.randn(size, size, device=device, generator=generator).to(dtype)
        b = torch.randn(size, size, device=device, generator=generator).to(dtype)
        torch.mm(a, b)
        synchronize(device)
        start = time.perf_counter()
        torch.mm(a, b)
        synchronize(device)
        if time.perf_counter() - start > 0.02 or size >= max_size:
            break
        size *= 2
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        torch.mm(a, b)
        runs += 1
    synchronize(device)
    return 2 * size ** 3 * runs / (time.perf_counter() - start)


def gpu_peak_flops(name: str, precision: str) -> float | None:
    """The datasheet peak of the GPU torch calls `name`, in `precision`; None where the table has no figure."""
    return GPU_PEAK_FLOPS.get(name, {}).get(precision)


def peak_flops(device: torch.device, precision: str) -> float | None:
    """Peak FLOP/s for MFU: the datasheet figure of a known GPU (None for any other GPU: MFU unknown, never a
    wrong figure), else a measured matmul peak.

    A precision a CPU only emulates is no peak (training in it beats its own slow matmul, and MFU would read
    300 %): there the machine's best is fp32, so that is what MFU compares with."""
    if device.type == "cuda":
        return gpu_peak_flops(torch.cuda.get_device_name(device), precision)
    if emulated(device, precision):
        precision = "fp32"
    return measured_matmul_flops(device.type, precision)
