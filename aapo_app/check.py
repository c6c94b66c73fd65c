"""``aapo check-config``: validate a run before launching it on a cluster, and the length check
that ``aapo train`` runs too."""

from __future__ import annotations

import json

import yaml

from aapo_app.errors import AapoError

LENGTH_SAMPLE = 512  # training prompts measured (plus every held-out prompt)


def check_lengths(tokenizer, max_positions: int | None, prompts: list[str], cfg, add_special_tokens: bool) -> int:
    """The longest prompt in tokens; an error if it plus ``rollout.max_new_tokens`` (or the held-out
    ``train.eval_max_new_tokens``) exceeds the model's context."""
    if not prompts:
        return 0
    longest = max(len(ids) for ids in tokenizer(prompts, add_special_tokens=add_special_tokens)["input_ids"])
    if max_positions:
        for key, new in (("rollout.max_new_tokens", cfg.rollout.max_new_tokens),
                         ("train.eval_max_new_tokens", cfg.train.eval_max_new_tokens)):
            if longest + new > max_positions:
                raise AapoError(f"{key}={new} plus the longest prompt ({longest} tokens) exceeds the model's context "
                                f"of {max_positions} positions; lower {key} to at most {max(max_positions - longest, 0)} "
                                f"or use shorter prompts")
    return longest


def sample_prompts(examples, eval_examples, render) -> list[str]:
    return [render(ex.problem) for ex in list(eval_examples) + list(examples[:LENGTH_SAMPLE])]


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
    from aapo_app.algorithms import build_algorithm
    from aapo_app.config import load_run_config
    from aapo_app.data import load_examples, render_prompt
    from aapo_app.ds_config import DEFAULT_POLICY_CONFIG, DEFAULT_REFERENCE_CONFIG, fill_ds_config, read_ds_config
    from aapo_app.models import resolve_model_path

    if world_size < 1:
        raise AapoError(f"--world-size must be >= 1 (got {world_size})")
    cfg = load_run_config(config_path, overrides)
    algorithm = build_algorithm(cfg.algorithm.name, cfg.algorithm.params)
    ds_p = fill_ds_config(read_ds_config(ds_config, DEFAULT_POLICY_CONFIG), cfg, world_size)
    ds_r = fill_ds_config(read_ds_config(ref_ds_config, DEFAULT_REFERENCE_CONFIG, option="--ref-ds-config"), cfg,
                          world_size, training=False)
    _deepspeed_accepts(ds_p, world_size, "--ds-config")
    _deepspeed_accepts(ds_r, world_size, "--ref-ds-config")
    train, held_out = load_examples(cfg.data, cfg.train.seed)
    per_step = cfg.rollout.prompts_per_rank * world_size
    if len(train) < per_step:
        raise AapoError(f"data: {len(train)} training prompts but a step takes {per_step} "
                        f"(rollout.prompts_per_rank x {world_size} ranks); add data or lower rollout.prompts_per_rank")
    notes = []
    resolve_model_path(cfg.model.path, convert=False)
    model_dir = _local_model_dir(cfg.model.path)
    longest = None
    if model_dir is None:
        notes.append(f"prompt lengths vs context: not checked ({cfg.model.path} is not available locally)")
    else:
        from transformers import AutoConfig, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        max_pos = getattr(AutoConfig.from_pretrained(model_dir), "max_position_embeddings", None)
        chat = bool(cfg.data.use_chat_template and tokenizer.chat_template)
        prompts = sample_prompts(train, held_out, lambda p: render_prompt(tokenizer, p, cfg.data))
        longest = check_lengths(tokenizer, max_pos, prompts, cfg, add_special_tokens=not chat)
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
