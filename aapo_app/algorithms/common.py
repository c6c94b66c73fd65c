"""Math more than one algorithm uses: group-relative advantages, the PPO clipped surrogate, the k3
KL estimator, and the check of a clip range. Pure torch, elementwise or per group; the callers mask
and aggregate.

- :func:`group_advantages`: GRPO's and DAPO's advantage, AAPO's group term, GPG's (r − mean)/F_norm
  and Dr. GRPO's r − mean.
- :func:`zero_std_groups`: the groups whose rewards are all equal (advantage 0, DAPO's filter).
- :func:`ppo_clip_loss`, :func:`k3_kl`: the per-token loss terms of GRPO, Dr. GRPO and DAPO.
"""

from __future__ import annotations

import torch
from torch import Tensor

from aapo_app.algorithms.base import check_rewards, require_number, zero_where_masked
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


def check_epsilon(name: str, value: object, upper: float | None = 1.0) -> None:
    """:class:`AapoError` naming ``algorithm.<name>`` unless ``value`` is a number in (0, upper), or
    > 0 when ``upper`` is None (a clip range of the ratio)."""
    number = require_number(name, value)
    if not number > 0 or (upper is not None and not number < upper):
        bound = f"in (0, {upper:g})" if upper is not None else "> 0"
        raise AapoError(f"algorithm.{name} must be {bound} (got {value!r})")
