"""``aapo check-config``: validate a run before launching it on a cluster, with the checks
``aapo train`` runs (:func:`aapo_app.builder.plan_run`) for any world size, plus DeepSpeed's own
parser; what depends on the machine it will run on (CUDA, vLLM) is reported, not required."""

from __future__ import annotations

import json

import yaml

from aapo_app.errors import AapoError


def _deepspeed_accepts(ds: dict, world: int, option: str) -> None:
    import importlib

    importlib.import_module("aapo_app.engine")  # picks DeepSpeed's CPU accelerator when there is no CUDA
    from deepspeed.runtime.config import DeepSpeedConfig

    one_rank = dict(ds, train_batch_size=ds["train_batch_size"] // world)  # the parser sees this process only
    try:
        DeepSpeedConfig(one_rank, mpu=None)
    except Exception as exc:
        raise AapoError(f"{option}: DeepSpeed rejects the filled config ({str(exc).splitlines()[0]}); fix the file") from exc


def check_config(config_path, ds_config, ref_ds_config, world_size: int, overrides: list[str]) -> str:
    """Everything ``aapo train`` would check before building engines, for ``world_size`` ranks, plus
    DeepSpeed's own parser; returns a report (resolved config, filled DeepSpeed configs, summary)."""
    from aapo_app.builder import check_prompt_lengths, plan_run
    from aapo_app.config import load_run_config

    if world_size < 1:
        raise AapoError(f"--world-size must be >= 1 (got {world_size})")
    cfg = load_run_config(config_path, overrides)
    plan = plan_run(cfg, ds_config, ref_ds_config, world=world_size, here=False)
    algorithm, ds_p, ds_r = plan.algorithm, plan.ds_policy, plan.ds_ref
    _deepspeed_accepts(ds_p, world_size, "--ds-config")
    _deepspeed_accepts(ds_r, world_size, "--ref-ds-config")
    train, held_out = plan.train_examples, plan.eval_examples
    per_step = cfg.rollout.prompts_per_rank * world_size
    notes = list(plan.notes)
    model_dir = _local_model_dir(cfg.model.path)
    if model_dir is None:
        notes.append(f"prompt lengths vs context: not checked ({cfg.model.path} is not available locally)")
    else:
        from transformers import AutoConfig, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        max_pos = getattr(AutoConfig.from_pretrained(model_dir), "max_position_embeddings", None)
        longest = check_prompt_lengths(tokenizer, max_pos, cfg, train, held_out)
        notes.append(f"longest prompt {longest} tokens + {cfg.rollout.max_new_tokens} new tokens "
                     f"<= context {max_pos}")
    G = cfg.rollout.group_size
    summary = [
        f"algorithm: {cfg.algorithm.name} (reference samples: {algorithm.uses_reference_samples}, "
        f"reference log-probs: {algorithm.uses_reference_logprobs})",
        f"batch: {world_size} rank(s) x {cfg.rollout.prompts_per_rank} prompts x G {G} = "
        f"{per_step * G} completions per step; {cfg.optimizer_steps_per_rollout} optimizer step(s) per step "
        f"({cfg.mini_batches} mini-batch(es) x {algorithm.rollout_passes[1]} pass(es)), each micro-batch "
        f"{cfg.micro_batch_rows} x accumulation {cfg.gradient_accumulation_steps} per rank "
        f"(train_batch_size {ds_p['train_batch_size']}); loss normalised by {cfg.algorithm.params.loss_aggregation}",
        f"data: {len(train)} training prompts ({len(train) // per_step} steps per pass), {len(held_out)} held out",
        f"rewards: {', '.join(f'{k} x {v}' for k, v in cfg.rewards.weights.items())}",
        *notes,
    ]
    return "\n".join([
        "# resolved run config", yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip(),
        "# policy DeepSpeed config (filled)", json.dumps(ds_p, indent=2),
        "# reference DeepSpeed config (filled)", json.dumps(ds_r, indent=2),
        "# checks", *summary, "config OK",
    ])


def _local_model_dir(spec: str) -> str | None:
    """A directory with the model's config and tokenizer on this machine, without downloading."""
    from pathlib import Path

    from aapo_app.models import EMBEDDED_DEFAULT, embedded_cache_path

    if spec in ("", EMBEDDED_DEFAULT):
        path = embedded_cache_path()
        return str(path) if (path / "config.json").is_file() else None
    path = Path(spec).expanduser()
    if path.is_dir():
        return str(path)
    if path.suffix == ".gguf":
        return None
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(spec, local_files_only=True, allow_patterns=["*.json", "*.model", "*.txt"])
    except Exception:
        return None
