"""The algorithm registry: ``algorithm.name`` → :class:`~aapo_app.algorithms.base.Algorithm` subclass.

:func:`build_algorithm` is the only place that turns a configured name into code; nothing else in
the project dispatches on the name. An algorithm module registers its class with
:func:`register_algorithm`; ``aapo_app.algorithms`` imports every built-in module, so importing the
package fills :data:`ALGORITHMS`.
"""

from __future__ import annotations

from aapo_app.algorithms.base import Algorithm, AlgorithmParams, params_fields_help
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
