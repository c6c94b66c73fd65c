"""Every metric written to ``metrics.jsonl``, defined once (docs/metrics.md mirrors this table).

Per-step values are averaged over data-parallel ranks (every rank holds the same number of groups,
so that is the global mean), except throughputs, which are summed over ranks.
"""

from __future__ import annotations

METRICS: dict[str, str] = {
    "step": "optimizer steps taken so far (1-based)",
    "reward/mean": "mean weighted reward r of the policy samples",
    "reward/std": "standard deviation of r over the policy samples of the step (per rank, then averaged)",
    "reward/<name>": "mean unweighted value of reward function <name> on the policy samples",
    "ref_reward/mean": "mean weighted reward of the reference samples (algorithms that sample the reference)",
    "ref_reward/std": "standard deviation of the reference samples' rewards",
    "ref_reward/<name>": "mean of reward function <name> on the reference samples",
    "accuracy": "fraction of policy samples whose final answer the grader accepts (= reward/accuracy)",
    "format_rate": "fraction of policy samples meeting the format reward (boxed_format, else format / tag_format)",
    "advantage/mean": "mean advantage over the policy samples",
    "advantage/std": "standard deviation of the advantages",
    "algo/zero_std_group_frac": "fraction of the prompt groups trained this step whose G policy rewards are all equal "
                                "(their group-relative advantage term is 0)",
    "algo/alpha": "GPG: fraction of the samples trained this step that are in prompt groups whose rewards are not all "
                  "equal (1 - algo/zero_std_group_frac); the advantages are divided by it",
    "algo/group_term_mean": "AAPO: mean over the step's policy samples of the group term (r - mean)/(std + eps)",
    "algo/group_term_std": "AAPO: population standard deviation over the step's policy samples of the group term",
    "algo/momentum_mean": "AAPO: mean over the step's policy samples of the momentum term "
                          "clip(r_i - r_ref_i, delta_low, delta_high) (unclipped when algorithm.clip is false)",
    "algo/momentum_clip_low_frac": "AAPO: fraction of samples whose momentum r_i - r_ref_i was clipped at delta_low "
                                   "(0 when algorithm.clip is false)",
    "algo/momentum_clip_high_frac": "AAPO: fraction of samples whose momentum r_i - r_ref_i was clipped at delta_high "
                                    "(0 when algorithm.clip is false)",
    "algo/ratio_clip_frac": "GRPO, Dr. GRPO, DAPO: fraction of counted tokens (all optimizer steps of the update) whose "
                            "ratio pi_theta/pi_old was clipped (no gradient)",
    "algo/ratio_clip_low_frac": "GRPO, Dr. GRPO, DAPO: fraction of counted tokens with A < 0 and ratio < 1 - eps_low",
    "algo/ratio_clip_high_frac": "GRPO, Dr. GRPO, DAPO: fraction of counted tokens with A > 0 and ratio > 1 + eps_high",
    "algo/loss": "the algorithm's loss of the update: the same value as loss",
    "algo/pg_loss": "GRPO, Dr. GRPO, DAPO: the PPO clipped-surrogate part of loss, without the KL term "
                    "(normalised and averaged as loss)",
    "algo/kl_mean": "GRPO, Dr. GRPO with beta > 0: mean k3 KL(pi_theta || pi_ref) per counted token "
                    "(all optimizer steps of the update)",
    "algo/logprob_mean": "AAPO, GPG: mean log pi_theta per counted completion token of the update",
    "algo/num_tokens": "counted completion tokens (all ranks) per optimizer step, averaged over the step's "
                       "optimizer steps",
    "loss": "the objective of the update: each optimizer step's loss over all its micro-batches and ranks, "
            "normalised as algorithm.loss_aggregation says, averaged over the step's optimizer steps",
    "grad_norm": "global gradient norm before clipping, as reported by DeepSpeed (mean over the step's optimizer steps)",
    "lr": "learning rate of the step's first optimizer step",
    "optimizer_steps": "optimizer steps this training step took (algorithm.mini_batches x num_iterations)",
    "skipped_nonfinite": "optimizer steps skipped this step because the loss or gradient was inf/NaN (weights untouched)",
    "completion_len/mean": "mean policy completion length in tokens (EOS included)",
    "completion_len/min": "shortest policy completion of the step in tokens, over all ranks",
    "completion_len/max": "longest policy completion of the step in tokens, over all ranks",
    "completion_len/eos_mean": "mean length in tokens of the policy completions that ended with EOS (not truncated); "
                               "absent in a step where none did",
    "tis/ratio_mean": "truncated importance sampling (algorithm.tis): mean of rho = pi_train / pi_sampler over the "
                      "sampled tokens (or sequences, tis=sequence) of the update, before the cap",
    "tis/ratio_min": "smallest rho of the update's tokens (or sequences), over all ranks",
    "tis/ratio_max": "largest rho of the update's tokens (or sequences), over all ranks, before the cap",
    "tis/cut_frac": "fraction of the update's tokens (or sequences) whose rho was truncated at algorithm.tis_cap "
                    "(tis_mode=truncate) or dropped outside [1/C, C] (tis_mode=mask)",
    "tis/logprob_abs_diff": "mean |log pi_train - log pi_sampler| over the update's counted tokens: the sampler "
                            "mismatch",
    "entropy": "mean token entropy (nats) of the policy's distribution at its completion tokens, at temperature "
               "rollout.temperature, from the update's first pass (no extra forward)",
    "truncated_frac": "fraction of policy completions that hit max_new_tokens without EOS",
    "verify_timeouts": "answer verifications that exceeded rewards.verify_timeout_s this step (scored 0)",
    "verify_errors": "answer verifications that raised an error this step (scored 0)",
    "unevaluated_answers": "policy answers that restate the sum instead of computing it (final answer '15 + 26' for a "
                           "numeric gold; the grader would accept it, the reward scores it 0)",
    "rollout_tokens_per_s": "sampled tokens (policy + reference, all ranks) per second of rollout",
    "update_tokens_per_s": "trained tokens (prompt + completion, all ranks) per second of update",
    "rollout_seconds": "wall-clock seconds of the rollout stage (all dynamic-sampling rounds included)",
    "resample_rounds": "extra rollout rounds dynamic sampling (DAPO) or regeneration (GPG) took this step",
    "resample_kept_frac": "fraction of the trained groups that carry signal (algorithm.keep_groups_by: "
                          "0 < #correct < G, or rewards not all equal) after dynamic sampling / regeneration",
    "update_seconds": "wall-clock seconds of the update stage",
    "step_seconds": "wall-clock seconds of the whole step (rollout + scoring + update)",
    "eval/accuracy": "held-out accuracy: greedy answers on data.eval_size problems graded correct",
    "eval/format_rate": "held-out fraction of greedy answers meeting the format reward",
}


