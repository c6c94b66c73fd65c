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
    threads = torch.get_num_threads()
    return f"{name}, {threads} thread{'' if threads == 1 else 's'}"


def write_results(out: str, res: dict, text: str) -> None:
    """Print the markdown summary and write ``<out>.json`` (every figure) and ``<out>.md``."""
    import json

    print("\n" + text)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out + ".json").write_text(json.dumps(res, indent=1))
    Path(out + ".md").write_text(text + "\n")


def free_port() -> int:
    """A free TCP port on localhost, for a torchrun rendezvous."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def held_bytes(module: torch.nn.Module) -> int:
    """Bytes of parameters this rank holds: its ZeRO-3 partition (``ds_tensor``) where partitioned."""
    return sum(nbytes(p.ds_tensor) if hasattr(p, "ds_tensor") else nbytes(p.data) for p in module.parameters())


def optimizer_bytes(engine) -> tuple[int, int]:
    """(master weights, moments) the engine's optimizer holds on this rank, in bytes."""
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)  # DeepSpeed wraps torch's
    master = sum(nbytes(p) for group in inner.param_groups for p in group["params"])
    moments = sum(nbytes(v) for state in inner.state.values() for v in state.values()
                  if torch.is_tensor(v) and v.dim() > 0)
    return master, moments


def one_training_step(engine, rank: int, vocab: int) -> None:
    """One backward and optimizer step of ``engine`` on 4 random sequences of 24 tokens (the last 16
    scored), seeded by rank: after it the optimizer holds its state."""
    from aapo_app.engine import completion_logprobs

    g = torch.Generator().manual_seed(rank)
    seq = torch.randint(10, min(vocab, 1000), (4, 24), generator=g)
    mask = torch.ones_like(seq, dtype=torch.bool)
    loss = -completion_logprobs(engine, seq, mask, 8, 1.0).mean()
    engine.backward(loss)
    engine.step()
