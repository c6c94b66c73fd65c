"""GRPO: Group Relative Policy Optimization (Shao et al., DeepSeekMath, arXiv 2402.03300).

For each prompt the policy samples a group of G completions with rewards r_1..r_G, and

    A_i     = (r_i − mean(r)) / (std(r) + ε)                  std Bessel-corrected, ε = 1e-4
    ρ_i,t   = π_θ(o_i,t) / π_old(o_i,t)
    k3_i,t  = π_ref(o_i,t)/π_θ(o_i,t) − log(π_ref(o_i,t)/π_θ(o_i,t)) − 1
    ℓ_i,t   = −min(ρ_i,t · A_i, clip(ρ_i,t, 1 − ε_clip, 1 + ε_clip) · A_i) + β · k3_i,t
    L       = (1/n) Σ_i (1/|o_i|) Σ_t ℓ_i,t                     per-sequence token mean, then batch mean

with ε_clip = 0.2 and β = 0.04 by default (the objective maximises the clipped surrogate − β·KL;
the loss is its negation). β = 0 drops the KL term and the need for reference log-probs.

This module also holds the pieces other algorithms share: :func:`group_advantages` (AAPO's group
term, GPG's (r − mean)/F_norm), :func:`zero_std_groups`, :func:`ppo_clip_loss` and :func:`k3_kl`.

Departures from the authors' code: the GRPO paper published no training code; the comparison
implementation is TRL's ``GRPOTrainer``, which this follows for ε = 1e-4 in the denominator, the
k3 estimator and ``old_logprobs = logprobs.detach()`` when there is one update per rollout. Unlike
recent TRL defaults, the loss is the paper's per-sequence token mean then batch mean
(``aggregate_loss(..., "seq_mean")``), not a token mean over the batch. A group whose rewards are
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
    AlgorithmParams,
    LossOutput,
    aggregate_loss,
    check_rewards,
    check_token_batch,
    masked_mean,
    require_non_negative,
    require_number,
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


def clipped_pg_kl_loss(logprobs: Tensor, mask: Tensor, advantages: Tensor, old_logprobs: Tensor | None,
                       ref_logprobs: Tensor | None, epsilon: float, beta: float, mode: str,
                       constant: float | None = None) -> LossOutput:
    """The PPO-clipped policy-gradient loss plus β·k3 KL, aggregated by ``mode`` (GRPO: "seq_mean";
    Dr. GRPO: "constant"). Stats: loss, pg_loss, clip_frac, num_tokens, and kl_mean when
    ``ref_logprobs`` is given."""
    logprobs = zero_where_masked(logprobs, mask)  # [n, L]
    # One update per rollout: π_old = π_θ, so ρ = 1 with the gradient of ρ (= ∇ log π_θ).
    old = logprobs.detach() if old_logprobs is None else old_logprobs
    pg_per_token, clipped = ppo_clip_loss(logprobs, old, advantages.detach(), mask, epsilon, epsilon)
    per_token = pg_per_token  # [n, L]
    stats: dict[str, float] = {}
    if ref_logprobs is not None:
        kl = k3_kl(logprobs, zero_where_masked(ref_logprobs, mask))  # [n, L], 0 where masked
        if beta > 0:
            per_token = per_token + beta * kl
        stats["kl_mean"] = masked_mean(kl, mask)
    loss = aggregate_loss(per_token, mask, mode, constant=constant)
    n_tokens = int(mask.sum())
    stats.update(
        loss=float(loss.detach()),
        pg_loss=float(aggregate_loss(pg_per_token.detach(), mask, mode, constant=constant)),
        clip_frac=float(clipped.sum()) / max(n_tokens, 1),
        num_tokens=float(n_tokens),
    )
    return LossOutput(loss=loss, stats=stats)


@dataclass
class GRPOParams(AlgorithmParams):
    """Parameters of GRPO (``algorithm.<field>``)."""

    epsilon: float = field(default=0.2, metadata={"help": "PPO clip range of the ratio: clip(ρ, 1 − ε, 1 + ε)."})
    beta: float = field(
        default=0.04, metadata={"help": "Weight of the k3 KL penalty to the reference model; 0 disables it."}
    )
    eps: float = field(default=1e-4, metadata={"help": "Added to the group reward std in the advantage denominator."})
    num_iterations: int = field(
        default=1,
        metadata={"help": "μ: optimizer steps per rollout; > 1 reuses the batch with the ratio to the rollout's "
                          "log-probs (old_logprobs)."},
    )

    def validate(self) -> None:
        epsilon = require_number("epsilon", self.epsilon)
        if not 0 < epsilon < 1:
            raise AapoError(f"algorithm.epsilon must be in (0, 1) (got {self.epsilon!r})")
        require_non_negative("beta", self.beta)
        require_non_negative("eps", self.eps)
        mu = self.num_iterations
        if isinstance(mu, bool) or not isinstance(mu, int) or mu < 1:
            raise AapoError(f"algorithm.num_iterations must be an integer >= 1 (got {mu!r})")


CLIPPED_PG_METRICS = {
    "zero_std_group_frac": "fraction of prompts whose G rewards are all equal (advantage 0, no gradient)",
    "loss": "the micro-batch loss that was back-propagated",
    "kl_mean": "mean k3 KL(π_θ ‖ π_ref) over counted tokens (logged when reference log-probs are given)",
    "clip_frac": "fraction of counted tokens where the clipped PPO term is active (no gradient)",
    "num_tokens": "number of counted completion tokens in the micro-batch",
}


class ClippedPGKLAlgorithm(Algorithm):
    """What GRPO and Dr. GRPO share: the PPO-clipped ratio to the rollout's log-probs plus an
    optional β·k3 KL to the reference (:func:`clipped_pg_kl_loss`). A subclass names itself in
    ``label`` and chooses how the per-token loss is aggregated (:meth:`aggregation`)."""

    label = ""

    @property
    def uses_reference_logprobs(self) -> bool:
        return self.params.beta > 0

    @property
    def uses_old_logprobs(self) -> bool:
        return True

    def aggregation(self, mask: Tensor, max_completion_length: int | None) -> tuple[str, float | None]:
        """``(mode, constant)`` for :func:`aggregate_loss`."""
        raise NotImplementedError

    def loss(
        self,
        logprobs: Tensor,
        mask: Tensor,
        advantages: Tensor,
        old_logprobs: Tensor | None = None,
        ref_logprobs: Tensor | None = None,
        max_completion_length: int | None = None,
    ) -> LossOutput:
        check_token_batch(logprobs, mask, advantages, old_logprobs=old_logprobs, ref_logprobs=ref_logprobs)
        mode, constant = self.aggregation(mask, max_completion_length)
        if self.params.beta > 0 and ref_logprobs is None:
            raise ValueError(f"{self.label} with beta > 0 needs ref_logprobs")
        return clipped_pg_kl_loss(logprobs, mask, advantages, old_logprobs, ref_logprobs,
                                  self.params.epsilon, self.params.beta, mode, constant=constant)


@register_algorithm
class GRPO(ClippedPGKLAlgorithm):
    """GRPO: std-normalised group advantages, PPO-clipped ratio, per-sequence mean, k3 KL."""

    name = "grpo"
    Params = GRPOParams
    uses_reference_samples = False
    metrics = {
        **CLIPPED_PG_METRICS,
        "pg_loss": "the PPO clipped-surrogate part of the loss (seq_mean), without the KL term",
    }

    label = "GRPO"
    params: GRPOParams

    @property
    def updates_per_rollout(self) -> int:
        return self.params.num_iterations

    def advantages(self, rewards: Tensor, ref_rewards: Tensor | None = None) -> AdvantageOutput:
        rewards = check_rewards(rewards)
        advantages = group_advantages(rewards, eps=self.params.eps, scale_by_std=True)  # [P, G]
        diagnostics = {"zero_std_group_frac": float(zero_std_groups(rewards).float().mean())}
        return AdvantageOutput(advantages=advantages, diagnostics=diagnostics)

    def aggregation(self, mask: Tensor, max_completion_length: int | None) -> tuple[str, float | None]:
        return "seq_mean", None