def glossary_key(key: str) -> str:
    """The METRICS entry that defines ``key``: ``key`` itself, or for a per-reward key its
    ``<name>`` entry (``reward/accuracy`` -> ``reward/<name>``). KeyError for any other key."""
    if key in METRICS:
        return key
    prefix, sep, _ = key.partition("/")
    if sep and f"{prefix}/<name>" in METRICS:
        return f"{prefix}/<name>"
    raise KeyError(f"metric '{key}' is not defined in aapo_app.metrics.METRICS")


def algorithm_metrics(*names: str) -> dict[str, str]:
    """``{name: definition}`` of the ``algo/<name>`` metrics, for an ``Algorithm.metrics`` table: an
    algorithm declares which keys it logs, and their meaning is the one defined here."""
    return {name: METRICS[f"algo/{name}"] for name in names}


def read_metrics(path) -> list[dict]:
    """The rows of a ``metrics.jsonl``, one per step in step order (a step logged twice keeps its
    last row; a line cut short by a kill is skipped). [] when the file is missing."""
    import json
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        return []
    by_step: dict = {}
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "step" in row:
            by_step[row["step"]] = row
    return [by_step[s] for s in sorted(by_step)]


SUMMED = {"rollout_tokens", "update_tokens"}


def format_line(m: dict) -> str:
    """The compact one-line summary printed every ``train.log_every`` steps."""
    parts = [f"step {int(m['step'])}"]
    for key, label in (("reward/mean", "r"), ("ref_reward/mean", "r_ref"), ("accuracy", "acc"),
                       ("format_rate", "fmt"), ("loss", "loss"), ("grad_norm", "gnorm"),
                       ("completion_len/mean", "len"), ("algo/zero_std_group_frac", "zstd"),
                       ("rollout_tokens_per_s", "gen tok/s"), ("step_seconds", "s")):
        if key in m:
            value = m[key]
            parts.append(f"{label} {value:.3g}" if abs(value) < 1000 else f"{label} {value:.0f}")
    return " | ".join(parts)
