"""DAPO: Decoupled Clip and Dynamic sAmpling Policy Optimization (Yu et al., "DAPO: An Open-Source
LLM Reinforcement Learning System at Scale", arXiv 2503.14476).

For each prompt the policy samples a group of G completions with rewards r_1..r_G, and

    A_i     = (r_i − mean(r)) / (std(r) + ε)                  std Bessel-corrected, ε = 1e-4
    ρ_i,t   = π_θ(o_i,t) / π_old(o_i,t)
    ℓ_i,t   = −min(ρ_i,t · A_i, clip(ρ_i,t, 1 − ε_low, 1 + ε_high) · A_i)
    L       = (1 / Σ_i |o_i|) · Σ_i Σ_t ℓ_i,t                 token-level mean, no KL term

with ε_low = 0.2 and ε_high = 0.28 by default. The paper's four techniques and where they live
in this project:

- **Clip-Higher**: the decoupled range above. A raised ε_high lets low-probability tokens with a
  positive advantage grow further before the ratio is clipped (against entropy collapse); a
  token with A > 0 stops getting gradient only once ρ > 1 + ε_high, one with A < 0 once
  ρ < 1 − ε_low.
- **Token-level policy-gradient loss**: ``aggregate_loss(..., "token_mean")`` — every completion
  token of the micro-batch weighs the same, so long responses are not down-weighted per token.
  The paper's mean is over all tokens of the whole batch; here it is per micro-batch, which is
  the same only when every micro-batch has the same token count (see
  :func:`aapo_app.algorithms.base.aggregate_loss`).
- **Dynamic sampling**: groups whose rewards are all equal (std = 0, all right or all wrong) have
  advantage 0 and only dilute the token mean, so they are dropped and the batch is refilled with
  new rollouts. The trainer does the dropping and refilling (``dynamic_sampling``,
  ``max_resample_tries``); this module provides the pure test :func:`dapo_keep_mask`.
- **Overlong reward shaping**: the soft overlong punishment (a penalty growing linearly from 0
  to −1 over the last L_cache tokens before the max length, −1 beyond it) is a *reward*, added
  in ``aapo_app.rewards``; this module only sees the resulting rewards.

There is no KL term (the paper removes it), so no reference model is needed.

Departures from the authors' code (the DAPO recipe of ``verl``):

- ε = 1e-4 in the advantage denominator (verl's GRPO estimator uses 1e-6), as everywhere else in
  this project.
- No dual-clip: verl additionally bounds the loss of negative-advantage tokens by
  ``clip_ratio_c · |A|`` (the recipe sets ``clip_ratio_c = 10``); the paper's objective has no
  such term and neither has this loss.
- The token mean is per micro-batch, not over the global batch (see above).
- verl's ``max_num_gen_batches = 0`` means "unlimited" and running out raises an error; here
  ``max_resample_tries`` counts the extra rollout rounds and 0 means no refill at all.
- A group whose rewards are all equal gets advantages exactly 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
    require_bool,
    require_non_negative,
    require_number,
    zero_where_masked,
)
from aapo_app.algorithms.grpo import group_advantages, ppo_clip_loss, zero_std_groups
from aapo_app.errors import AapoError


def dapo_keep_mask(rewards: Tensor) -> Tensor:
    """``[P]`` bool: True for the groups dynamic sampling keeps, i.e. whose G rewards are not all
    equal (std > 0); False for the groups it drops (all right, all wrong, or any other tie).

    Args:
        rewards: ``[P, G]`` rewards, G >= 2, all finite (ValueError otherwise).
    """
    rewards = check_rewards(rewards)
    return ~zero_std_groups(rewards)


@dataclass
class DAPOParams(AlgorithmParams):
    """Parameters of DAPO (``algorithm.<field>``)."""

    epsilon_low: float = field(
        default=0.2, metadata={"help": "Lower clip range of the ratio: clip(ρ, 1 − ε_low, ·); in (0, 1)."}
    )
    epsilon_high: float = field(
        default=0.28, metadata={"help": "Upper clip range of the ratio (Clip-Higher): clip(ρ, ·, 1 + ε_high); > 0."}
    )
    eps: float = field(default=1e-4, metadata={"help": "Added to the group reward std in the advantage denominator."})
    dynamic_sampling: bool = field(
        default=True,
        metadata={"help": "Drop groups whose rewards are all equal (std 0) and refill the batch with new rollouts "
                          "(the paper's setting)."},
    )
    max_resample_tries: int = field(
        default=3,
        metadata={"help": "Most extra rollout rounds to refill the batch after dropping groups (>= 0; 0 = no refill)."},
    )

    def validate(self) -> None:
        epsilon_low = require_number("epsilon_low", self.epsilon_low)
        if not 0 < epsilon_low < 1:
            raise AapoError(f"algorithm.epsilon_low must be in (0, 1) (got {self.epsilon_low!r})")
        if not require_number("epsilon_high", self.epsilon_high) > 0:
            raise AapoError(f"algorithm.epsilon_high must be > 0 (got {self.epsilon_high!r})")
        require_non_negative("eps", self.eps)
        require_bool("dynamic_sampling", self.dynamic_sampling)
        tries = self.max_resample_tries
        if isinstance(tries, bool) or not isinstance(tries, int):
            raise AapoError(f"algorithm.max_resample_tries must be an integer (got {tries!r})")
        if tries < 0:
            raise AapoError(f"algorithm.max_resample_tries must be >= 0 (got {tries!r})")


@register_algorithm
class DAPO(Algorithm):
    """DAPO: std-normalised group advantages, clip-higher PPO ratio, token-level mean, no KL."""

    name = "dapo"
    Params = DAPOParams
    uses_reference_samples = False
    metrics = {
        "zero_std_group_frac": "fraction of prompts whose G rewards are all equal (advantage 0, no gradient)",
        "kept_group_frac": "fraction of prompts dynamic sampling keeps from these rewards (reward std > 0); 1 when dynamic_sampling is off",
        "loss": "the micro-batch loss that was back-propagated (token mean of the clip-higher PPO surrogate)",
        "clip_frac": "fraction of counted tokens where the clipped PPO term is active (no gradient)",
        "clip_high_frac": "fraction of counted tokens clipped above: A > 0 and ρ > 1 + ε_high",
        "clip_low_frac": "fraction of counted tokens clipped below: A < 0 and ρ < 1 − ε_low",
        "num_tokens": "number of counted completion tokens in the micro-batch",
    }

    params: DAPOParams

    @property
    def uses_old_logprobs(self) -> bool:
        return True

    def resampling(self) -> tuple[int, float] | None:
        # keep refilling until every group of the batch has reward spread (or the tries run out)
        return (self.params.max_resample_tries, 1.0) if self.params.dynamic_sampling else None

    def advantages(self, rewards: Tensor, ref_rewards: Tensor | None = None) -> AdvantageOutput:
        rewards = check_rewards(rewards)
        advantages = group_advantages(rewards, eps=self.params.eps, scale_by_std=True)  # [P, G]
        keep = dapo_keep_mask(rewards)  # [P]
        diagnostics = {
            "zero_std_group_frac": float((~keep).float().mean()),
            "kept_group_frac": float(keep.float().mean()) if self.params.dynamic_sampling else 1.0,
        }
        return AdvantageOutput(advantages=advantages, diagnostics=diagnostics)

    def loss(
        self,
        logprobs: Tensor,
        mask: Tensor,
        advantages: Tensor,
        old_logprobs: Tensor | None = None,
        ref_logprobs: Tensor | None = None,
        max_completion_length: int | None = None,
    ) -> LossOutput:
        # No KL term: ref_logprobs is not read; max_completion_length is not needed.
        check_token_batch(logprobs, mask, advantages, old_logprobs=old_logprobs)
        logprobs = zero_where_masked(logprobs, mask)  # [n, L]
        # One update per rollout: π_old = π_θ, so ρ = 1 with the gradient of ρ (= ∇ log π_θ).
        old = logprobs.detach() if old_logprobs is None else old_logprobs
        advantages = advantages.detach()
        per_token, clipped = ppo_clip_loss(
            logprobs, old, advantages, mask, self.params.epsilon_low, self.params.epsilon_high
        )
        loss = aggregate_loss(per_token, mask, "token_mean")
        # A clipped token with A > 0 has ρ > 1 + ε_high; one with A < 0 has ρ < 1 − ε_low.
        positive = (advantages > 0)[:, None]  # [n, 1]
        n_tokens = int(mask.sum())
        denominator = max(n_tokens, 1)
        stats = {
            "loss": float(loss.detach()),
            "clip_frac": float(clipped.sum()) / denominator,
            "clip_high_frac": float((clipped & positive).sum()) / denominator,
            "clip_low_frac": float((clipped & ~positive).sum()) / denominator,
            "num_tokens": float(n_tokens),
        }
        return LossOutput(loss=loss, stats=stats)
