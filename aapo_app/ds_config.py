"""DeepSpeed configs: read a JSON file and fill its ``"auto"`` fields from the run config.

Batch sizes, learning rate, clipping and warm-up come from the run config so the two can never
disagree: a number written in the DeepSpeed file that differs from the run config is an error.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from aapo_app.errors import AapoError

REPO_DS_CONFIGS = Path(__file__).resolve().parents[1] / "ds_configs"
DEFAULT_POLICY_CONFIG = "zero3_cpu.json"
DEFAULT_REFERENCE_CONFIG = "zero3_inference_cpu.json"
DEFAULT_EVAL_CONFIG_GPU = "zero3_inference_bf16.json"


def read_ds_config(path: str | Path | None, default_name: str, option: str = "--ds-config") -> dict:
    path = Path(path) if path else REPO_DS_CONFIGS / default_name
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


def lr_scheduler_section(train) -> dict | None:
    """The DeepSpeed ``scheduler`` section for the run's schedule (None: constant lr, no warm-up).

    constant: ``WarmupLR`` (linear warm-up from 0 to lr, then flat). cosine: ``WarmupCosineLR``
    (linear warm-up from 0, then cosine decay to ``min_lr_ratio`` x lr at ``max_steps``); both take
    their peak from the optimizer's lr."""
    if train.lr_scheduler == "cosine":
        return {"type": "WarmupCosineLR", "params": {
            "total_num_steps": train.max_steps, "warmup_num_steps": train.warmup_steps, "warmup_min_ratio": 0.0,
            "cos_min_ratio": train.min_lr_ratio, "warmup_type": "linear"}}
    if train.warmup_steps == 0:
        return None
    return {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": train.learning_rate,
                                           "warmup_num_steps": train.warmup_steps, "warmup_type": "linear"}}


def fill_ds_config(ds: dict, run, world_size: int, training: bool = True) -> dict:
    """Return a copy of ``ds`` with every ``"auto"`` field resolved from the ``RunConfig``."""
    ds = copy.deepcopy(ds)
    micro = run.train.micro_batch_size
    accum = run.gradient_accumulation_steps
    _fill(ds, "train_micro_batch_size_per_gpu", micro, "train.micro_batch_size", "")
    _fill(ds, "gradient_accumulation_steps", accum, "rollout.prompts_per_rank*group_size/train.micro_batch_size", "")
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
        scheduler = lr_scheduler_section(run.train)
        if scheduler is not None:
            ds["scheduler"] = scheduler
        return ds
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
        if "warmup_num_steps" in sched:
            _fill(sched, "warmup_num_steps", run.train.warmup_steps, "train.warmup_steps", "scheduler.params.")
        if "total_num_steps" in sched:
            _fill(sched, "total_num_steps", run.train.max_steps, "train.max_steps", "scheduler.params.")
    return ds


def fill_inference_ds_config(ds: dict, world_size: int, option: str = "--ds-config") -> dict:
    """An inference-only engine (evaluation): batch fields default to 1 per rank, no optimizer."""
    ds = copy.deepcopy(ds)
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise AapoError(f"{option}: an evaluation engine has no '{key}'; remove it (see ds_configs/zero3_inference_*.json)")
    for key, value in (("train_micro_batch_size_per_gpu", 1), ("gradient_accumulation_steps", 1),
                       ("train_batch_size", world_size)):
        if ds.get(key, "auto") == "auto":
            ds[key] = value
    ds.pop("gradient_clipping", None)
    return ds
