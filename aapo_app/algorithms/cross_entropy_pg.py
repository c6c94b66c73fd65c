"""The loss AAPO and GPG share: the plain cross-entropy policy gradient ``−log π_θ · A``, weighted
per sequence over the optimizer step; no importance ratio, no KL term."""

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
from aapo_app.metrics import algorithm_metrics

#: The metrics of the stats returned by :func:`pg_cross_entropy_loss` (AAPO and GPG log them).
CE_LOSS_METRICS = algorithm_metrics("loss", "num_tokens", "logprob_mean")


def pg_cross_entropy_loss(logprobs: Tensor, mask: Tensor, advantages: Tensor, weights: Tensor) -> LossOutput:
    """The CE policy-gradient loss ``Σ_i w_i Σ_t −log π_θ(o_i,t) · A_i``: with the weights of
    ``group_token_mean`` (``w_i = 1/(K · N_g)``) this micro-batch's share of AAPO's eq. 4.

    Its gradient w.r.t. ``logprobs[i, t]`` is ``−w_i A_i`` on counted tokens and 0 on the others.
    ``advantages`` and ``weights`` are detached.

    Args:
        logprobs: ``[n, L]`` log π_θ of each completion token (with grad).
        mask: ``[n, L]`` bool, True = token counts.
        advantages: ``[n]`` one advantage per sequence.
        weights: ``[n]`` token weight of each sequence (:func:`~aapo_app.algorithms.base.sequence_weights`).

    Returns:
        :class:`LossOutput` with stats (sums) ``loss``, ``num_tokens``, ``logprob_sum``.
    """
    check_token_batch(logprobs, mask, advantages)
    logprobs = zero_where_masked(logprobs, mask)  # [n, L]
    per_token = -logprobs * advantages.detach().to(logprobs.dtype)[:, None]  # [n, L]
    loss = weighted_token_sum(per_token, mask, weights)
    stats = {
        "loss": float(loss.detach()),
        "num_tokens": float(mask.sum()),
        "logprob_sum": masked_sum(logprobs, mask),
    }
    return LossOutput(loss=loss, stats=stats)


class CrossEntropyPGAlgorithm(Algorithm):
    """Base of the algorithms whose loss is the plain CE policy gradient (AAPO, GPG): no ratio, no KL."""

    def loss(
        self,
        logprobs: Tensor,
        mask: Tensor,
        advantages: Tensor,
        weights: Tensor,
        old_logprobs: Tensor | None = None,
        ref_logprobs: Tensor | None = None,
    ) -> LossOutput:
        # No ratio and no KL: old_logprobs and ref_logprobs are not read.
        return pg_cross_entropy_loss(logprobs, mask, advantages, weights)
