"""The algorithm interface: an advantage estimator plus a loss, chosen by name.

An :class:`Algorithm` turns the scoring stage's rewards into per-sample advantages and turns the
update stage's per-token log-probs into one scalar loss. Everything here is pure torch (no
DeepSpeed), so it runs on CPU in milliseconds and is unit-tested with hand-computed numbers.

Conventions shared by every algorithm:

- Rewards are ``[P, G]`` tensors: P prompts × G samples. Flattened row-major, row ``i*G + j`` is
  sample j of prompt i; the trainer flattens advantages the same way before the update.
- Per-token tensors are ``[n, L]`` (n sequences of a micro-batch, L padded completion length) with
  a bool ``mask`` of the same shape where **True means "this token counts"**. Values at positions
  where the mask is False are never read into the loss (they may be garbage, even ``-inf``).
- Log-probs are those of the sampled completion tokens under logits divided by the sampling
  temperature (the trainer's job; this package only consumes them).
- ``loss()`` is called once per micro-batch; :func:`aggregate_loss` is the one place that decides
  how per-token losses become a scalar.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from torch import Tensor

from aapo_app.errors import AapoError

AggregationMode = Literal["token_mean", "seq_mean", "constant"]
AGGREGATION_MODES: tuple[str, ...] = ("token_mean", "seq_mean", "constant")


@dataclass
class AdvantageOutput:
    """What an algorithm's advantage estimator returns.

    Attributes:
        advantages: ``[P, G]`` float tensor, one advantage per sample, no gradient.
        diagnostics: scalar metrics of this batch; every key is defined in ``Algorithm.metrics``.
        parts: for advantages that are a sum of terms (AAPO: group term + momentum term), each term,
            for the logged rollout samples; empty otherwise.
    """

    advantages: Tensor  # [P, G]
    diagnostics: dict[str, float]
    parts: dict[str, Tensor] = field(default_factory=dict)  # name -> [P, G] terms that sum to advantages


@dataclass
class LossOutput:
    """What an algorithm's loss returns for one micro-batch.

    Attributes:
        loss: scalar tensor, differentiable w.r.t. the ``logprobs`` given to ``loss()``.
        stats: scalar metrics of this micro-batch; every key is defined in ``Algorithm.metrics``.
    """

    loss: Tensor  # [] scalar
    stats: dict[str, float]


# ----------------------------------------------------------------------------------------------
# Parameters and their validation


@dataclass
class AlgorithmParams:
    """Base of every algorithm's ``Params``: a dataclass whose fields all have defaults and a
    ``metadata={"help": ...}`` string. :meth:`validate` raises :class:`AapoError` naming the field
    as ``algorithm.<field>`` and saying how to fix it."""

    def validate(self) -> None:
        """Raise :class:`AapoError` if a value is invalid; the base class has no fields."""


def require_number(field: str, value: object) -> float:
    """``value`` as a float, or :class:`AapoError` if it is not a finite real number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise AapoError(f"algorithm.{field} must be a finite number (got {value!r})")
    return float(value)


def require_bool(field: str, value: object) -> bool:
    """``value`` itself, or :class:`AapoError` if it is not a bool."""
    if not isinstance(value, bool):
        raise AapoError(f"algorithm.{field} must be true or false (got {value!r})")
    return value


def require_non_negative(field: str, value: object) -> float:
    """``value`` as a float, or :class:`AapoError` if it is not a finite number >= 0."""
    number = require_number(field, value)
    if number < 0:
        raise AapoError(f"algorithm.{field} must be >= 0 (got {value!r})")
    return number


# ----------------------------------------------------------------------------------------------
# Input checks and masking helpers shared by the algorithm modules


def check_rewards(rewards: Tensor, name: str = "rewards") -> Tensor:
    """Check a ``[P, G]`` reward tensor and return it as a floating tensor.

    Raises ValueError (a caller bug, not a user error) unless it is 2-D with G >= 2 samples per
    group and every value finite: group-relative advantages need at least two samples, and a NaN
    reward would silently turn into NaN advantages.
    """
    if not isinstance(rewards, Tensor) or rewards.dim() != 2:
        shape = tuple(rewards.shape) if isinstance(rewards, Tensor) else type(rewards).__name__
        raise ValueError(f"{name} must be a [P, G] tensor (got {shape})")
    if rewards.shape[1] < 2:
        raise ValueError(
            f"{name} has G = {rewards.shape[1]} samples per group; group-relative advantages need "
            "G >= 2 (rollout.group_size)"
        )
    if not rewards.is_floating_point():
        rewards = rewards.to(torch.get_default_dtype())
    if not torch.isfinite(rewards).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return rewards


