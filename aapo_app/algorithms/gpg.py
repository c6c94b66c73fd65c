"""GPG: Group Policy Gradient (Chu et al., arXiv 2504.02546).

For each prompt the policy samples G completions with rewards r_1..r_G, and

    Â_i = (r_i − mean(r)) / F_norm,      F_norm ∈ {1 ("one"), std(r) + ε ("std")}
    α   = (# samples in groups with std > 0) / (# samples)
    A_i = Â_i / α                         (α = 0 → every advantage is 0)
    L   = (1 / Σ_i |o_i|) · Σ_i Σ_t −log π_θ(o_i,t | q, o_i,<t) · A_i

std is Bessel-corrected (``torch.std``), ε = 1e-4. Groups whose rewards are all equal carry no
gradient; dividing by α rescales the rest so the gradient's size does not shrink with the fraction
of such groups. The loss is the same CE policy gradient as AAPO (no ratio, no KL), normalised
like AAPO's by default: each group's token sum over the group's token count, averaged over the groups
of the optimizer step (``loss_aggregation=group_token_mean``), independent of the micro-batch size.

Departures from the authors' code (AMAP-ML GPG, built on open-r1/TRL):

- The authors divide the *loss* by ``max(1 − frac_zero_std_groups, 0.05)``, reading that fraction
  from the metrics log of the latest scoring call. Here 1/α multiplies the *advantages* (the same
  gradient, because the CE loss is linear in A) and α is returned in the diagnostics, so it is
  computed from exactly the rewards it rescales. There is no 0.05 floor: α = 0 means every
  advantage is already 0, and the result is 0, not 0/0.
- α is computed over the ``[P, G]`` rewards passed in (the authors' code uses the rewards gathered
  over all processes); the trainer decides which batch that is.
- The authors' batch-level std option (``scale_batch``) is not provided.
- The optional regeneration until at least half the groups carry signal belongs to the rollout
  stage, not to this module. Which groups carry signal is ``keep_groups_by``: by default
  ``accuracy`` (0 < #correct < G), as DAPO's filter; ``reward`` is the paper's reward std > 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

from torch import Tensor

from aapo_app.algorithms.base import (
    AdvantageOutput,
    AggregationMode,
    AlgorithmParams,
    Resampling,
    Signal,
    check_rewards,
    require_bool,
    require_int,
    require_number,
    require_non_negative,
)
from aapo_app.algorithms.common import group_advantages, zero_std_groups
from aapo_app.algorithms.cross_entropy_pg import CE_LOSS_METRICS, CrossEntropyPGAlgorithm
from aapo_app.algorithms.registry import register_algorithm
from aapo_app.errors import AapoError
from aapo_app.metrics import algorithm_metrics

#: The advantage denominator F_norm: the group std + eps, or 1.
FNorm = Literal["std", "one"]
F_NORMS: tuple[str, ...] = get_args(FNorm)


def gpg_advantages(
    rewards: Tensor, f_norm: FNorm = "std", eps: float = 1e-4
) -> tuple[Tensor, dict[str, float]]:
    """GPG advantages ``(r − mean) / F_norm / α``.

    Args:
        rewards: ``[P, G]`` rewards, G >= 2.
        f_norm: ``"std"`` (F_norm = std + eps) or ``"one"`` (F_norm = 1).
        eps: added to the unbiased group std when ``f_norm == "std"``.

    Returns:
        ``(advantages [P, G], diagnostics)`` with diagnostics ``alpha`` and
        ``zero_std_group_frac`` (defined in ``GPG.metrics``).
    """
    if f_norm not in F_NORMS:
        raise ValueError(f"f_norm must be 'std' or 'one' (got {f_norm!r})")
    rewards = check_rewards(rewards)
    advantages = group_advantages(rewards, eps=eps, scale_by_std=f_norm == "std")  # [P, G]
    flat = zero_std_groups(rewards)  # [P]
    # Every group has G samples, so the fraction of samples in groups with std > 0 is the fraction
    # of such groups.
    alpha = 1.0 - float(flat.float().mean())
    if alpha > 0:
        advantages = advantages / alpha
    # alpha == 0: every group is flat and every advantage is already exactly 0.
    diagnostics = {"alpha": alpha, "zero_std_group_frac": 1.0 - alpha}
    return advantages, diagnostics


@dataclass
class GPGParams(AlgorithmParams):
    """Parameters of GPG (``algorithm.<field>``)."""

    loss_aggregation: AggregationMode = field(
        default="group_token_mean",
        metadata={"help": "loss normalisation over the optimizer step (see aapo_app.algorithms.base.AGGREGATIONS); "
                          "default as AAPO's: each group over its own token count, mean over groups"},
    )

    f_norm: FNorm = field(
        default="std",
        metadata={"help": "Advantage denominator F_norm: 'std' (group std + eps) or 'one' (no scaling)."},
    )
    eps: float = field(default=1e-4, metadata={"help": "Added to the group reward std when f_norm is 'std'."})
    regenerate: bool = field(
        default=False,
        metadata={"help": "Sample more prompts until at least min_valid_frac of the groups carry signal "
                          "(see keep_groups_by)."},
    )
    keep_groups_by: Signal = field(
        default="accuracy",
        metadata={"help": "Which groups count as carrying signal for regeneration: 'accuracy' (0 < #correct < G) or "
                          "'reward' (weighted rewards not all equal, the GPG paper's std > 0)."},
    )
    min_valid_frac: float = field(
        default=0.5, metadata={"help": "Fraction of groups with reward spread that regeneration aims for, in (0, 1]."}
    )
    max_regenerate_tries: int = field(
        default=3, metadata={"help": "Most extra rollout rounds regeneration takes (>= 0)."}
    )

    def validate(self) -> None:
        super().validate()
        require_non_negative("eps", self.eps)
        require_bool("regenerate", self.regenerate)
        if not 0 < require_number("min_valid_frac", self.min_valid_frac) <= 1:
            raise AapoError(f"algorithm.min_valid_frac must be in (0, 1] (got {self.min_valid_frac!r})")
        require_int("max_regenerate_tries", self.max_regenerate_tries, 0)


@register_algorithm
class GPG(CrossEntropyPGAlgorithm):
    """GPG: group advantage over F_norm, rescaled by 1/α, CE policy-gradient loss."""

    name = "gpg"
    Params = GPGParams
    uses_reference_samples = False
    metrics = {**algorithm_metrics("alpha", "zero_std_group_frac"), **CE_LOSS_METRICS}

    params: GPGParams

    def resampling(self) -> Resampling | None:
        # the GPG paper regenerates until at least half the groups carry signal; the set-aside flat
        # groups top the batch up again, so alpha still sees them
        if not self.params.regenerate:
            return None
        p = self.params
        return Resampling(p.max_regenerate_tries, p.min_valid_frac, p.keep_groups_by)

    def advantages(self, rewards: Tensor, ref_rewards: Tensor | None = None) -> AdvantageOutput:
        advantages, diagnostics = gpg_advantages(rewards, f_norm=self.params.f_norm, eps=self.params.eps)
        return AdvantageOutput(advantages=advantages, diagnostics=diagnostics)
