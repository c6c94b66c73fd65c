"""The loss GRPO, Dr. GRPO and DAPO share: the PPO-clipped ratio to the rollout's policy plus an
optional β·k3 KL to the reference, weighted per sequence over the optimizer step.

    ℓ_i,t = −min(ρ_i,t · A_i, clip(ρ_i,t, 1 − ε_low, 1 + ε_high) · A_i) + β · k3_i,t,
    ρ_i,t = π_θ(o_i,t) / π_old(o_i,t)

:class:`ClippedPGKLAlgorithm` is the base class; each subclass sets its advantages, its clip range
and its β.
"""

from __future__ import annotations

from torch import Tensor

from aapo_app.algorithms.base import (
    Algorithm,
    LossOutput,
    check_token_batch,
    masked_sum,
    weighted_token_sum,
    zero_where_masked,
)
from aapo_app.algorithms.common import k3_kl, ppo_clip_loss
from aapo_app.metrics import algorithm_metrics

#: What GRPO and Dr. GRPO log: the zero-std groups of the advantages and the stats of
#: :func:`clipped_pg_kl_loss` (kl_mean only when β > 0).
CLIPPED_PG_METRICS = algorithm_metrics("zero_std_group_frac", "loss", "pg_loss", "kl_mean", "ratio_clip_frac",
                                       "ratio_clip_low_frac", "ratio_clip_high_frac", "num_tokens")


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