def check_token_batch(logprobs: Tensor, mask: Tensor, advantages: Tensor, **others: Tensor | None) -> None:
    """Check the shapes of one micro-batch: ``logprobs``/``mask``/others ``[n, L]``, ``advantages [n]``.

    Raises ValueError (a caller bug) on a mismatch or a mask that is not bool.
    """
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be [n, L] (got {tuple(logprobs.shape)})")
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor, True = token counts (got {mask.dtype})")
    if mask.shape != logprobs.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != logprobs shape {tuple(logprobs.shape)}")
    if advantages.shape != logprobs.shape[:1]:
        raise ValueError(f"advantages must be [n] = [{logprobs.shape[0]}] (got {tuple(advantages.shape)})")
    for name, tensor in others.items():
        if tensor is not None and tensor.shape != logprobs.shape:
            raise ValueError(f"{name} shape {tuple(tensor.shape)} != logprobs shape {tuple(logprobs.shape)}")


def zero_where_masked(x: Tensor, mask: Tensor) -> Tensor:
    """``x`` with every position where ``mask`` is False set to 0.

    Applied to log-probs *before* any arithmetic, so garbage at padded positions (``-inf``, huge
    values) can neither produce NaN in the forward pass nor leak NaN into the backward pass (a
    ``where`` applied only at the end still back-propagates ``0 * inf = NaN`` through ``exp``).
    """
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))


# ----------------------------------------------------------------------------------------------
# Loss aggregation: the one function that owns it


def aggregate_loss(
    per_token: Tensor,
    mask: Tensor,
    mode: AggregationMode,
    constant: float | None = None,
) -> Tensor:
    """Reduce a per-token loss ``[n, L]`` over the tokens where ``mask`` is True to one scalar.

    Modes (``T_i`` = number of counted tokens of sequence i, ``n`` = sequences in the micro-batch):

    - ``"token_mean"``: ``Σ_i Σ_t ℓ_it / Σ_i T_i`` — mean over all completion tokens of the
      micro-batch (AAPO, GPG, DAPO).
    - ``"seq_mean"``: ``(1/n) Σ_i (Σ_t ℓ_it / T_i)`` — each sequence's token mean, then the mean
      over the n sequences (GRPO). A sequence with no counted token contributes 0 and still
      counts in ``n``.
    - ``"constant"``: ``Σ_i Σ_t ℓ_it / (n · constant)`` — each sequence's token *sum* divided by a
      fixed constant (the max completion length), then the mean over sequences (Dr. GRPO).

    Zero tokens never give NaN: an empty micro-batch or an all-False mask gives a loss of 0 that
    is still connected to the graph (its gradient is all zeros), so every rank can call backward.

    How this combines with gradient accumulation and data parallelism in this project: the trainer
    calls ``loss()`` once per micro-batch, DeepSpeed divides each micro-batch loss by
    ``gradient_accumulation_steps`` and averages gradients over the data-parallel ranks, so the
    gradient applied is that of the *mean of the per-micro-batch losses* over all micro-batches of
    all ranks. Therefore:

    - ``"token_mean"`` is a mean over the micro-batch's completion tokens, then averaged over
      micro-batches and ranks. It equals the global token mean (every token of the optimizer step
      weighted equally) only when every micro-batch has the same token count; otherwise a token
      in a micro-batch with fewer tokens weighs more.
    - ``"seq_mean"`` is exactly the global mean over sequences of each sequence's token mean
      whenever every micro-batch has the same number of sequences, which the trainer's fixed
      micro-batch size guarantees; token counts do not matter.
    - ``"constant"`` is exactly the global ``Σ tokens ℓ / (#sequences · constant)`` under the same
      condition (equal sequences per micro-batch); token counts do not matter.

    Args:
        per_token: ``[n, L]`` loss per token; values where ``mask`` is False are ignored.
        mask: ``[n, L]`` bool, True = this token counts.
        mode: one of ``"token_mean"``, ``"seq_mean"``, ``"constant"``.
        constant: the divisor for ``"constant"`` (> 0); must be None for the other modes.
    """
    if mask.dtype != torch.bool or mask.shape != per_token.shape:
        raise ValueError(
            f"mask must be a bool tensor shaped like per_token {tuple(per_token.shape)} "
            f"(got {mask.dtype} {tuple(mask.shape)})"
        )
    if mode not in AGGREGATION_MODES:
        raise ValueError(f"unknown loss aggregation mode {mode!r}; choose from {', '.join(AGGREGATION_MODES)}")
    if (mode == "constant") != (constant is not None):
        raise ValueError(f"constant must be given for mode 'constant' and only for it (mode {mode!r}, constant {constant!r})")
    if constant is not None and not constant > 0:
        raise ValueError(f"constant must be > 0 (got {constant!r})")

    masked = zero_where_masked(per_token, mask)  # [n, L], 0 where the token does not count
    n_sequences = per_token.shape[0]
    if mode == "token_mean":
        n_tokens = mask.sum().to(per_token.dtype)
        return masked.sum() / n_tokens.clamp(min=1.0)
    if mode == "seq_mean":
        tokens_per_seq = mask.sum(dim=1).to(per_token.dtype)  # [n]
        seq_means = masked.sum(dim=1) / tokens_per_seq.clamp(min=1.0)  # [n]
        return seq_means.sum() / max(n_sequences, 1)
    return masked.sum() / (max(n_sequences, 1) * float(constant))


