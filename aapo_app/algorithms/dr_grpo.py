"""Dr. GRPO: GRPO Done Right (Liu et al., "Understanding R1-Zero-Like Training: A Critical
Perspective", arXiv 2503.20783).

For each prompt the policy samples a group of G completions with rewards r_1..r_G, and

    A_i     = r_i − mean(r)                                     no std division
    ρ_i,t   = π_θ(o_i,t) / π_old(o_i,t)
    ℓ_i,t   = −min(ρ_i,t · A_i, clip(ρ_i,t, 1 − ε, 1 + ε) · A_i) + β · k3_i,t
    L       = (1/S) Σ_i (1/L_max) Σ_t ℓ_i,t                      token sum / constant, then mean over
                                                                the S sequences of the optimizer step

with ε = 0.2, β = 0 by default, and L_max = ``max_completion_length`` (the rollout's max new
tokens). The paper removes GRPO's two normalisations that bias the optimisation: the per-response
1/|o_i| (which shrinks the penalty on long wrong answers and so favours longer ones) and the group
std (which up-weights prompts that are nearly always right or nearly always wrong). The k3 KL term
is as in GRPO (:func:`aapo_app.algorithms.common.k3_kl`) and is aggregated the same way as the
policy term; β = 0 drops it and the need for reference log-probs.

Aggregation (``loss_aggregation=constant``): every token of the optimizer step weighs
``1 / (S · L_max)``, S the sequences of the step on all ranks, whatever the micro-batch size. Update
schedule as GRPO's (``mini_batches`` optimizer steps per pass, ``num_iterations`` passes, ratio
against the policy that sampled the rollout); the default is one step per rollout, where ρ = 1 and
ε never acts: set ``mini_batches`` or ``num_iterations`` above 1 to make the clipping matter.

Departures from the authors' code (sail-sg/understand-r1-zero, built on ``oat``'s PPO learner with
``critic_type="drgrpo"``, which aggregates with ``masked_sum(..., constant_normalizer=
generate_max_length)`` then ``.mean()`` over each micro-batch, the same thing whenever micro-batches
hold equally many sequences):

- No truncated importance-sampling correction between the sampler's and the learner's log-probs
  (oat's ``tis_c``); the ratio is π_θ / π_old with π_old from the learner (or ``logprobs.detach()``
  with one update per rollout).
- No ``loss_mask`` that drops truncated responses (oat's ``ignore_no_eos``); the trainer's mask
  decides which tokens count.
- A group whose rewards are all equal gets advantages exactly 0 (r − mean can otherwise be a tiny
  float-rounding residue).
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
class DrGRPOParams(PolicyRatioParams):
    """Parameters of Dr. GRPO (``algorithm.<field>``)."""

    loss_aggregation: AggregationMode = field(
        default="constant",
        metadata={"help": "loss normalisation over the optimizer step (see aapo_app.algorithms.base.AGGREGATIONS); "
                          "Dr. GRPO's paper: 'constant', token sums over rollout.max_new_tokens, mean over sequences"},
    )
    epsilon: float = field(default=0.2, metadata={"help": "PPO clip range of the ratio: clip(ρ, 1 − ε, 1 + ε)."})
    beta: float = field(
        default=0.0, metadata={"help": "Weight of the k3 KL penalty to the reference model; 0 (default) disables it."}
    )

    def validate(self) -> None:
        super().validate()
        check_epsilon("epsilon", self.epsilon)
        require_non_negative("beta", self.beta)


@register_algorithm
class DrGRPO(ClippedPGKLAlgorithm):
    """Dr. GRPO: mean-centred group advantages, PPO-clipped ratio, token sum over a constant."""

    name = "dr_grpo"
    Params = DrGRPOParams
    uses_reference_samples = False
    metrics = CLIPPED_PG_METRICS

    label = "Dr. GRPO"
    params: DrGRPOParams

    def advantages(self, rewards: Tensor, ref_rewards: Tensor | None = None) -> AdvantageOutput:
        rewards = check_rewards(rewards)
        advantages = group_advantages(rewards, scale_by_std=False)  # [P, G], r − mean
        diagnostics = {"zero_std_group_frac": float(zero_std_groups(rewards).float().mean())}
        return AdvantageOutput(advantages=advantages, diagnostics=diagnostics)
