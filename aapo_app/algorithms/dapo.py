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
- **Token-level policy-gradient loss**: ``loss_aggregation=token_mean`` — every completion token
  of the optimizer step (all its micro-batches, all ranks) weighs the same, so long responses are
  not down-weighted per token.
- **Mini-batch updates against π_old**: the paper takes several optimizer steps per rollout (512
  prompts per rollout, mini-batches of 32 prompts: 16 steps), each step's ratio against the policy
  that sampled the rollout; that is where Clip-Higher acts (with one step per rollout ρ = 1 and the
  clip range changes nothing). Here each rank's P × G sequences are split into ``mini_batches``
  (default 4, so that the default batch of 4 prompts × 8 samples per rank splits evenly; the paper's
  ratio is 16) consecutive mini-batches, one optimizer step each.
- **Dynamic sampling**: groups that carry no signal are dropped and the batch is refilled with new
  rollouts. The paper keeps a group when 0 < #correct < G (``keep_groups_by=accuracy``, the
  default); ``keep_groups_by=reward`` keeps groups whose weighted rewards are not all equal. The
  trainer does the dropping and refilling (``dynamic_sampling``, ``max_resample_tries``); this
  module provides the pure test :func:`dapo_keep_mask`.
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
- Mini-batches are consecutive slices of each rank's rollout (verl's default ``shuffle: false``
  does the same over the whole batch).
- verl's ``max_num_gen_batches = 0`` means "unlimited" and running out raises an error; here
  ``max_resample_tries`` counts the extra rollout rounds and 0 means no refill at all.
- A group whose rewards are all equal gets advantages exactly 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from aapo_app.algorithms.base import (
    AdvantageOutput,
    AggregationMode,
    PolicyRatioParams,
    Resampling,
    Signal,
    check_rewards,
    require_bool,
    require_int,
    require_non_negative,
)
from aapo_app.algorithms.clipped_pg import CLIPPED_PG_METRICS, ClippedPGKLAlgorithm
from aapo_app.algorithms.common import check_epsilon, group_advantages, zero_std_groups
from aapo_app.algorithms.registry import register_algorithm


def dapo_keep_mask(values: Tensor) -> Tensor:
    """``[P]`` bool: True for the groups dynamic sampling keeps, i.e. whose G values are not all
    equal; False for the groups it drops. With ``values`` the accuracy (1 correct, 0 not) that is
    the paper's 0 < #correct < G; with the weighted rewards it is reward std > 0.

    Args:
        values: ``[P, G]`` accuracies or rewards, G >= 2, all finite (ValueError otherwise).
    """
    values = check_rewards(values)
    return ~zero_std_groups(values)


@dataclass
class DAPOParams(PolicyRatioParams):
    """Parameters of DAPO (``algorithm.<field>``)."""

    loss_aggregation: AggregationMode = field(
        default="token_mean",
        metadata={"help": "loss normalisation over the optimizer step (see aapo_app.algorithms.base.AGGREGATIONS); "
                          "DAPO's paper: 'token_mean' over every completion token of the step"},
    )
    mini_batches: int = field(
        default=4,
        metadata={"help": "optimizer steps per pass over a rollout: each rank's P x G sequences are split into this "
                          "many equal, consecutive mini-batches (must divide P x G; the paper's rollout-to-mini-batch "
                          "ratio is 16), each step's ratio against the policy that sampled the rollout"},
    )
    epsilon_low: float = field(
        default=0.2, metadata={"help": "Lower clip range of the ratio: clip(ρ, 1 − ε_low, ·); in (0, 1)."}
    )
    epsilon_high: float = field(
        default=0.28, metadata={"help": "Upper clip range of the ratio (Clip-Higher): clip(ρ, ·, 1 + ε_high); > 0."}
    )
    eps: float = field(default=1e-4, metadata={"help": "Added to the group reward std in the advantage denominator."})
    dynamic_sampling: bool = field(
        default=True,
        metadata={"help": "Drop groups without signal (see keep_groups_by) and refill the batch with new rollouts "
                          "(the paper's setting)."},
    )
    keep_groups_by: Signal = field(
        default="accuracy",
        metadata={"help": "Which groups dynamic sampling keeps: 'accuracy' (0 < #correct < G, the paper's rule) or "
                          "'reward' (weighted rewards not all equal)."},
    )
    max_resample_tries: int = field(
        default=3,
        metadata={"help": "Most extra rollout rounds to refill the batch after dropping groups (>= 0; 0 = no refill)."},
    )

    def validate(self) -> None:
        super().validate()
        check_epsilon("epsilon_low", self.epsilon_low)
        check_epsilon("epsilon_high", self.epsilon_high, upper=None)
        require_non_negative("eps", self.eps)
        require_bool("dynamic_sampling", self.dynamic_sampling)
        require_int("max_resample_tries", self.max_resample_tries, 0)


@register_algorithm
class DAPO(ClippedPGKLAlgorithm):
    """DAPO: std-normalised group advantages, clip-higher PPO ratio over mini-batches, token-level
    mean over the step, dynamic sampling, no KL."""

    name = "dapo"
    Params = DAPOParams
    uses_reference_samples = False
    metrics = {k: v for k, v in CLIPPED_PG_METRICS.items() if k != "kl_mean"}

    label = "DAPO"
    beta = 0.0  # the paper removes the KL term
    params: DAPOParams

    def clip_range(self) -> tuple[float, float]:
        return self.params.epsilon_low, self.params.epsilon_high

    def resampling(self) -> Resampling | None:
        # keep refilling until every group of the batch carries signal (or the tries run out)
        if not self.params.dynamic_sampling:
            return None
        return Resampling(self.params.max_resample_tries, 1.0, self.params.keep_groups_by)

    def advantages(self, rewards: Tensor, ref_rewards: Tensor | None = None) -> AdvantageOutput:
        rewards = check_rewards(rewards)
        advantages = group_advantages(rewards, eps=self.params.eps, scale_by_std=True)  # [P, G]
        diagnostics = {"zero_std_group_frac": float(zero_std_groups(rewards).float().mean())}
        return AdvantageOutput(advantages=advantages, diagnostics=diagnostics)
