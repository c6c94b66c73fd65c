"""RL algorithms by name: the registry, and the public pure functions of each algorithm.

``build_algorithm(name, params)`` (:mod:`~aapo_app.algorithms.registry`) is the only place that
turns ``algorithm.name`` from the config into code; nothing else in the project dispatches on the
name. Adding an algorithm is adding one module that defines an :class:`Algorithm` subclass
decorated with :func:`register_algorithm`, and importing it below.

Modules: ``base`` (the interface, loss normalisation, parameter checks), ``common`` (math several
algorithms share), ``clipped_pg`` and ``cross_entropy_pg`` (the two shared losses), ``registry``,
and one module per algorithm. Everything in this package is pure torch (no DeepSpeed), unit-tested
on CPU in ``tests/test_algorithms.py``.
"""

from __future__ import annotations

from aapo_app.algorithms.base import (
    AdvantageOutput,
    Algorithm,
    AlgorithmParams,
    LossOutput,
    Resampling,
    StepCounts,
    sequence_weights,
    step_counts,
    step_metrics,
    weighted_token_sum,
)
from aapo_app.algorithms.common import group_advantages, k3_kl, ppo_clip_loss, zero_std_groups
from aapo_app.algorithms.cross_entropy_pg import pg_cross_entropy_loss
from aapo_app.algorithms.registry import (
    ALGORITHMS,
    algorithm_class,
    algorithm_params_class,
    build_algorithm,
    register_algorithm,
)

# the built-in algorithms, registered in this order by importing them
from aapo_app.algorithms.grpo import GRPO  # isort: skip
from aapo_app.algorithms.aapo import AAPO, aapo_advantages  # isort: skip
from aapo_app.algorithms.gpg import GPG, gpg_advantages  # isort: skip
from aapo_app.algorithms.dr_grpo import DrGRPO  # isort: skip
from aapo_app.algorithms.dapo import DAPO, dapo_keep_mask  # isort: skip

#: ``algorithm.name`` when a config names none.
DEFAULT_ALGORITHM = AAPO.name

__all__ = [
    "AAPO",
    "ALGORITHMS",
    "DAPO",
    "DEFAULT_ALGORITHM",
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
