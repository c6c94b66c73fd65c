"""Stage 2, scoring: rewards for both groups, the algorithm's advantages, and diagnostics.

Every completion is graded once per step: :func:`grade` fills in the grades a batch does not carry
yet (dynamic sampling grades each round as it samples it; a reference cache stores its grades), and
:func:`score` turns the grades into advantages.
"""

from __future__ import annotations

import dataclasses

import torch

from aapo_app.batches import Grades, RolloutBatch, ScoredBatch


def _std(x: torch.Tensor) -> float:
    return float(x.float().std()) if x.numel() > 1 else 0.0


def answers_of(batch: RolloutBatch) -> list[str]:
    """The gold answer of every sample, prompt-major like the samples."""
    return [ex.answer for ex in batch.examples for _ in range(batch.group_size)]


def grade(batch: RolloutBatch, reward_model) -> RolloutBatch:
    """``batch`` with the policy's (and the reference's) grades, grading only those it lacks."""
    updates = {}
    if batch.policy_grades is None:
        updates["policy_grades"] = Grades.of(
            reward_model.score(batch.policy.texts, answers_of(batch), batch.policy.lengths.tolist()))
    if batch.reference is not None and batch.reference_grades is None:
        updates["reference_grades"] = Grades.of(
            reward_model.score(batch.reference.texts, answers_of(batch), batch.reference.lengths.tolist()))
    return dataclasses.replace(batch, **updates) if updates else batch


def score(batch: RolloutBatch, reward_model, algorithm) -> ScoredBatch:
    """Reward the policy (and reference) samples and turn the rewards into advantages ``[P, G]``."""
    batch = grade(batch, reward_model)
    P, G = len(batch.examples), batch.group_size
    graded = batch.policy_grades
    rewards = graded.total.view(P, G)
    diagnostics = {
        "reward/mean": float(rewards.mean()),
        "reward/std": _std(rewards),
        "verify_timeouts": float(graded.counts.get("verify_timeout", 0)),
        "verify_errors": float(graded.counts.get("verify_error", 0)),
        "unevaluated_answers": float(graded.counts.get("unevaluated", 0)),
    }
    for name, values in graded.parts.items():
        diagnostics[f"reward/{name}"] = float(values.mean())
    ref_rewards = None
    if batch.reference is not None:
        ref = batch.reference_grades
        ref_rewards = ref.total.view(P, G)
        diagnostics["ref_reward/mean"] = float(ref_rewards.mean())
        diagnostics["ref_reward/std"] = _std(ref_rewards)
        for name, values in ref.parts.items():
            diagnostics[f"ref_reward/{name}"] = float(values.mean())
    adv = algorithm.advantages(rewards, ref_rewards)
    diagnostics.update({f"algo/{k}": float(v) for k, v in adv.diagnostics.items()})
    diagnostics["advantage/mean"] = float(adv.advantages.mean())
    diagnostics["advantage/std"] = _std(adv.advantages)
    return ScoredBatch(rollout=batch, rewards=rewards, ref_rewards=ref_rewards, reward_parts={
        name: values.view(P, G) for name, values in graded.parts.items()
    }, advantages=adv.advantages, diagnostics=diagnostics, advantage_parts=adv.parts)


def signal_groups(grades: Grades, group_size: int, signal: str) -> torch.Tensor:
    """``[P]`` bool: the groups that carry a learning signal. ``signal="accuracy"``: 0 < #correct < G
    (DAPO's rule); ``"reward"``: the weighted rewards are not all equal."""
    from aapo_app.algorithms import zero_std_groups

    values = grades.parts["accuracy"] if signal == "accuracy" else grades.total
    return ~zero_std_groups(values.view(-1, group_size))
