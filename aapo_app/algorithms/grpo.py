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

The loss is :class:`~aapo_app.algorithms.clipped_pg.ClippedPGKLAlgorithm`'s, the advantage
:func:`~aapo_app.algorithms.common.group_advantages`.

Departures from the authors' code: the GRPO paper published no training code; the comparison
implementation is TRL's ``GRPOTrainer``, which this follows for ε = 1e-4 in the denominator, the
k3 estimator and ``old_logprobs = logprobs.detach()`` when there is one optimizer step per rollout.
Unlike recent TRL defaults, the loss is the paper's per-sequence token mean then mean over sequences
(``loss_aggregation=seq_mean``), not a token mean over the batch. A group whose rewards are
all equal gets advantages exactly 0 (TRL relies on ε to turn 0/0 into 0/ε = 0).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from aapo_app.algorithms.base import (AdvantageOutput, AggregationMode, PolicyRatioParams, check_rewards,
                                     require_non_negative)
from aapo_app.algorithms.clipped_pg import CLIPPED_PG_METRICS, ClippedPGKLAlgorithm
from aapo_app.algorithms.common import check_epsilon, group_advantages, zero_std_groups
from aapo_app.algorithms.registry import register_algorithm


@dataclass
class GRPOParams(PolicyRatioParams):
    """Parameters of GRPO (``algorithm.<field>``)."""

    loss_aggregation: AggregationMode = field(
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
