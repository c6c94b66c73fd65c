"""GRPO: Group Relative Policy Optimization (Shao et al., DeepSeekMath, arXiv 2402.03300).

For each prompt the policy samples a group of G completions with rewards r_1..r_G, and

    A_i     = (r_i − mean(r)) / (std(r) + ε)                  std Bessel-corrected, ε = 1e-4
    ρ_i,t   = π_θ(o_i,t) / π_old(o_i,t)
    k3_i,t  = π_ref(o_i,t)/π_θ(o_i,t) − log(π_ref(o_i,t)/π_θ(o_i,t)) − 1
    ℓ_i,t   = −min(ρ_i,t · A_i, clip(ρ_i,t, 1 − ε_clip, 1 + ε_clip) · A_i) + β · k3_i,t
    L       = (1/S) Σ_i (1/|o_i|) Σ_t ℓ_i,t                     per-sequence token mean, then mean
                                                                over the S sequences of the step

with ε_clip = 0.2 and β = 0.04 by default (the objective maximises the clipped surrogate − β·KL;
the loss is its negation). β = 0 drops the KL term and the need for reference log-probs.

Update schedule: each rank's rollout is split into ``mini_batches`` consecutive mini-batches, one
optimizer step each, and the split is passed over ``num_iterations`` (μ) times; the ratio is always
taken against π_old, the policy that sampled the rollout. The default, one mini-batch and μ = 1, is
DeepSeekMath's and TRL's (ρ = 1 and the clipping never acts). The mean over sequences is over the
whole optimizer step on every rank, whatever ``train.micro_batch_size`` is.

This module also holds the pieces other algorithms share: :func:`group_advantages` (AAPO's group
term, GPG's (r − mean)/F_norm), :func:`zero_std_groups`, :func:`ppo_clip_loss` and :func:`k3_kl`.

Departures from the authors' code: the GRPO paper published no training code; the comparison
implementation is TRL's ``GRPOTrainer``, which this follows for ε = 1e-4 in the denominator, the
k3 estimator and ``old_logprobs = logprobs.detach()`` when there is one optimizer step per rollout.
Unlike recent TRL defaults, the loss is the paper's per-sequence token mean then mean over sequences
(``loss_aggregation=seq_mean``), not a token mean over the batch. A group whose rewards are
all equal gets advantages exactly 0 (TRL relies on ε to turn 0/0 into 0/ε = 0).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from aapo_app.algorithms import register_algorithm
from aapo_app.algorithms.base import (
    AdvantageOutput,
    Algorithm,
    LossOutput,
    PolicyRatioParams,
    check_rewards,
    check_token_batch,
    masked_sum,
    require_non_negative,
    require_number,
    weighted_token_sum,
    zero_where_masked,
)
from aapo_app.errors import AapoError


def zero_std_groups(rewards: Tensor) -> Tensor:
    """``[P]`` bool: True for groups whose G rewards are all exactly equal (std = 0).

    Tested by equality rather than ``std == 0`` so float rounding in the std cannot matter.
    """
    return (rewards == rewards[:, :1]).all(dim=1)


def group_advantages(rewards: Tensor, eps: float = 1e-4, scale_by_std: bool = True) -> Tensor:
    """Group-relative advantages ``[P, G]``: ``(r − mean) / (std + eps)``, or ``r − mean``.

    ``mean`` and ``std`` are over each row's G samples; ``std`` is ``torch.std`` (unbiased,
    divides by G − 1). A group whose rewards are all equal gets exactly 0 (never NaN, even with
    ``eps = 0``).

    Args:
        rewards: ``[P, G]``, G >= 2.
        eps: added to the std in the denominator (>= 0).
        scale_by_std: False gives ``r − mean`` (Dr. GRPO, GPG with F_norm = 1).
    """
    rewards = check_rewards(rewards)
    if eps < 0:
        raise ValueError(f"eps must be >= 0 (got {eps})")
    centred = rewards - rewards.mean(dim=1, keepdim=True)  # [P, G]
    if scale_by_std:
        std = rewards.std(dim=1, keepdim=True)  # [P, 1], Bessel-corrected
        centred = centred / (std + eps)
    flat = zero_std_groups(rewards)[:, None]  # [P, 1]
    return torch.where(flat, torch.zeros_like(centred), centred)


def ppo_clip_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    eps_low: float,
    eps_high: float,
) -> tuple[Tensor, Tensor]:
    """Per-token PPO clipped surrogate loss ``−min(ρ·A, clip(ρ, 1 − eps_low, 1 + eps_high)·A)``.

    Args:
        logprobs: ``[n, L]`` log π_θ (with grad).
        old_logprobs: ``[n, L]`` log π_old (no grad).
        advantages: ``[n]`` one advantage per sequence.
        mask: ``[n, L]`` bool, True = token counts.
        eps_low, eps_high: the clip range of the ratio ρ (0.2, 0.2 for PPO/GRPO; 0.2, 0.28 for DAPO).

    Returns:
        ``(per_token_loss [n, L], clipped [n, L] bool)``. ``per_token_loss`` is 0 where ``mask``
        is False. ``clipped`` is True on counted tokens where the clipped term is the smaller one,
        i.e. where the token gets no gradient (ρ > 1 + eps_high with A > 0, or ρ < 1 − eps_low
        with A < 0).
    """
    log_ratio = zero_where_masked(logprobs - zero_where_masked(old_logprobs, mask), mask)  # [n, L]
    ratio = torch.exp(log_ratio)  # [n, L], 1 at masked positions
    adv = advantages[:, None].to(logprobs.dtype)  # [n, 1]
    unclipped = ratio * adv  # [n, L]
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv  # [n, L]
    per_token = zero_where_masked(-torch.minimum(unclipped, clipped), mask)
    is_clipped = mask & (clipped < unclipped)
    return per_token, is_clipped


def k3_kl(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Per-token k3 estimator of KL(π_θ ‖ π_ref) (Schulman, "Approximating KL divergence", 2020).

    ``exp(ref − logp) − (ref − logp) − 1``: unbiased for the KL under samples from π_θ, >= 0,
    exactly 0 where the two log-probs are equal. Elementwise; the caller masks and aggregates.
    """
    delta = ref_logprobs - logprobs  # [n, L], log π_ref/π_θ
    return torch.exp(delta) - delta - 1.0


