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
- ``loss()`` is called once per micro-batch with a weight per sequence, and returns that
  micro-batch's share ``Σ_i w_i Σ_t ℓ_it`` of the objective of the optimizer step. The weights come
  from :func:`sequence_weights`, computed by the update stage over *every* micro-batch of the
  optimizer step on *every* rank before the first backward, so what is optimised never depends on
  ``train.micro_batch_size`` or on the number of ranks (``algorithm.loss_aggregation``).
"""

from __future__ import annotations

import abc
import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from torch import Tensor

from aapo_app.errors import AapoError


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


#: Which groups carry signal: by the accuracy (0 < #correct < G) or by the weighted rewards.
Signal = Literal["accuracy", "reward"]


@dataclass(frozen=True)
class Resampling:
    """Dynamic sampling / regeneration: which groups count as carrying signal, and how hard to try.

    Attributes:
        max_extra_rounds: most extra rollout rounds per step.
        min_kept_fraction: stop once at least this fraction of each rank's groups carry signal.
        signal: ``"accuracy"``: a group carries signal when 0 < #correct < G (the DAPO paper's rule);
            ``"reward"``: when its weighted rewards are not all equal.
    """

    max_extra_rounds: int
    min_kept_fraction: float
    signal: Signal = "accuracy"


@dataclass
class LossOutput:
    """What an algorithm's loss returns for one micro-batch.

    Attributes:
        loss: scalar tensor, differentiable w.r.t. the ``logprobs`` given to ``loss()``: this
            micro-batch's share of the optimizer step's objective.
        stats: additive statistics of this micro-batch (sums, see :func:`step_metrics` for how the
            update turns them into metrics); every resulting metric is defined in ``Algorithm.metrics``.
    """

    loss: Tensor  # [] scalar
    stats: dict[str, float]


# ----------------------------------------------------------------------------------------------
# Loss normalisation over the optimizer step: the one place that owns it

#: ``algorithm.loss_aggregation``: how per-token losses are normalised over the optimizer step.
AggregationMode = Literal["group_token_mean", "token_mean", "seq_mean", "constant", "micro_batch_token_mean"]
AGGREGATION_MODES: tuple[str, ...] = typing.get_args(AggregationMode)

#: Each :data:`AggregationMode` → what the objective of one optimizer step is. ``ℓ_it`` is the
#: per-token loss of token t of sequence i, ``|o_i|`` its counted tokens; "the step" is every
#: sequence of one optimizer step on every data-parallel rank (all its micro-batches).
AGGREGATIONS: dict[str, str] = {
    "group_token_mean": "each prompt group's token mean (1/N_g) Σ_{i∈g} Σ_t ℓ_it with N_g = Σ_{i∈g} |o_i|, "
                        "averaged over the groups of the step (AAPO's Definition and eq. 4; GPG)",
    "token_mean": "(1/N) Σ_i Σ_t ℓ_it with N the completion tokens of the whole step (DAPO's token-level loss)",
    "seq_mean": "(1/S) Σ_i (1/|o_i|) Σ_t ℓ_it over the S sequences of the step (GRPO)",
    "constant": "(1/S) Σ_i (1/L_max) Σ_t ℓ_it with L_max = rollout.max_new_tokens (Dr. GRPO)",
    "micro_batch_token_mean": "the token mean of each micro-batch, averaged over the micro-batches of all ranks: "
                              "depends on train.micro_batch_size (what the AAPO authors' TRL-based code computes)",
}


@dataclass(frozen=True)
class StepCounts:
    """Sizes of one optimizer step that a loss normaliser needs; summed over ranks by the caller.

    ``groups`` counts the prompt groups that have at least one sequence in the step (a group split
    over several optimizer steps counts in each of them, with the tokens it has there)."""

    tokens: float
    sequences: float
    groups: float
    micro_batches: float

    def as_list(self) -> list[float]:
        return [self.tokens, self.sequences, self.groups, self.micro_batches]


def step_counts(lengths: Tensor, group_ids: Tensor, micro_ids: Tensor) -> StepCounts:
    """This rank's :class:`StepCounts` for the sequences of one optimizer step.

    Args:
        lengths: ``[n]`` counted completion tokens of each sequence of the step on this rank.
        group_ids: ``[n]`` prompt group of each sequence (any ints; equal = same group).
        micro_ids: ``[n]`` micro-batch of each sequence (any ints; equal = same micro-batch).
    """
    return StepCounts(tokens=float(lengths.sum()), sequences=float(lengths.numel()),
                      groups=float(torch.unique(group_ids).numel()), micro_batches=float(torch.unique(micro_ids).numel()))


def _per_id_sum(values: Tensor, ids: Tensor) -> Tensor:
    """``[n]``: for each position, the sum of ``values`` over the positions with the same id."""
    _, inverse = torch.unique(ids, return_inverse=True)
    sums = torch.zeros(int(inverse.max()) + 1 if inverse.numel() else 0, dtype=values.dtype)
    return sums.index_add_(0, inverse, values)[inverse]


def sequence_weights(mode: str, lengths: Tensor, group_ids: Tensor, micro_ids: Tensor, totals: StepCounts,
                     constant: float | None = None) -> Tensor:
    """``[n]`` float64 weight w_i of every token of sequence i, such that the objective of the step
    (:data:`AGGREGATIONS`) is ``Σ_i w_i Σ_t ℓ_it`` summed over the sequences of *all* ranks.

    ``totals`` are the step's :class:`StepCounts` summed over ranks. Per mode (N, S, K, M: tokens,
    sequences, groups and micro-batches of the step; N_g a group's tokens in the step, N_m a
    micro-batch's tokens):

    - group_token_mean: ``1 / (K · N_g)``      - token_mean: ``1 / N``
    - seq_mean: ``1 / (S · |o_i|)``            - constant: ``1 / (S · constant)``
    - micro_batch_token_mean: ``1 / (M · N_m)``

    A sequence (or group, or micro-batch) without counted tokens gets weight 0 instead of 1/0;
    it has no token to weigh anyway.
    """
    if mode not in AGGREGATIONS:
        raise ValueError(f"unknown loss aggregation mode {mode!r}; choose from {', '.join(AGGREGATION_MODES)}")
    if (mode == "constant") != (constant is not None):
        raise ValueError(f"constant must be given for mode 'constant' and only for it (mode {mode!r}, constant {constant!r})")
    if constant is not None and not constant > 0:
        raise ValueError(f"constant must be > 0 (got {constant!r})")
    lengths = lengths.to(torch.float64)

    def inverse(x: Tensor) -> Tensor:
        return torch.where(x > 0, 1.0 / x.clamp(min=1e-300), torch.zeros_like(x))

    if mode == "group_token_mean":
        return inverse(_per_id_sum(lengths, group_ids)) / max(totals.groups, 1.0)
    if mode == "token_mean":
        return torch.full_like(lengths, 1.0 / max(totals.tokens, 1.0))
    if mode == "seq_mean":
        return inverse(lengths) / max(totals.sequences, 1.0)
    if mode == "constant":
        return torch.full_like(lengths, 1.0 / (max(totals.sequences, 1.0) * float(constant)))
    return inverse(_per_id_sum(lengths, micro_ids)) / max(totals.micro_batches, 1.0)


def weighted_token_sum(per_token: Tensor, mask: Tensor, weights: Tensor) -> Tensor:
    """``Σ_i w_i Σ_t ℓ_it`` over the tokens where ``mask`` is True: this micro-batch's share of the
    step objective (:func:`sequence_weights` gives ``weights [n]``). Garbage at masked positions is
    never read; an all-False mask gives 0, still connected to the graph (a zero gradient)."""
    if mask.dtype != torch.bool or mask.shape != per_token.shape:
        raise ValueError(
            f"mask must be a bool tensor shaped like per_token {tuple(per_token.shape)} "
            f"(got {mask.dtype} {tuple(mask.shape)})"
        )
    if weights.shape not in (per_token.shape[:1], per_token.shape):
        raise ValueError(f"weights must be [n] = [{per_token.shape[0]}] or [n, L] = {list(per_token.shape)} "
                         f"(got {tuple(weights.shape)})")
    masked = zero_where_masked(per_token, mask)  # [n, L], 0 where the token does not count
    if weights.dim() == 2:  # a weight per token: the sequence's weight times a per-token factor (TIS)
        return (masked * weights.detach().to(per_token.dtype)).sum()
    return (masked.sum(dim=1) * weights.detach().to(per_token.dtype)).sum()


TIS_LEVELS = ("token", "sequence")
TIS_MODES = ("truncate", "mask")


def tis_weights(train_logprobs: Tensor, sampler_logprobs: Tensor, mask: Tensor, level: str, cap: float,
                mode: str) -> tuple[Tensor, dict[str, float]]:
    """Truncated importance sampling: ``[n, L]`` detached factors for every token's loss, and their
    statistics (sums and counts over this micro-batch, for the caller to reduce).

    With ρ = π_train / π_sampler of the sampled tokens (``exp`` of the log-prob difference; at the
    sequence level, the product over the sequence's counted tokens, shared by all of them):
    ``truncate`` gives ``min(ρ, cap)``; ``mask`` gives ρ inside ``[1/cap, cap]`` and 0 outside (the
    token or sequence is dropped). ``cap = inf`` leaves ρ as it is."""
    if level not in TIS_LEVELS or mode not in TIS_MODES:
        raise ValueError(f"TIS level {level!r} / mode {mode!r}: choose from {TIS_LEVELS} / {TIS_MODES}")
    diff = zero_where_masked((train_logprobs - sampler_logprobs).detach().double(), mask)  # [n, L]
    if level == "token":
        log_ratio = diff
    else:
        log_ratio = diff.sum(dim=1, keepdim=True).expand_as(diff)  # [n, L], the sequence's on every token
    ratio = torch.exp(log_ratio)
    if mode == "truncate":
        factor = ratio.clamp(max=cap)
        cut = ratio > cap
    else:
        cut = (ratio > cap) | (ratio < 1.0 / cap)
        factor = torch.where(cut, torch.zeros_like(ratio), ratio)
    factor = torch.where(mask, factor, torch.zeros_like(factor))
    if level == "token":  # the units the ratio is taken over: tokens, or sequences with counted tokens
        r, c = ratio[mask], cut[mask]
    else:
        rows = mask.any(dim=1)
        r, c = ratio[:, 0][rows], cut[:, 0][rows]
    stats = {
        "ratio_sum": float(r.sum()), "ratio_min": float(r.min()) if r.numel() else float("inf"),
        "ratio_max": float(r.max()) if r.numel() else float("-inf"), "units": float(r.numel()),
        "cut": float(c.sum()), "abs_diff_sum": float(diff.abs()[mask].sum()), "tokens": float(mask.sum()),
    }
    return factor.to(train_logprobs.dtype), stats


def masked_sum(values: Tensor, mask: Tensor) -> float:
    """Sum of ``values [n, L]`` over the positions where ``mask`` is True, as a float (no gradient)."""
    with torch.no_grad():
        return float(zero_where_masked(values.detach(), mask).sum())


def step_metrics(totals: dict[str, float], optimizer_steps: int) -> dict[str, float]:
    """Turn the loss stats of an update, summed over its micro-batches and ranks, into metrics.

    Conventions for the stat keys of :class:`LossOutput` (all are sums):

    - ``num_tokens``: counted completion tokens → ``num_tokens`` per optimizer step;
    - ``<x>_tokens``: tokens where something holds → ``<x>_frac``, a fraction of ``num_tokens``;
    - ``<x>_sum``: a per-token quantity summed over counted tokens → ``<x>_mean`` per token;
    - anything else (``loss``, ``pg_loss``): a share of the step objective → its mean per optimizer step.
    """
    tokens = max(totals.get("num_tokens", 0.0), 1.0)
    out = {}
    for key, value in totals.items():
        if key == "num_tokens":
            out[key] = value / optimizer_steps
        elif key.endswith("_tokens"):
            out[key[: -len("_tokens")] + "_frac"] = value / tokens
        elif key.endswith("_sum"):
            out[key[: -len("_sum")] + "_mean"] = value / tokens
        else:
            out[key] = value / optimizer_steps
    return out


# ----------------------------------------------------------------------------------------------
# Parameters and their validation


@dataclass
class AlgorithmParams:
    """Base of every algorithm's ``Params``: a dataclass whose fields all have defaults and a
    ``metadata={"help": ...}`` string; a field with a fixed set of string choices is typed
    ``Literal``. :meth:`validate` raises :class:`AapoError` naming the field as
    ``algorithm.<field>`` and saying how to fix it."""

    loss_aggregation: AggregationMode = field(
        default="group_token_mean",
        metadata={"help": "How per-token losses are normalised over the optimizer step: "
                          + "; ".join(f"'{k}': {v}" for k, v in AGGREGATIONS.items())},
    )
    entropy_coef: float = field(
        default=0.0,
        metadata={"help": "Entropy bonus: the step objective minus entropy_coef x the policy's token entropy, "
                          "normalised like the loss (loss_aggregation); 0 = none."},
    )
    tis: Literal["auto", "off", "token", "sequence"] = field(
        default="auto",
        metadata={"help": "Truncated importance sampling against the sampler's log-probs: weight each token's loss by "
                          "rho = pi_train / pi_sampler of its sampled token ('token') or of its whole sequence "
                          "('sequence'), bounded by tis_cap; 'auto' = 'token' when the sampler is not the trainer's "
                          "own forward (rollout.backend=vllm), else 'off'."},
    )
    tis_cap: float = field(default=2.0, metadata={"help": "C of truncated importance sampling (> 1; inf = no bound)."})
    tis_mode: Literal["truncate", "mask"] = field(
        default="truncate",
        metadata={"help": "'truncate': min(rho, C); 'mask': rho inside [1/C, C], and the token (or sequence) is "
                          "dropped outside it."},
    )
    mask_truncated: bool = field(
        default=False,
        metadata={"help": "A completion cut at rollout.max_new_tokens without EOS gets no gradient and does not "
                          "count in the loss normaliser (DAPO's overlong filtering)."},
    )

    def rollout_passes(self) -> tuple[int, int]:
        """``(mini_batches, num_iterations)``: optimizer steps per pass over one rollout, and passes
        (GRPO's μ). One and one (a single on-policy step) unless the algorithm has a ratio."""
        return 1, 1

    def optimizer_steps_per_rollout(self) -> int:
        """Optimizer steps one rollout takes: mini-batches x passes."""
        mini_batches, iterations = self.rollout_passes()
        return mini_batches * iterations

    def validate(self) -> None:
        """Raise :class:`AapoError` if a value is invalid; here, a ``Literal`` field whose value is
        not one of its choices. Subclasses call ``super().validate()`` first."""
        for name, tp in typing.get_type_hints(type(self)).items():
            if typing.get_origin(tp) is Literal:
                require_choice(name, getattr(self, name), typing.get_args(tp))
        require_number("entropy_coef", self.entropy_coef)
        cap = self.tis_cap
        if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not cap > 1.0:
            raise AapoError(f"algorithm.tis_cap must be a number > 1 (got {cap!r}); inf leaves the ratio unbounded")
        require_bool("mask_truncated", self.mask_truncated)


def require_choice(field: str, value: object, choices: tuple) -> object:
    """``value`` itself, or :class:`AapoError` if it is not one of ``choices`` (of their type), in
    the words of the config loader's check of ``Literal`` fields."""
    if value in choices and type(value) is type(choices[0]):
        return value
    raise AapoError(f"algorithm.{field} must be one of {', '.join(str(c) for c in choices)} (got {value!r})")


def require_int(field: str, value: object, minimum: int) -> int:
    """``value`` itself, or :class:`AapoError` if it is not an integer >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise AapoError(f"algorithm.{field} must be an integer >= {minimum} (got {value!r})")
    return value


@dataclass
class PolicyRatioParams(AlgorithmParams):
    """Parameters shared by the algorithms with an importance ratio to the rollout's policy (GRPO,
    Dr. GRPO, DAPO): the rollout is split into ``mini_batches`` optimizer steps, and the split is
    passed over ``num_iterations`` times, each step's ratio taken against the log-probs of the policy
    that sampled the rollout."""

    mini_batches: int = field(
        default=1,
        metadata={"help": "optimizer steps per pass over a rollout: each rank's P x G sequences are split into this "
                          "many equal, consecutive mini-batches (must divide P x G); the ratio and its clipping act "
                          "from the second on"},
    )
    num_iterations: int = field(
        default=1,
        metadata={"help": "μ: passes over the rollout's mini-batches (mini_batches x μ optimizer steps per rollout)"},
    )

    def rollout_passes(self) -> tuple[int, int]:
        return self.mini_batches, self.num_iterations

    def validate(self) -> None:
        super().validate()
        require_int("mini_batches", self.mini_batches, 1)
        require_int("num_iterations", self.num_iterations, 1)


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
        metrics: every key this algorithm logs (diagnostics and stats) → its definition; the trainer
            logs each as ``algo/<key>``, defined once in ``aapo_app.metrics.METRICS`` (build the
            table with ``aapo_app.metrics.algorithm_metrics``).
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
    def rollout_passes(self) -> tuple[int, int]:
        """``(mini_batches, num_iterations)``: the rollout is split into ``mini_batches`` optimizer
        steps and passed over ``num_iterations`` times (see :class:`PolicyRatioParams`)."""
        return self.params.rollout_passes()

    @property
    def optimizer_steps_per_rollout(self) -> int:
        return self.params.optimizer_steps_per_rollout()

    @property
    def uses_old_logprobs(self) -> bool:
        """True if :meth:`loss` has an importance ratio π_θ/π_old that reads ``old_logprobs``.

        With one optimizer step per rollout ``old_logprobs=None`` is exact (the loss then uses
        ``logprobs.detach()``: ratio 1, same gradient), so the update stage only computes them
        when it takes more than one optimizer step per rollout.
        """
        return False

    def tis_level(self, off_trainer_sampler: bool) -> str | None:
        """``"token"`` / ``"sequence"`` when truncated importance sampling applies, else None:
        ``algorithm.tis``, with ``auto`` on exactly when the sampler is not the trainer's own forward."""
        tis = self.params.tis
        if tis == "auto":
            return "token" if off_trainer_sampler else None
        return None if tis == "off" else tis

    def aggregation(self, max_new_tokens: int) -> tuple[str, float | None]:
        """``(mode, constant)`` for :func:`sequence_weights`: ``algorithm.loss_aggregation``, and the
        rollout's max new tokens as the constant of the ``constant`` mode."""
        mode = self.params.loss_aggregation
        return mode, (float(max_new_tokens) if mode == "constant" else None)

    def resampling(self) -> Resampling | None:
        """How the trainer should drop prompt groups without signal and refill the batch with new
        prompts (DAPO's dynamic sampling, GPG's regeneration), or None."""
        return None

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
        weights: Tensor,
        old_logprobs: Tensor | None = None,
        ref_logprobs: Tensor | None = None,
    ) -> LossOutput:
        """One micro-batch's share ``Σ_i w_i Σ_t ℓ_it`` of the optimizer step's objective.

        Args:
            logprobs: ``[n, L]`` log π_θ of each completion token (logits / temperature), with grad.
            mask: ``[n, L]`` bool, True = completion token that counts.
            advantages: ``[n]`` advantage of each sequence (the flattened ``[P, G]`` rows).
            weights: ``[n]`` token weight of each sequence from :func:`sequence_weights` (computed
                over the whole optimizer step on every rank).
            old_logprobs: ``[n, L]`` log π_old at rollout time, or None (one step per rollout).
            ref_logprobs: ``[n, L]`` log π_ref of the same tokens, needed when
                ``uses_reference_logprobs``.
        """


def params_fields_help(params_class: type[AlgorithmParams]) -> dict[str, str]:
    """``{field name: help text}`` of a Params dataclass (for CLI help and the README)."""
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(params_class)}