def masked_mean(values: Tensor, mask: Tensor) -> float:
    """Mean of ``values [n, L]`` over the positions where ``mask`` is True (0.0 if none), as a float."""
    with torch.no_grad():
        return float(aggregate_loss(values.detach(), mask, "token_mean"))


# ----------------------------------------------------------------------------------------------
# The interface


class Algorithm(abc.ABC):
    """An RL post-training algorithm: advantages from rewards, and a loss from log-probs.

    Subclasses set the class attributes, are registered by name with
    ``aapo_app.algorithms.register_algorithm``, and are built with ``build_algorithm(name)``.

    Class attributes:
        name: registry name (``algorithm.name`` in the config).
        Params: the dataclass of this algorithm's parameters (``algorithm.<field>`` in the config).
        uses_reference_samples: True if the rollout must also sample a group of G completions from
            the frozen reference model and score them (``ref_rewards`` in :meth:`advantages`).
        metrics: every key this algorithm logs (diagnostics and stats) → its definition.
    """

    name: ClassVar[str] = ""
    Params: ClassVar[type[AlgorithmParams]] = AlgorithmParams
    uses_reference_samples: ClassVar[bool] = False
    metrics: ClassVar[dict[str, str]] = {}

    def __init__(self, params: AlgorithmParams | None = None):
        if params is None:
            params = self.Params()
        if not isinstance(params, self.Params):
            raise TypeError(f"{type(self).__name__} takes {self.Params.__qualname__}, got {type(params).__name__}")
        params.validate()
        self.params = params

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.params!r})"

    @property
    def uses_reference_logprobs(self) -> bool:
        """True if :meth:`loss` needs per-token log-probs of the policy's samples under the frozen
        reference model (a KL term)."""
        return False

    @property
    def updates_per_rollout(self) -> int:
        """Optimizer steps taken on one rollout (GRPO's μ); > 1 needs ``old_logprobs``."""
        return 1

    def resampling(self) -> tuple[int, float] | None:
        """``(max_extra_rounds, min_kept_fraction)`` if the trainer should drop prompt groups whose
        rewards are all equal and refill the batch with new prompts (DAPO's dynamic sampling), else
        None. The trainer samples more rounds, all ranks together, until at least
        ``min_kept_fraction`` of each rank's groups have reward spread or the rounds run out."""
        return None

    @property
    def uses_old_logprobs(self) -> bool:
        """True if :meth:`loss` has an importance ratio π_θ/π_old that reads ``old_logprobs``.

        With one update per rollout ``old_logprobs=None`` is exact (the loss then uses
        ``logprobs.detach()``: ratio 1, same gradient), so the trainer only needs to compute them
        when it takes more than one optimizer step per rollout.
        """
        return False

    @abc.abstractmethod
    def advantages(self, rewards: Tensor, ref_rewards: Tensor | None = None) -> AdvantageOutput:
        """Advantages ``[P, G]`` from the policy group's rewards ``[P, G]`` (and, for algorithms with
        ``uses_reference_samples``, the reference group's rewards ``[P, G]``, paired by index)."""

    @abc.abstractmethod
    def loss(
        self,
        logprobs: Tensor,
        mask: Tensor,
        advantages: Tensor,
        old_logprobs: Tensor | None = None,
        ref_logprobs: Tensor | None = None,
        max_completion_length: int | None = None,
    ) -> LossOutput:
        """The loss of one micro-batch.

        Args:
            logprobs: ``[n, L]`` log π_θ of each completion token (logits / temperature), with grad.
            mask: ``[n, L]`` bool, True = completion token that counts.
            advantages: ``[n]`` advantage of each sequence (the flattened ``[P, G]`` rows).
            old_logprobs: ``[n, L]`` log π_old at rollout time, or None (one update per rollout).
            ref_logprobs: ``[n, L]`` log π_ref of the same tokens, needed when
                ``uses_reference_logprobs``.
            max_completion_length: the rollout's max new tokens (for constant aggregation).
        """


def params_fields_help(params_class: type[AlgorithmParams]) -> dict[str, str]:
    """``{field name: help text}`` of a Params dataclass (for CLI help and the README)."""
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(params_class)}
