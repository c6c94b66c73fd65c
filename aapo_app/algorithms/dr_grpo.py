"""Dr. GRPO: GRPO Done Right (Liu et al., "Understanding R1-Zero-Like Training: A Critical
Perspective", arXiv 2503.20783).

For each prompt the policy samples a group of G completions with rewards r_1..r_G, and

    A_i     = r_i − mean(r)                                     no std division
    ρ_i,t   = π_θ(o_i,t) / π_old(o_i,t)
    ℓ_i,t   = −min(ρ_i,t · A_i, clip(ρ_i,t, 1 − ε, 1 + ε) · A_i) + β · k3_i,t
    L       = (1/n) Σ_i (1/L_max) Σ_t ℓ_i,t                      token sum / constant, then batch mean

with ε = 0.2, β = 0 by default, and L_max = ``max_completion_length`` (the rollout's max new
tokens). The paper removes GRPO's two normalisations that bias the optimisation: the per-response
1/|o_i| (which shrinks the penalty on long wrong answers and so favours longer ones) and the group
std (which up-weights prompts that are nearly always right or nearly always wrong). The k3 KL term
is as in GRPO (:func:`aapo_app.algorithms.grpo.k3_kl`) and is aggregated the same way as the
policy term; β = 0 drops it and the need for reference log-probs.

Aggregation: ``aggregate_loss(per_token, mask, "constant", constant=L_max)`` computes
``Σ_i Σ_t ℓ_i,t / (n · L_max)`` over the n sequences of the micro-batch, which is exactly
``(1/n) Σ_i (Σ_t ℓ_i,t / L_max)``: each sequence's token *sum* divided by the constant, then the
mean over sequences (a sequence with no counted token contributes 0 and still counts in n). With
the trainer's fixed micro-batch size this equals the global mean over all sequences of the
optimizer step, whatever the token counts (see :func:`aapo_app.algorithms.base.aggregate_loss`).

Departures from the authors' code (sail-sg/understand-r1-zero, built on ``oat``'s PPO learner with
``critic_type="drgrpo"``, which also aggregates with ``masked_sum(..., constant_normalizer=
generate_max_length)`` then ``.mean()`` over the micro-batch):

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

from aapo_app.algorithms import register_algorithm
from aapo_app.algorithms.base import (
    AdvantageOutput,
    AlgorithmParams,
    check_rewards,
    require_non_negative,
    require_number,
)
from aapo_app.algorithms.grpo import CLIPPED_PG_METRICS, ClippedPGKLAlgorithm, group_advantages, zero_std_groups
from aapo_app.errors import AapoError


def check_max_completion_length(max_completion_length: object, mask: Tensor) -> int:
    """``max_completion_length`` as an int, or ValueError (a caller bug) if it is missing, not a
    positive int, or smaller than the counted tokens of some sequence of ``mask [n, L]``."""
    if max_completion_length is None:
        raise ValueError(
            "Dr. GRPO needs max_completion_length (the rollout's max new tokens) to normalise the loss"
        )
    if isinstance(max_completion_length, bool) or not isinstance(max_completion_length, int) or max_completion_length <= 0:
        raise ValueError(f"max_completion_length must be a positive int (got {max_completion_length!r})")
    longest = int(mask.sum(dim=1).max()) if mask.numel() else 0
    if longest > max_completion_length:
        raise ValueError(
            f"a sequence has {longest} counted tokens, more than max_completion_length = {max_completion_length}"
        )
    return max_completion_length


@dataclass
class DrGRPOParams(AlgorithmParams):
    """Parameters of Dr. GRPO (``algorithm.<field>``)."""

    epsilon: float = field(default=0.2, metadata={"help": "PPO clip range of the ratio: clip(ρ, 1 − ε, 1 + ε)."})
    beta: float = field(
        default=0.0, metadata={"help": "Weight of the k3 KL penalty to the reference model; 0 (default) disables it."}
    )

    def validate(self) -> None:
        epsilon = require_number("epsilon", self.epsilon)
        if not 0 < epsilon < 1:
            raise AapoError(f"algorithm.epsilon must be in (0, 1) (got {self.epsilon!r})")
        require_non_negative("beta", self.beta)


@register_algorithm
class DrGRPO(ClippedPGKLAlgorithm):
    """Dr. GRPO: mean-centred group advantages, PPO-clipped ratio, token sum over a constant."""

    name = "dr_grpo"
    Params = DrGRPOParams
    uses_reference_samples = False
    metrics = {
        **CLIPPED_PG_METRICS,
        "pg_loss": "the PPO clipped-surrogate part of the loss (token sum / max_completion_length, batch mean), without the KL term",
    }

    label = "Dr. GRPO"
    params: DrGRPOParams

    def advantages(self, rewards: Tensor, ref_rewards: Tensor | None = None) -> AdvantageOutput:
        rewards = check_rewards(rewards)
        advantages = group_advantages(rewards, scale_by_std=False)  # [P, G], r − mean
        diagnostics = {"zero_std_group_frac": float(zero_std_groups(rewards).float().mean())}
        return AdvantageOutput(advantages=advantages, diagnostics=diagnostics)

    def aggregation(self, mask: Tensor, max_completion_length: int | None) -> tuple[str, float | None]:
        return "constant", float(check_max_completion_length(max_completion_length, mask))
