"""``precision: auto | fp32 | bf16``: which number format a run computes in, chosen for the machine.

bf16 means DeepSpeed's bf16 mixed precision: the engines hold bf16 weights (rollouts, scoring and the
update's forward and backward run in bf16) while the optimizer keeps fp32 master weights and fp32
Adam moments. It pays off only where the hardware multiplies bf16 matrices natively: a GPU, or a
CPU with AMX (``amx_bf16``) or AVX512-BF16 (``avx512_bf16``). Elsewhere torch emulates bf16 and a
matrix product is slower than in fp32, so ``auto`` picks fp32 there.

The choice is made from the CPU's feature flags (or the GPU), never from a timing, so every rank of a
run on identical machines makes the same choice. A short probe (two matrix products per format, well
under a second) measures what the choice buys on this machine; its figures are printed and logged.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from aapo_app.errors import AapoError

PRECISIONS = ("auto", "fp32", "bf16")
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")  # native bf16 matrix instructions


@dataclass
class PrecisionChoice:
    """The resolved precision (``fp32`` or ``bf16``), why, and the probe's figures (GFLOP/s)."""

    name: str
    reason: str
    fp32_gflops: float | None = None
    bf16_gflops: float | None = None

    @property
    def bf16(self) -> bool:
        return self.name == "bf16"

    def describe(self) -> str:
        text = f"precision: {self.name} ({self.reason}"
        if self.fp32_gflops and self.bf16_gflops:
            text += (f"; matmul probe: bf16 {self.bf16_gflops:.0f} GFLOP/s, fp32 {self.fp32_gflops:.0f} GFLOP/s, "
                     f"{self.bf16_gflops / self.fp32_gflops:.1f}x")
        return text + ")"

    def as_dict(self) -> dict:
        return asdict(self)


def cpu_flags() -> set[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (empty where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def bf16_hardware(flags: set[str] | None = None, cuda: bool | None = None) -> str | None:
    """What multiplies bf16 matrices natively: ``"cuda"``, the CPU flag that does, or None (by
    default this machine's; ``flags``/``cuda`` describe another)."""
    if cuda is None:
        cuda = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if cuda:
        return "cuda"
    flags = cpu_flags() if flags is None else flags
    return next((f for f in BF16_CPU_FLAGS if f in flags), None)


def matmul_gflops(dtype: torch.dtype, n: int = 512, reps: int = 3) -> float:
    """Best of ``reps`` ``n x n`` matrix products in ``dtype`` on this rank's device (GFLOP/s)."""
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b  # warm-up (kernel selection)
    best = float("inf")
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / max(best, 1e-9) / 1e9


def ds_precision(ds: dict) -> bool | None:
    """What a DeepSpeed config says about bf16: True/False where it sets ``bf16.enabled``, None where
    it leaves it to the run (absent or ``"auto"``)."""
    value = ds.get("bf16", {}).get("enabled", "auto")
    return None if value == "auto" else bool(value)


_THIS_MACHINE = object()


def leaves_precision_to_the_run(ds: dict) -> bool:
    """Whether a DeepSpeed config leaves its number format to ``precision`` (no bf16 or fp16 set)."""
    return ds_precision(ds) is None and ds.get("fp16", {}).get("enabled") is not True


def resolve_precision(choice: str, policy_ds: dict, *, probe: bool = True,
                      hardware: str | None | object = _THIS_MACHINE) -> PrecisionChoice:
    """The run's precision from ``choice`` and what the policy's DeepSpeed config already says.

    An explicit ``bf16.enabled`` in a DeepSpeed config (a resumed run's recorded config, or a file
    the user wrote) wins over ``auto`` and must agree with an explicit ``fp32``/``bf16``. ``hardware``:
    what :func:`bf16_hardware` returns (default: asks this machine)."""
    if choice not in PRECISIONS:
        raise AapoError(f"precision must be one of {', '.join(PRECISIONS)} (got {choice!r})")
    fp16 = policy_ds.get("fp16", {}).get("enabled") is True
    if fp16:
        if choice == "bf16":
            raise AapoError("precision=bf16 but the DeepSpeed config enables fp16; set fp16.enabled to false or "
                            "precision=fp32")
        return PrecisionChoice("fp16", "the DeepSpeed config enables fp16")
    from_ds = ds_precision(policy_ds)
    if from_ds is not None and choice != "auto" and from_ds != (choice == "bf16"):
        raise AapoError(f"precision={choice} disagrees with the DeepSpeed config's bf16.enabled={str(from_ds).lower()}; "
                        f"set bf16.enabled to \"auto\" in the file or precision=auto")
    hardware = bf16_hardware() if hardware is _THIS_MACHINE else hardware
    if from_ds is not None:
        name, reason = ("bf16" if from_ds else "fp32"), "set by the DeepSpeed config's bf16.enabled"
    elif choice != "auto":
        name, reason = choice, "asked for"
        if choice == "bf16" and hardware is None:
            reason += "; this machine has no bf16 matrix units (no GPU, AMX or AVX512-BF16): slower than fp32 here"
    elif hardware is not None:
        name = "bf16"
        reason = "auto: a GPU" if hardware == "cuda" else f"auto: the CPU has {hardware}"
    else:
        name, reason = "fp32", "auto: no GPU and no bf16 matrix units in the CPU (AMX or AVX512-BF16)"
    result = PrecisionChoice(name, reason)
    if probe:
        result.fp32_gflops = matmul_gflops(torch.float32)
        result.bf16_gflops = matmul_gflops(torch.bfloat16)
    return result


def apply_precision(ds: dict, precision: PrecisionChoice) -> dict:
    """``ds`` with ``bf16.enabled`` set to the resolved precision (fp16 configs are left alone)."""
    if precision.name != "fp16":
        ds = {**ds, "bf16": {**ds.get("bf16", {}), "enabled": precision.bf16}}
    return ds
