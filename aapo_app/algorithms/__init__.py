"""RL algorithms by name: the registry, and the public pure functions of each algorithm.

``build_algorithm(name, params)`` is the only place that turns ``algorithm.name`` from the config
into code; nothing else in the project dispatches on the name. Adding an algorithm is adding one
module that defines an :class:`Algorithm` subclass decorated with :func:`register_algorithm`, and
importing it at the bottom of this file.

Everything in this package is pure torch (no DeepSpeed), unit-tested on CPU in
``tests/test_algorithms.py``.
"""

from __future__ import annotations

from aapo_app.algorithms.base import (
    AdvantageOutput,
    Algorithm,
    AlgorithmParams,
    LossOutput,
    Resampling,
    StepCounts,
    params_fields_help,
    sequence_weights,
    step_counts,
    step_metrics,
    weighted_token_sum,
)
from aapo_app.errors import AapoError

#: Registry: ``algorithm.name`` → Algorithm subclass. Filled by :func:`register_algorithm`.
ALGORITHMS: dict[str, type[Algorithm]] = {}


def register_algorithm(cls: type[Algorithm]) -> type[Algorithm]:
    """Class decorator: add ``cls`` to :data:`ALGORITHMS` under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in ALGORITHMS and ALGORITHMS[cls.name] is not cls:
        raise ValueError(f"algorithm {cls.name!r} is already registered by {ALGORITHMS[cls.name].__name__}")
    if not (isinstance(cls.Params, type) and issubclass(cls.Params, AlgorithmParams)):
        raise TypeError(f"{cls.__name__}.Params must be an AlgorithmParams dataclass")
    missing_help = [name for name, text in params_fields_help(cls.Params).items() if not text]
    if missing_help:
        raise TypeError(f"{cls.__name__}.Params fields without metadata help: {', '.join(missing_help)}")
    ALGORITHMS[cls.name] = cls
    return cls


def algorithm_class(name: str) -> type[Algorithm]:
    """The Algorithm subclass registered as ``name``, or :class:`AapoError` naming the choices."""
    try:
        return ALGORITHMS[name]
    except (KeyError, TypeError):
        choices = ", ".join(sorted(ALGORITHMS))
        raise AapoError(f"algorithm.name: unknown algorithm {name!r}; choose from {choices}") from None


def algorithm_params_class(name: str) -> type[AlgorithmParams]:
    """The Params dataclass of algorithm ``name`` (for the config loader)."""
    return algorithm_class(name).Params


def build_algorithm(name: str, params: AlgorithmParams | None = None) -> Algorithm:
    """The algorithm ``name`` with ``params`` (its defaults if None), validated.

    Raises :class:`AapoError` for an unknown name or an invalid parameter value.
    """
    return algorithm_class(name)(params)


# The algorithm modules import register_algorithm from this package, so they come after it.
from aapo_app.algorithms.grpo import GRPO, group_advantages, k3_kl, ppo_clip_loss, zero_std_groups  # noqa: E402
from aapo_app.algorithms.aapo import AAPO, aapo_advantages, pg_cross_entropy_loss  # noqa: E402
from aapo_app.algorithms.gpg import GPG, gpg_advantages  # noqa: E402
from aapo_app.algorithms.dr_grpo import DrGRPO  # noqa: E402
from aapo_app.algorithms.dapo import DAPO, dapo_keep_mask  # noqa: E402

__all__ = [
    "AAPO",
    "ALGORITHMS",
    "DAPO",
    "DrGRPO",
    "GPG",
    "GRPO",
    "AdvantageOutput",
    "Algorithm",
    "AlgorithmParams",
    "LossOutput",
    "aapo_advantages",
    "Resampling",
    "StepCounts",
    "algorithm_class",
    "algorithm_params_class",
    "build_algorithm",
    "dapo_keep_mask",
    "gpg_advantages",
    "group_advantages",
    "k3_kl",
    "pg_cross_entropy_loss",
    "ppo_clip_loss",
    "register_algorithm",
    "sequence_weights",
    "step_counts",
    "step_metrics",
    "weighted_token_sum",
    "zero_std_groups",
]