def clipped_pg_kl_loss(logprobs: Tensor, mask: Tensor, advantages: Tensor, weights: Tensor,
                       old_logprobs: Tensor | None, ref_logprobs: Tensor | None, eps_low: float, eps_high: float,
                       beta: float) -> LossOutput:
    """The PPO-clipped policy-gradient loss plus β·k3 KL, weighted per sequence (``weights``, from
    :func:`~aapo_app.algorithms.base.sequence_weights`): this micro-batch's share of the step
    objective. Stats (sums, see :func:`~aapo_app.algorithms.base.step_metrics`): loss, pg_loss,
    num_tokens, ratio_clip_tokens, ratio_clip_low_tokens, ratio_clip_high_tokens, and kl_sum when
    β > 0 (the reference log-probs are read only then)."""
    logprobs = zero_where_masked(logprobs, mask)  # [n, L]
    # One optimizer step per rollout: π_old = π_θ, so ρ = 1 with the gradient of ρ (= ∇ log π_θ).
    old = logprobs.detach() if old_logprobs is None else old_logprobs
    advantages = advantages.detach()
    pg_per_token, clipped = ppo_clip_loss(logprobs, old, advantages, mask, eps_low, eps_high)
    per_token = pg_per_token  # [n, L]
    stats: dict[str, float] = {}
    if beta > 0:  # only a KL term reads the reference log-probs
        kl = k3_kl(logprobs, zero_where_masked(ref_logprobs, mask))  # [n, L], 0 where masked
        per_token = per_token + beta * kl
        stats["kl_sum"] = masked_sum(kl, mask)
    loss = weighted_token_sum(per_token, mask, weights)
    # a clipped token with A > 0 has ρ > 1 + ε_high; one with A < 0 has ρ < 1 − ε_low
    positive = (advantages > 0)[:, None]  # [n, 1]
    stats.update(
        loss=float(loss.detach()),
        pg_loss=float(weighted_token_sum(pg_per_token.detach(), mask, weights)),
        num_tokens=float(mask.sum()),
        ratio_clip_tokens=float(clipped.sum()),
        ratio_clip_high_tokens=float((clipped & positive).sum()),
        ratio_clip_low_tokens=float((clipped & ~positive).sum()),
    )
    return LossOutput(loss=loss, stats=stats)


def check_epsilon(name: str, value: object, upper: float | None = 1.0) -> None:
    number = require_number(name, value)
    if not number > 0 or (upper is not None and not number < upper):
        bound = f"in (0, {upper:g})" if upper is not None else "> 0"
        raise AapoError(f"algorithm.{name} must be {bound} (got {value!r})")


