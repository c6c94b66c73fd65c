"""AAPO: Advantage-Augmented Policy Optimization (Xiong et al., arXiv 2505.14264).

Per prompt q the policy π_θ samples O_θ = {o_1..o_G} and the frozen reference π_ref samples
O_ref = {o_ref_1..o_ref_G} with the same sampling settings; r_i and r_ref_i are their (weighted)
rewards. Then

    A*_i = (r_i − mean(r)) / (std(r) + ε)  +  clip(r_i − r_ref_i, δ_low, δ_high)
           └─────── group term ────────┘     └──────── momentum term ───────┘
    L    = (1 / Σ_i |o_i|) · Σ_i Σ_t −log π_θ(o_i,t | q, o_i,<t) · A*_i

- ``std`` is the unbiased (Bessel-corrected) std of the G policy rewards, as ``torch.std``;
  ε = 1e-4, δ_low = −0.2, δ_high = 0.28 (configurable). ``clip=False`` is the paper's "no clip"
  ablation: the raw difference r_i − r_ref_i.
- r_ref_i is paired with r_i by index (the i-th reference sample) and the momentum term is not
  std-normalised.
- When all G rewards of a group are equal the group term is exactly 0 and only the clipped
  momentum remains, so such prompts still give a gradient (where GRPO/GPG give none). No NaN.
- The loss is a plain cross-entropy policy gradient: no importance ratio, no PPO clipping, no KL
  term, one on-policy optimizer step per rollout.
- Token normalisation is the paper's Definition (Sec. 4): each group's loss is divided by its own
  token count N_G = Σ_{o∈G} |o| and the objective is the mean over the groups of the optimizer step
  (``loss_aggregation=group_token_mean``), computed over every micro-batch and rank of the step, so
  it does not depend on ``train.micro_batch_size``. The authors' code (TRL 0.16) takes a plain
  token mean per micro-batch instead, averaged over micro-batches: ``micro_batch_token_mean``
  reproduces it (the paper's numbers were produced that way).

Defects of the authors' public code that this project does not copy:

- The 1.5B trainer scores the *prompt* tokens as the reference completion (it slices the
  reference generation with ``[:, :prompt_length]``). Here ``ref_rewards`` are the rewards of the
  reference model's *completions*; this module only ever sees the two reward tensors.
- Its vLLM path samples the reference group from the *policy* weights, which makes r − r_ref
  policy-vs-policy noise. Here the reference group comes from the frozen reference engine.
- Its cosine reward measures length in characters and does not clip progress at 1, so long
  outputs wrap around the cosine. Here (rewards module) length is in tokens and p = min(l/L, 1).
- It builds the reference model only when β > 0, so β = 0 (and AAPO has no KL term) crashes.
  Here the reference is needed because ``AAPO.uses_reference_samples`` is True, whatever any KL
  coefficient says; AAPO has no β at all.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from aapo_app.algorithms.base import (
    AdvantageOutput,
    AggregationMode,
    AlgorithmParams,
    check_rewards,
    require_bool,
    require_non_negative,
    require_number,
)
from aapo_app.algorithms.common import group_advantages, zero_std_groups
from aapo_app.algorithms.cross_entropy_pg import CE_LOSS_METRICS, CrossEntropyPGAlgorithm
from aapo_app.algorithms.registry import register_algorithm
from aapo_app.errors import AapoError
from aapo_app.metrics import algorithm_metrics


def aapo_advantages(
    rewards: Tensor,
    ref_rewards: Tensor,
    delta_low: float = -0.2,
    delta_high: float = 0.28,
    eps: float = 1e-4,
    clip: bool = True,
) -> tuple[Tensor, dict[str, float]]:
    """AAPO advantages ``A* = group term + momentum term`` (see the module docstring).

    Args:
        rewards: ``[P, G]`` rewards of the policy's samples, G >= 2.
        ref_rewards: ``[P, G]`` rewards of the reference model's samples; column j is paired with
            column j of ``rewards``.
        delta_low, delta_high: clip bounds of the momentum term (δ_low <= 0 <= δ_high).
        eps: added to the unbiased group std in the group term's denominator.
        clip: False is the paper's no-clip ablation (momentum = r − r_ref).

    Returns:
        ``(advantages [P, G], diagnostics)`` with diagnostics:
        ``zero_std_group_frac``, ``momentum_clip_low_frac``, ``momentum_clip_high_frac``, ``group_term_mean``,
        ``group_term_std``, ``momentum_mean`` (defined in ``AAPO.metrics``).
    """
    rewards = check_rewards(rewards)
    ref_rewards = check_rewards(ref_rewards, "ref_rewards").to(rewards.dtype)
    if ref_rewards.shape != rewards.shape:
        raise ValueError(
            f"ref_rewards shape {tuple(ref_rewards.shape)} != rewards shape {tuple(rewards.shape)}; "
            "AAPO pairs the i-th reference sample with the i-th policy sample"
        )
    if not delta_low <= 0 <= delta_high:
        raise ValueError(f"need delta_low <= 0 <= delta_high (got {delta_low}, {delta_high})")

    group_term = group_advantages(rewards, eps=eps, scale_by_std=True)  # [P, G], 0 for flat groups
    diff = rewards - ref_rewards  # [P, G], r_i − r_ref_i
    if clip:
        momentum = diff.clamp(min=delta_low, max=delta_high)  # [P, G]
        clipped_low = diff < delta_low  # [P, G]
        clipped_high = diff > delta_high  # [P, G]
    else:
        momentum = diff
        clipped_low = clipped_high = torch.zeros_like(diff, dtype=torch.bool)
    advantages = group_term + momentum  # [P, G]

    diagnostics = {
        "zero_std_group_frac": float(zero_std_groups(rewards).float().mean()),
        "momentum_clip_low_frac": float(clipped_low.float().mean()),
        "momentum_clip_high_frac": float(clipped_high.float().mean()),
        "group_term_mean": float(group_term.mean()),
        "group_term_std": float(group_term.std(correction=0)),
        "momentum_mean": float(momentum.mean()),
    }
    return advantages, diagnostics


@dataclass
class AAPOParams(AlgorithmParams):
    """Parameters of AAPO (``algorithm.<field>``)."""

    loss_aggregation: AggregationMode = field(
        default="group_token_mean",
        metadata={"help": "loss normalisation over the optimizer step (see aapo_app.algorithms.base.AGGREGATIONS): "
                          "'group_token_mean' is the paper's Definition (each group over its own token count, mean "
                          "over groups); 'micro_batch_token_mean' reproduces the authors' code"},
    )

    delta_low: float = field(
        default=-0.2, metadata={"help": "Lower clip bound δ_low of the momentum term r − r_ref (<= 0)."}
    )
    delta_high: float = field(
        default=0.28, metadata={"help": "Upper clip bound δ_high of the momentum term r − r_ref (>= 0)."}
    )
    clip: bool = field(
        default=True, metadata={"help": "Clip the momentum term to [δ_low, δ_high]; false is the paper's no-clip ablation."}
    )
    eps: float = field(default=1e-4, metadata={"help": "Added to the group reward std in the group term's denominator."})

    def validate(self) -> None:
        super().validate()
        if require_number("delta_low", self.delta_low) > 0:
            raise AapoError(f"algorithm.delta_low must be <= 0 (got {self.delta_low!r})")
        if require_number("delta_high", self.delta_high) < 0:
            raise AapoError(f"algorithm.delta_high must be >= 0 (got {self.delta_high!r})")
        require_bool("clip", self.clip)
        require_non_negative("eps", self.eps)


@register_algorithm
class AAPO(CrossEntropyPGAlgorithm):
    """AAPO: group advantage plus clipped reference momentum, CE policy-gradient loss."""

    name = "aapo"
    Params = AAPOParams
    uses_reference_samples = True
    metrics = {
        **algorithm_metrics("zero_std_group_frac", "momentum_clip_low_frac", "momentum_clip_high_frac",
                            "group_term_mean", "group_term_std", "momentum_mean"),
        **CE_LOSS_METRICS,
    }

    params: AAPOParams

    def advantages(self, rewards: Tensor, ref_rewards: Tensor | None = None) -> AdvantageOutput:
        if ref_rewards is None:
            raise ValueError("AAPO needs ref_rewards: the rewards of the reference model's G samples per prompt")
        p = self.params
        advantages, diagnostics = aapo_advantages(
            rewards, ref_rewards, delta_low=p.delta_low, delta_high=p.delta_high, eps=p.eps, clip=p.clip
        )
        group_term = group_advantages(check_rewards(rewards), eps=p.eps, scale_by_std=True)
        return AdvantageOutput(advantages=advantages, diagnostics=diagnostics,
                               parts={"group_term": group_term, "momentum": advantages - group_term})
