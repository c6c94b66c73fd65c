"""GPG: Group Policy Gradient (Chu et al., arXiv 2504.02546).

For each prompt the policy samples G completions with rewards r_1..r_G, and

    Â_i = (r_i − mean(r)) / F_norm,      F_norm ∈ {1 ("one"), std(r) + ε ("std")}
    α   = (# samples in groups with std > 0) / (# samples)
    A_i = Â_i / α                         (α = 0 → every advantage is 0)
    L   = (1 / Σ_i |o_i|) · Σ_i Σ_t −log π_θ(o_i,t | q, o_i,<t) · A_i

std is Bessel-corrected (``torch.std``), ε = 1e-4. Groups whose rewards are all equal carry no
gradient; dividing by α rescales the rest so the gradient's size does not shrink with the fraction
of such groups. The loss is the same CE policy gradient as AAPO (token mean, no ratio, no KL).

Departures from the authors' code (AMAP-ML GPG, built on open-r1/TRL):

- The authors divide the *loss* by ``max(1 − frac_zero_std_groups, 0.05)``, reading that fraction
  from the metrics log of the latest scoring call. Here 1/α multiplies the *advantages* (the same
  gradient, because the CE loss is linear in A) and α is returned in the diagnostics, so it is
  computed from exactly the rewards it rescales. There is no 0.05 floor: α = 0 means every
  advantage is already 0, and the result is 0, not 0/0.
- α is computed over the ``[P, G]`` rewards passed in (the authors' code uses the rewards gathered
  over all processes); the trainer decides which batch that is.
- The authors' batch-level std option (``scale_batch``) is not provided.
- The optional regeneration until at least half the groups have std > 0 belongs to the rollout
  stage, not to this module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from torch import Tensor

from aapo_app.algorithms import register_algorithm
from aapo_app.algorithms.aapo import CE_LOSS_METRICS, CrossEntropyPGAlgorithm
from aapo_app.algorithms.base import (
    AdvantageOutput,
    AlgorithmParams,
    check_rewards,
    require_bool,
    require_number,
    require_non_negative,
)
from aapo_app.algorithms.grpo import group_advantages, zero_std_groups
from aapo_app.errors import AapoError

F_NORMS = ("std", "one")


def gpg_advantages(
    rewards: Tensor, f_norm: Literal["std", "one"] = "std", eps: float = 1e-4
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

    f_norm: str = field(
        default="std",
        metadata={"help": "Advantage denominator F_norm: 'std' (group std + eps) or 'one' (no scaling)."},
    )
    eps: float = field(default=1e-4, metadata={"help": "Added to the group reward std when f_norm is 'std'."})
    regenerate: bool = field(
        default=False,
        metadata={"help": "Sample more prompts until at least min_valid_frac of the groups have reward std > 0."},
    )
    min_valid_frac: float = field(
        default=0.5, metadata={"help": "Fraction of groups with reward spread that regeneration aims for, in (0, 1]."}
    )
    max_regenerate_tries: int = field(
        default=3, metadata={"help": "Most extra rollout rounds regeneration takes (>= 0)."}
    )

    def validate(self) -> None:
        if self.f_norm not in F_NORMS:
            raise AapoError(f"algorithm.f_norm must be 'std' or 'one' (got {self.f_norm!r})")
        require_non_negative("eps", self.eps)
        require_bool("regenerate", self.regenerate)
        if not 0 < require_number("min_valid_frac", self.min_valid_frac) <= 1:
            raise AapoError(f"algorithm.min_valid_frac must be in (0, 1] (got {self.min_valid_frac!r})")
        tries = self.max_regenerate_tries
        if isinstance(tries, bool) or not isinstance(tries, int) or tries < 0:
            raise AapoError(f"algorithm.max_regenerate_tries must be an integer >= 0 (got {tries!r})")


@register_algorithm
class GPG(CrossEntropyPGAlgorithm):
    """GPG: group advantage over F_norm, rescaled by 1/α, CE policy-gradient loss."""

    name = "gpg"
    Params = GPGParams
    uses_reference_samples = False
    metrics = {
        "alpha": "fraction of samples in groups whose rewards are not all equal; advantages are divided by it",
        "zero_std_group_frac": "fraction of prompts whose G rewards are all equal (advantage 0, no gradient)",
        **CE_LOSS_METRICS,
    }

    params: GPGParams

    def resampling(self) -> tuple[int, float] | None:
        # the GPG paper regenerates until at least half the groups carry signal; the set-aside flat
        # groups top the batch up again, so alpha still sees them
        return (self.params.max_regenerate_tries, self.params.min_valid_frac) if self.params.regenerate else None

    def advantages(self, rewards: Tensor, ref_rewards: Tensor | None = None) -> AdvantageOutput:
        advantages, diagnostics = gpg_advantages(rewards, f_norm=self.params.f_norm, eps=self.params.eps)
        return AdvantageOutput(advantages=advantages, diagnostics=diagnostics)
