"""Shared by the bench scripts: timing with medians, and reporting as JSON plus a readable table."""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out"
sys.path.insert(0, str(ROOT))


def median_time(fn: Callable[[], object], repeats: int = 3, warmup: int = 1) -> tuple[float, list[float]]:
    """Median wall seconds of `fn` over `repeats` runs after `warmup` untimed runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def machine() -> dict:
    """The CPU facts every figure is recorded with: its instruction set as torch uses it, whether oneDNN
    reports native bf16, how much faster a bf16 matmul measured than fp32, and any emulation variables."""
    import torch

    from nbgpt.device import cpu_matmul_speedup, cpu_has_native_bf16

    emulation = {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA") if k in os.environ}
    return {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "native_bf16": cpu_has_native_bf16(),
            "bf16_speedup": round(cpu_matmul_speedup(), 3), "emulation": emulation, "threads": torch.get_num_threads(),
            "load": os.getloadavg()[0]}


def cpu_precisions() -> list[str]:
    """The precisions worth timing on this CPU: fp32, and bf16 where it is measured faster (where it is
    emulated, a bf16 run would take hours and show only what `auto` already avoids)."""
    import torch

    from nbgpt.device import choose_precision

    return ["fp32", "bf16"] if choose_precision(torch.device("cpu")) == "bf16" else ["fp32"]


def report(name: str, rows: list[dict], extra: dict | None = None) -> None:
    """Print rows as JSON (one object) and as a table, and keep the JSON under bench/out/ (named after the
    CPU capability, so AVX-512 and AVX2 figures are kept side by side)."""
    facts = machine()
    print(f"machine: {facts}")
    payload = {"bench": name, "machine": facts, "rows": rows, **(extra or {})}
    name = f"{name}-{facts['cpu_capability'].lower()}"
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{name}.json").write_text(json.dumps(payload, indent=2))
    print(json.dumps(payload))
    columns = list(dict.fromkeys(k for row in rows for k in row))
    cells = [[_fmt(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print(" | ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("-|-".join("-" * w for w in widths))
    for r in cells:
        print(" | ".join(v.ljust(w) for v, w in zip(r, widths)))


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)
