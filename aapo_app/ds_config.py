"""DeepSpeed configs: read a JSON file and fill its ``"auto"`` fields from the run config.

Batch sizes, learning rate, clipping and warm-up come from the run config so the two can never
disagree: a number written in the DeepSpeed file that differs from the run config is an error.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

from aapo_app.errors import AapoError

# The default configs ship inside the package (package data), so an installed copy finds them; the
# repository's top-level ds_configs/ holds the same files (a test keeps them byte-identical) with
# their README.
PACKAGED_DS_CONFIGS = Path(__file__).resolve().parent / "ds_configs"
DEFAULT_POLICY_CONFIG = "zero3_cpu.json"
DEFAULT_REFERENCE_CONFIG = "zero3_inference_cpu.json"
DEFAULT_EVAL_CONFIG_GPU = "zero3_inference_bf16.json"


def read_ds_config(path: str | Path | None, default_name: str, option: str = "--ds-config") -> dict:
    path = Path(path) if path else PACKAGED_DS_CONFIGS / default_name
    if not path.is_file():
        raise AapoError(f"{option}: no DeepSpeed config at '{path}'; give a JSON file (see ds_configs/)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AapoError(f"{option}: '{path}' is not valid JSON ({exc}); fix the syntax") from exc
    if not isinstance(data, dict):
        raise AapoError(f"{option}: '{path}' must hold a JSON object")
    return data


def _fill(node: dict, key: str, value, source: str, where: str) -> None:
    if key not in node or node[key] == "auto":
        node[key] = value
        return
    current = node[key]
    if isinstance(current, (int, float)) and not isinstance(current, bool) and float(current) == float(value):
        return
    raise AapoError(
        f"ds_config {where}{key}={current!r} disagrees with {source}={value!r}; "
        f'set it to "auto" or change {source}'
    )


class LRSchedule:
    """The learning-rate factor of each optimizer step, for ``torch.optim.lr_scheduler.LambdaLR``.

    Counted in optimizer steps: a training step takes ``steps_per_rollout`` of them (the ratio-based
    algorithms' mini-batches x iterations), so ``train.warmup_steps`` and ``train.max_steps`` are
    multiplied by it. With W warm-up steps and K steps in all, optimizer step s (0-based) takes

    - warm-up, s < W: ``(s + 1) / W`` (the first step already learns; the W-th is at the peak);
    - constant: ``1``;
    - cosine: ``r + (1 − r) · ½ (1 + cos(π (s − W) / (K − W)))``, r = ``train.min_lr_ratio``: the peak
      at s = W, falling towards r, which the last step (s = K − 1) approaches but never spends a step at.
    """

    def __init__(self, kind: str, total_steps: int, warmup_steps: int, min_ratio: float = 0.0):
        if kind not in ("constant", "cosine"):
            raise ValueError(f"kind must be constant or cosine (got {kind!r})")
        self.kind, self.total_steps, self.warmup_steps, self.min_ratio = kind, total_steps, warmup_steps, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return 1.0
        progress = min((step - self.warmup_steps) / max(self.total_steps - self.warmup_steps, 1), 1.0)
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def __repr__(self) -> str:
        return (f"LRSchedule({self.kind!r}, total_steps={self.total_steps}, warmup_steps={self.warmup_steps}, "
                f"min_ratio={self.min_ratio})")


def lr_schedule(run) -> LRSchedule | None:
    """The run's schedule in optimizer steps (None: a constant learning rate without warm-up)."""
    train, per_rollout = run.train, run.optimizer_steps_per_rollout
    if train.lr_scheduler == "constant" and train.warmup_steps == 0:
        return None
    return LRSchedule(train.lr_scheduler, train.max_steps * per_rollout, train.warmup_steps * per_rollout,
                      train.min_lr_ratio)


def fill_precision(ds: dict, choice: str = "auto", resolved=None) -> dict:
    """``ds`` with an ``"auto"`` (or absent) ``bf16.enabled`` filled: from ``resolved`` (a
    :class:`aapo_app.precision.PrecisionChoice`) where given, else from the precision ``choice``
    (``auto``: bf16 where this machine multiplies bf16 matrices natively). A value the file sets is
    kept; :func:`aapo_app.precision.resolve_precision` checks it against an explicit choice."""
    from aapo_app.precision import apply_precision, leaves_precision_to_the_run, resolve_precision

    if not leaves_precision_to_the_run(ds):
        return ds
    return apply_precision(ds, resolved or resolve_precision(choice, ds, probe=False))


#: stage3_param_persistence_threshold on one rank: above any parameter's size, so every parameter stays
#: gathered and ZeRO-3's hooks fetch and release nothing per forward (partitioning saves no memory on one
#: rank; bench/update_speed.py measured the update 1.18x faster in bf16 on a 2-core CPU)
PERSIST_ALL = 10 ** 12


def fill_persistence(ds: dict, world_size: int) -> dict:
    """An ``"auto"`` ``zero_optimization.stage3_param_persistence_threshold``: every parameter persistent
    on one rank (:data:`PERSIST_ALL`), none on several (0: each rank keeps only its partitions)."""
    zero = ds.get("zero_optimization", {})
    if zero.get("stage3_param_persistence_threshold") == "auto":
        zero["stage3_param_persistence_threshold"] = PERSIST_ALL if world_size == 1 else 0
    return ds


def fill_ds_config(ds: dict, run, world_size: int, training: bool = True, precision=None) -> dict:
    """Return a copy of ``ds`` with every ``"auto"`` field resolved from the ``RunConfig`` (``bf16.enabled``
    from ``run.precision``, or from ``precision``, the run's resolved :class:`PrecisionChoice`)."""
    ds = fill_persistence(fill_precision(copy.deepcopy(ds), run.precision, precision), world_size)
    micro = run.micro_batch_rows
    accum = run.gradient_accumulation_steps
    _fill(ds, "train_micro_batch_size_per_gpu", micro, "train.micro_batch_size", "")
    _fill(ds, "gradient_accumulation_steps", accum,
          "micro-batches per optimizer step (prompts_per_rank*group_size/algorithm.mini_batches/train.micro_batch_size)", "")
    _fill(ds, "train_batch_size", micro * accum * world_size, "micro_batch_size*accumulation*world_size", "")
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if training and stage not in (0, 1, 2, 3):
        raise AapoError(f"ds_config zero_optimization.stage must be 0-3 (got {stage!r})")
    if not training:
        for key in ("optimizer", "scheduler"):
            if key in ds:
                raise AapoError(f"reference ds_config must not have '{key}': the reference is frozen; remove it")
        ds.pop("gradient_clipping", None)
        return ds
    _fill(ds, "gradient_clipping", run.train.max_grad_norm, "train.max_grad_norm", "")
    opt = ds.get("optimizer", {}).get("params")
    if opt is not None:
        _fill(opt, "lr", run.train.learning_rate, "train.learning_rate", "optimizer.params.")
        _fill(opt, "weight_decay", run.train.weight_decay, "train.weight_decay", "optimizer.params.")
    if "scheduler" not in ds:
        return ds  # the run's own schedule (lr_schedule), handed to DeepSpeed as a client scheduler
    if run.train.lr_scheduler != "constant":
        raise AapoError(f"ds_config has its own 'scheduler' section and train.lr_scheduler={run.train.lr_scheduler}; "
                        f"remove the section (the run config then builds the schedule) or set train.lr_scheduler=constant")
    sched = ds.get("scheduler", {}).get("params")
    if sched is not None and sched.get("warmup_num_steps") == "auto" and run.train.warmup_steps == 0:
        # DeepSpeed's warm-up schedulers reject 0 steps; no warm-up with a constant lr is no scheduler
        if ds["scheduler"].get("type") == "WarmupLR":
            del ds["scheduler"]
            sched = None
        else:
            sched["warmup_num_steps"] = 1
    if sched is not None:
        for key in ("warmup_max_lr", "max_lr"):
            if key in sched:
                _fill(sched, key, run.train.learning_rate, "train.learning_rate", "scheduler.params.")
        # DeepSpeed's schedulers count optimizer steps
        per_rollout = run.optimizer_steps_per_rollout
        if "warmup_num_steps" in sched:
            _fill(sched, "warmup_num_steps", run.train.warmup_steps * per_rollout,
                  "train.warmup_steps x optimizer steps per rollout", "scheduler.params.")
        if "total_num_steps" in sched:
            _fill(sched, "total_num_steps", run.train.max_steps * per_rollout,
                  "train.max_steps x optimizer steps per rollout", "scheduler.params.")
    return ds


def fill_inference_ds_config(ds: dict, world_size: int, option: str = "--ds-config", precision: str = "auto") -> dict:
    """An inference-only engine (evaluation): batch fields default to 1 per rank, no optimizer; an
    ``"auto"`` ``bf16.enabled`` from ``precision`` (:func:`fill_precision`)."""
    ds = fill_persistence(fill_precision(copy.deepcopy(ds), precision), world_size)
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise AapoError(f"{option}: an evaluation engine has no '{key}'; remove it (see ds_configs/zero3_inference_*.json)")
    for key, value in (("train_micro_batch_size_per_gpu", 1), ("gradient_accumulation_steps", 1),
                       ("train_batch_size", world_size)):
        if ds.get(key, "auto") == "auto":
            ds[key] = value
    ds.pop("gradient_clipping", None)
    return ds
