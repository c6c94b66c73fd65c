"""What the benchmark scripts share: the machine's name and its measured peak matmul rate."""

from __future__ import annotations

import platform
import time
from pathlib import Path

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_matmul_gflops(dtype: torch.dtype, device: torch.device, n: int = 2048, reps: int = 5,
                       budget_s: float = 5.0) -> float:
    """Best of up to ``reps`` square matrix products of size ``n`` (GFLOP/s), within ``budget_s``."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    best, spent = float("inf"), 0.0
    for _ in range(reps + 1):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        took = time.perf_counter() - start
        best, spent = min(best, took), spent + took
        if spent > budget_s:
            break
    return 2 * n**3 / best / 1e9


def read_gbps(device: torch.device, gigabytes: float = 0.5, reps: int = 5) -> float:
    """Best memory read rate of ``reps`` sums over a ``gigabytes`` fp32 tensor (GB/s, 1e9 bytes)."""
    x = torch.ones(int(gigabytes * 1e9 / 4), device=device)
    best = float("inf")
    for _ in range(reps + 1):
        sync(device)
        start = time.perf_counter()
        x.sum()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return x.numel() * 4 / best / 1e9


def cpu_flags_text() -> str:
    """Which bf16 matrix instructions the CPU has (the figures depend on them)."""
    from aapo_app.precision import cpu_flags

    flags = cpu_flags()
    return ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16"))


def machine(device: torch.device) -> str:
    """The GPU's name, or the CPU model and the number of torch threads."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(0)
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {torch.get_num_threads()} threads"


def write_results(out: str, res: dict, text: str) -> None:
    """Print the markdown summary and write ``<out>.json`` (every figure) and ``<out>.md``."""
    import json

    print("\n" + text)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out + ".json").write_text(json.dumps(res, indent=1))
    Path(out + ".md").write_text(text + "\n")
