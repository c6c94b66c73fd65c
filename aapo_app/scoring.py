"""Stage 2, scoring: rewards for both groups, the algorithm's advantages, and diagnostics."""

from __future__ import annotations

import torch

from aapo_app.batches import RolloutBatch, ScoredBatch


def _std(x: torch.Tensor) -> float:
    return float(x.float().std()) if x.numel() > 1 else 0.0


def score(batch: RolloutBatch, reward_model, algorithm) -> ScoredBatch:
    """Reward the policy (and reference) samples and turn the rewards into advantages ``[P, G]``."""
    P, G = len(batch.examples), batch.group_size
    answers = [ex.answer for ex in batch.examples for _ in range(G)]  # prompt-major, like the samples
    out = reward_model.score(batch.policy.texts, answers, batch.policy.lengths.tolist())
    rewards = out.total.view(P, G)
    diagnostics = {
        "reward/mean": float(rewards.mean()),
        "reward/std": _std(rewards),
        "verify_timeouts": float(out.counts.get("verify_timeout", 0)),
        "verify_errors": float(out.counts.get("verify_error", 0)),
    }
    for name, values in out.per_reward.items():
        diagnostics[f"reward/{name}"] = float(values.mean())
    ref_rewards = None
    if batch.reference is not None:
        if batch.reference_rewards is not None:  # rollout.reference=cached: scored when the cache was built
            ref_total, ref_parts = batch.reference_rewards
        else:
            ref_out = reward_model.score(batch.reference.texts, answers, batch.reference.lengths.tolist())
            ref_total, ref_parts = ref_out.total, ref_out.per_reward
        ref_rewards = ref_total.view(P, G)
        diagnostics["ref_reward/mean"] = float(ref_rewards.mean())
        diagnostics["ref_reward/std"] = _std(ref_rewards)
        for name, values in ref_parts.items():
            diagnostics[f"ref_reward/{name}"] = float(values.mean())
    adv = algorithm.advantages(rewards, ref_rewards)
    diagnostics.update({f"algo/{k}": float(v) for k, v in adv.diagnostics.items()})
    diagnostics["advantage/mean"] = float(adv.advantages.mean())
    diagnostics["advantage/std"] = _std(adv.advantages)
    return ScoredBatch(rollout=batch, rewards=rewards, ref_rewards=ref_rewards, reward_parts={
        name: values.view(P, G) for name, values in out.per_reward.items()
    }, advantages=adv.advantages, diagnostics=diagnostics, advantage_parts=adv.parts)