@dataclass
class GRPOParams(PolicyRatioParams):
    """Parameters of GRPO (``algorithm.<field>``)."""

    loss_aggregation: str = field(
        default="seq_mean",
        metadata={"help": "loss normalisation over the optimizer step (see aapo_app.algorithms.base.AGGREGATIONS); "
                          "GRPO's paper: 'seq_mean', each sequence's token mean averaged over the sequences"},
    )
    epsilon: float = field(default=0.2, metadata={"help": "PPO clip range of the ratio: clip(ρ, 1 − ε, 1 + ε)."})
    beta: float = field(
        default=0.04, metadata={"help": "Weight of the k3 KL penalty to the reference model; 0 disables it."}
    )
    eps: float = field(default=1e-4, metadata={"help": "Added to the group reward std in the advantage denominator."})

    def validate(self) -> None:
        super().validate()
        check_epsilon("epsilon", self.epsilon)
        require_non_negative("beta", self.beta)
        require_non_negative("eps", self.eps)


CLIPPED_PG_METRICS = {
    "zero_std_group_frac": "fraction of prompts whose G rewards are all equal (advantage 0, no gradient)",
    "loss": "the update's objective: the loss of each optimizer step (all its micro-batches and ranks), averaged "
            "over the optimizer steps of the training step",
    "pg_loss": "the PPO clipped-surrogate part of loss, without the KL term",
    "kl_mean": "mean k3 KL(π_θ ‖ π_ref) per counted token (logged when β > 0)",
    "ratio_clip_frac": "fraction of counted tokens (all optimizer steps of the update) whose ratio ρ = π_θ/π_old was "
                       "clipped: the clipped PPO term is active and the token gets no gradient",
    "ratio_clip_low_frac": "fraction of counted tokens clipped below: A < 0 and ρ < 1 − ε_low",
    "ratio_clip_high_frac": "fraction of counted tokens clipped above: A > 0 and ρ > 1 + ε_high",
    "num_tokens": "counted completion tokens per optimizer step (all ranks)",
}


class ClippedPGKLAlgorithm(Algorithm):
    """What GRPO, Dr. GRPO and DAPO share: the PPO-clipped ratio to the rollout's log-probs
    (``clip_range``) plus an optional β·k3 KL to the reference (:func:`clipped_pg_kl_loss`)."""

    label = ""

    @property
    def beta(self) -> float:
        return self.params.beta

    def clip_range(self) -> tuple[float, float]:
        """``(ε_low, ε_high)`` of the ratio."""
        return self.params.epsilon, self.params.epsilon

    @property
    def uses_reference_logprobs(self) -> bool:
        return self.beta > 0

    @property
    def uses_old_logprobs(self) -> bool:
        return True

    def loss(
        self,
        logprobs: Tensor,
        mask: Tensor,
        advantages: Tensor,
        weights: Tensor,
        old_logprobs: Tensor | None = None,
        ref_logprobs: Tensor | None = None,
    ) -> LossOutput:
        check_token_batch(logprobs, mask, advantages, old_logprobs=old_logprobs, ref_logprobs=ref_logprobs)
        if self.beta > 0 and ref_logprobs is None:
            raise ValueError(f"{self.label} with beta > 0 needs ref_logprobs")
        eps_low, eps_high = self.clip_range()
        return clipped_pg_kl_loss(logprobs, mask, advantages, weights, old_logprobs, ref_logprobs,
                                  eps_low, eps_high, self.beta)


@register_algorithm
class GRPO(ClippedPGKLAlgorithm):
    """GRPO: std-normalised group advantages, PPO-clipped ratio, per-sequence mean, k3 KL."""

    name = "grpo"
    Params = GRPOParams
    uses_reference_samples = False
    metrics = CLIPPED_PG_METRICS

    label = "GRPO"
    params: GRPOParams

    def advantages(self, rewards: Tensor, ref_rewards: Tensor | None = None) -> AdvantageOutput:
        rewards = check_rewards(rewards)
        advantages = group_advantages(rewards, eps=self.params.eps, scale_by_std=True)  # [P, G]
        diagnostics = {"zero_std_group_frac": float(zero_std_groups(rewards).float().mean())}
        return AdvantageOutput(advantages=advantages, diagnostics=diagnostics)
