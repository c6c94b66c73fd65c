"""Reward functions, chosen by name, and their weighted sum r = sum_k w_k R_k.

Every reward is a class registered under its name with ``@register_reward``; ``REWARDS`` is the only
place names are looked up. A reward registered with ``kind="format"`` checks the completion's form;
:func:`format_reward` picks the one whose rate is logged as ``format_rate``. A reward is called as ``reward(completions, answers, lengths)`` with N
completions, their N gold answers and their N lengths in tokens, and returns N floats.

:class:`RewardModel` turns a config's ``rewards.weights`` into one scorer::

    model = RewardModel({"accuracy": 1.0, "boxed_format": 0.5})
    out = model.score(completions, answers, lengths)
    out.total          # [N] float32, sum_k w_k * R_k
    out.per_reward     # {"accuracy": [N], "boxed_format": [N]}, unweighted
    out.counts         # {"verify_timeout": ..., "verify_error": ..., "no_answer": ..., "unevaluated": ...}
    model.close()      # stops the grader's worker processes

Reward parameters. A reward may define a nested ``Params`` dataclass (a :class:`RewardParams`: every
field has a default and ``metadata={"help": ...}``; ``validate()`` raises :class:`AapoError` naming
``rewards.params.<reward>.<field>``). ``RewardModel(weights, params={"cosine": {"max_len": 1000}})``
builds each reward with its params; :func:`reward_params_help` lists them all for documentation.
Params given for a registered reward that has no weight are type-checked and validated but unused
(so a preset's params survive a ``rewards.weights`` override); params for an unknown reward, for a
reward without ``Params``, an unknown field or a wrong type or value are errors.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
import typing
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from aapo_app.errors import AapoError
from aapo_app.grader import Grader, GradeResult

REWARDS: dict[str, type] = {}

#: What a reward's ``kind`` may be (None: no particular kind). A ``"format"`` reward scores the
#: completion's form (1 = well-formed); the trainer logs its rate as ``format_rate``.
REWARD_KINDS = ("format",)


def register_reward(name: str, kind: str | None = None) -> Callable[[type], type]:
    """Class decorator: make the reward available as ``name`` in ``rewards.weights``, of ``kind``
    (one of :data:`REWARD_KINDS`, or None)."""
    if kind is not None and kind not in REWARD_KINDS:
        raise ValueError(f"reward kind must be one of {', '.join(REWARD_KINDS)} or None (got {kind!r})")

    def decorator(cls: type) -> type:
        if name in REWARDS:
            raise ValueError(f"reward {name!r} is already registered by {REWARDS[name].__name__}")
        cls.name = name
        cls.kind = kind
        if "Params" in cls.__dict__ and cls.Params is not None:
            cls.Params.reward_name = name
        REWARDS[name] = cls
        return cls

    return decorator


def format_reward(names: Iterable[str]) -> str | None:
    """The reward of kind ``"format"`` among ``names`` (e.g. ``rewards.weights``) whose rate is
    logged as ``format_rate``: the first one in registration order (the built-ins ``boxed_format``,
    ``format``, ``tag_format``, then plugins'), or None when no format reward is among them."""
    names = set(names)
    return next((name for name, cls in REWARDS.items() if cls.kind == "format" and name in names), None)


# ----------------------------------------------------------------------------------------------
# Parameters


@dataclass
class RewardParams:
    """Base of every reward's ``Params``: a dataclass whose fields all have defaults and a
    ``metadata={"help": ...}`` string, typed ``int`` or ``float``.

    :meth:`validate` checks the types (an int field takes an int, a float field any finite real
    number, never a bool) and subclasses add their own checks after ``super().validate()``; every
    error is an :class:`AapoError` naming ``rewards.params.<reward>.<field>`` and the fix.
    """

    reward_name: ClassVar[str] = ""  # set by @register_reward

    @classmethod
    def key(cls, field_name: str) -> str:
        """The config key of a field: ``rewards.params.<reward>.<field>``."""
        return f"rewards.params.{cls.reward_name}.{field_name}"

    def validate(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value, tp = getattr(self, f.name), hints[f.name]
            if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
                raise AapoError(f"{self.key(f.name)} must be an integer (got {value!r}), e.g. {f.default!r}")
            if tp is float and (
                isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            ):
                raise AapoError(f"{self.key(f.name)} must be a finite number (got {value!r}), e.g. {f.default!r}")


def build_reward_params(name: str, data: dict[str, Any] | RewardParams | None) -> RewardParams | None:
    """The validated ``Params`` of reward ``name`` from a mapping of field -> value (or an instance).

    Returns None for a reward without ``Params`` given no params. An int given for a float field is
    converted. Raises :class:`AapoError` (one line, naming the key) for an unknown reward, params for
    a reward that takes none, an unknown field, a wrong type or an invalid value.
    """
    if name not in REWARDS:
        raise AapoError(f"rewards.params: unknown reward {name!r}; choose from {', '.join(sorted(REWARDS))}")
    params_cls = REWARDS[name].Params
    if params_cls is None:
        if data:
            with_params = ", ".join(sorted(n for n, c in REWARDS.items() if c.Params is not None))
            raise AapoError(
                f"rewards.params.{name}: reward {name!r} takes no params; remove it "
                f"(rewards with params: {with_params})"
            )
        return None
    if isinstance(data, params_cls):
        data.validate()
        return data
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise AapoError(f"rewards.params.{name} must be a mapping of field -> value (got {data!r})")
    hints = typing.get_type_hints(params_cls)
    names = sorted(f.name for f in dataclasses.fields(params_cls))
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise AapoError(f"rewards.params.{name}.{key} is not a known field; valid fields: {', '.join(names)}")
        if hints[key] is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        kwargs[key] = value
    params = params_cls(**kwargs)
    params.validate()
    return params


def reward_params_help() -> dict[str, dict[str, tuple[Any, str]]]:
    """reward name -> field -> (default, help), for every registered reward that has ``Params``."""
    return {
        name: {f.name: (f.default, f.metadata.get("help", "")) for f in dataclasses.fields(cls.Params)}
        for name, cls in sorted(REWARDS.items())
        if cls.Params is not None
    }


# ----------------------------------------------------------------------------------------------
# Rewards


class Reward:
    """Base class. Subclasses that grade answers set ``needs_grader = True`` and get ``self.grader``.

    A subclass with parameters defines a nested ``Params`` (a :class:`RewardParams` dataclass) and
    reads ``self.params``; built without params it gets ``Params()``, the defaults.
    """

    name: str = ""
    kind: str | None = None  # set by @register_reward
    needs_grader: bool = False
    Params: ClassVar[type[RewardParams] | None] = None

    def __init__(self, grader: Grader | None = None, params: RewardParams | None = None):
        self.grader = grader
        self.params = params if params is not None else (self.Params() if self.Params is not None else None)
        self.counts: dict[str, int] = {}  # per-call counts, read by RewardModel after each call

    def __call__(self, completions: list[str], answers: list[str], lengths: list[int]) -> list[float]:
        raise NotImplementedError

    def grade(self, completions: list[str], answers: list[str]) -> list[GradeResult]:
        """Grade the completions against the gold answers (a restated sum is not an answer, see
        :func:`restates_arithmetic`) and set ``self.counts`` from the statuses ("verify_timeout",
        "verify_error", "no_answer", "unevaluated")."""
        results = []
        for gold, result in zip(answers, self.grader.grade_many(answers, completions)):
            if result.correct and restates_arithmetic(gold, result.predicted):
                result = dataclasses.replace(result, correct=False, status="unevaluated")
            results.append(result)
        statuses = [r.status for r in results]
        self.counts = {key: statuses.count(status) for key, status in _GRADE_COUNTS.items()}
        return results


_NUMBER = r"[-+]?\d+(?:\.\d+)?"
_OPERAND = rf"\(?\s*{_NUMBER}\s*\)?"
_UNEVALUATED = re.compile(rf"{_OPERAND}(?:\s*(?:[-+*×]|\\times|\\cdot)\s*{_OPERAND})+")


def restates_arithmetic(gold: str, predicted: str) -> bool:
    """True when the final answer is numbers joined by +, -, × (``15 + 26``) and the gold is one number.

    math-verify evaluates such an expression and accepts it (``15 + 26`` equals 41), so a policy can
    earn the reward by restating the question ("15 + 26 is the final answer"): a reward hack a
    small model finds within a few steps on arithmetic. The training rewards and the held-out
    accuracy of ``aapo train`` score it 0 (status "unevaluated"); ``aapo eval`` grades exactly as its
    reference protocol. Division is not included: a fraction such as 1/2 is an answer form."""
    return re.fullmatch(_NUMBER, gold.strip()) is not None and _UNEVALUATED.fullmatch(predicted.strip()) is not None


@register_reward("accuracy")
class AccuracyReward(Reward):
    """R = 1.0 if the grader judges the completion's final answer equal to the gold answer, else 0.0.

    The answer is extracted and compared by :class:`aapo_app.grader.Grader` (math-verify: the last
    ``\\boxed{}`` first, else the last expression). A verification that times out or errors scores
    0.0 and is counted in ``self.counts`` ("verify_timeout", "verify_error", "no_answer").
    """

    needs_grader = True

    def __call__(self, completions: list[str], answers: list[str], lengths: list[int]) -> list[float]:
        return [1.0 if r.correct else 0.0 for r in self.grade(completions, answers)]


@register_reward("cosine")
class CosineReward(Reward):
    """Length-scaled correctness (paper eq. 9-10).

    With l the completion length in tokens (the ``lengths`` argument), L = ``max_len`` and progress
    p = min(l / L, 1)::

        correct: correct_min + 1/2 (correct_max - correct_min)(1 + cos(pi p))   # 1.0 at l=0 -> 0.5 at l>=L
        wrong:   wrong_max + 1/2 (wrong_min - wrong_max)(1 + cos(pi p))         # -0.5 at l=0 -> 0.0 at l>=L

    Correctness is the grader's verdict, exactly as ``accuracy`` (a timeout or error counts as
    wrong and is counted in ``self.counts``). Two deliberate departures from the authors' code:

    1. l is the completion length in tokens, not in characters of the decoded text (the authors
       use ``len(content)``, so L = 1000 meant 1000 characters there).
    2. Progress is clipped at 1, so a completion longer than L scores exactly as one of length L.
       The authors' code uses l / L unclipped, so long outputs wrap around the cosine: at l = 2L
       it gives the l = 0 values again (the best correct reward, the worst wrong one).
    """

    needs_grader = True

    @dataclass
    class Params(RewardParams):
        correct_min: float = field(
            default=0.5, metadata={"help": "alpha_c_min: reward of a correct answer at l >= max_len"}
        )
        correct_max: float = field(default=1.0, metadata={"help": "alpha_c_max: reward of a correct answer at l = 0"})
        wrong_min: float = field(default=-0.5, metadata={"help": "alpha_w_min: reward of a wrong answer at l = 0"})
        wrong_max: float = field(
            default=0.0, metadata={"help": "alpha_w_max: reward of a wrong answer at l >= max_len"}
        )
        max_len: int = field(
            default=1000, metadata={"help": "L: completion length in tokens where progress reaches 1 (clipped beyond)"}
        )

        def validate(self) -> None:
            super().validate()
            if self.max_len <= 0:
                raise AapoError(f"{self.key('max_len')} must be > 0 (got {self.max_len}), e.g. 1000")
            if self.correct_min > self.correct_max:
                raise AapoError(
                    f"{self.key('correct_min')} ({self.correct_min}) must be <= "
                    f"{self.key('correct_max')} ({self.correct_max}); swap them"
                )
            if self.wrong_min > self.wrong_max:
                raise AapoError(
                    f"{self.key('wrong_min')} ({self.wrong_min}) must be <= "
                    f"{self.key('wrong_max')} ({self.wrong_max}); swap them"
                )

    def __call__(self, completions: list[str], answers: list[str], lengths: list[int]) -> list[float]:
        p = self.params
        out = []
        for result, length in zip(self.grade(completions, answers), lengths):
            progress = min(float(length) / p.max_len, 1.0)
            half_cos = 0.5 * (1.0 + math.cos(math.pi * progress))  # 1 at progress 0, 0 at progress 1
            if result.correct:
                out.append(p.correct_min + (p.correct_max - p.correct_min) * half_cos)
            else:
                out.append(p.wrong_max + (p.wrong_min - p.wrong_max) * half_cos)
        return out


@register_reward("overlong")
class OverlongReward(Reward):
    """DAPO's soft overlong punishment (arXiv 2503.14476, eq. 13), on the length l in tokens.

    With L_max = ``max_len`` and L_cache = ``cache_len``::

        0                                  if l <= L_max - L_cache
        ((L_max - L_cache) - l) / L_cache  if L_max - L_cache < l <= L_max   (0 -> -1, linearly)
        -1                                 if l > L_max

    Set ``max_len`` to the completion limit (``rollout.max_new_tokens``): generation truncates there,
    so the last branch only fires if ``max_len`` is set below it.
    """

    @dataclass
    class Params(RewardParams):
        max_len: int = field(
            default=1024,
            metadata={"help": "L_max: the completion limit in tokens (rollout.max_new_tokens); longer scores -1"},
        )
        cache_len: int = field(
            default=256,
            metadata={"help": "L_cache: the soft window before max_len where the penalty grows from 0 to -1"},
        )

        def validate(self) -> None:
            super().validate()
            if not 0 < self.cache_len <= self.max_len:
                raise AapoError(
                    f"{self.key('cache_len')} must satisfy 0 < cache_len <= max_len "
                    f"(got cache_len={self.cache_len}, max_len={self.max_len}); e.g. max_len/4"
                )

    def __call__(self, completions: list[str], answers: list[str], lengths: list[int]) -> list[float]:
        max_len, cache_len = self.params.max_len, self.params.cache_len
        start = max_len - cache_len
        out = []
        for length in lengths:
            if length <= start:
                out.append(0.0)
            elif length <= max_len:
                out.append((start - length) / cache_len)
            else:
                out.append(-1.0)
        return out


_BRACE_TOKENS = re.compile(r"\\boxed\{|[{}]")


def _has_boxed_answer(text: str) -> bool:
    """True if some ``\\boxed{`` in ``text`` closes (braces balanced) around a non-blank argument.

    One pass with a stack of open braces, each holding the start of its ``\\boxed`` argument or None.
    """
    stack: list[int | None] = []
    for token in _BRACE_TOKENS.finditer(text):
        if token.group() == "}":
            start = stack.pop() if stack else None  # a stray "}" closes nothing
            if start is not None and text[start : token.start()].strip():
                return True
        else:
            stack.append(token.end() if token.group() != "{" else None)
    return False


@register_reward("boxed_format", kind="format")
class BoxedFormatReward(Reward):
    """R = 1.0 if the completion contains ``\\boxed{...}`` whose argument is non-empty (not just
    whitespace) and closes with balanced braces, else 0.0.

    The format reward of the built-in arithmetic task, whose prompts ask for the final answer in
    ``\\boxed{}``. One well-formed box is enough; others may be malformed.
    """

    def __call__(self, completions: list[str], answers: list[str], lengths: list[int]) -> list[float]:
        return [1.0 if _has_boxed_answer(c) else 0.0 for c in completions]


@register_reward("format", kind="format")
class ThinkFormatReward(Reward):
    """R = 1.0 if the completion contains ``"\\n</think>\\n"`` exactly once, else 0.0 (open-rs; the
    prompt already opens ``<think>``)."""

    def __call__(self, completions: list[str], answers: list[str], lengths: list[int]) -> list[float]:
        return [1.0 if c.count("\n</think>\n") == 1 else 0.0 for c in completions]


_TAG_FORMAT = re.compile(r"^<think>\n.*?\n</think>\n<answer>\n.*?\n</answer>$", re.DOTALL)


@register_reward("tag_format", kind="format")
class TagFormatReward(Reward):
    """R = 1.0 if the whole completion matches
    ``^<think>\\n.*?\\n</think>\\n<answer>\\n.*?\\n</answer>$`` (re.DOTALL, fullmatch), else 0.0."""

    def __call__(self, completions: list[str], answers: list[str], lengths: list[int]) -> list[float]:
        return [1.0 if _TAG_FORMAT.fullmatch(c) else 0.0 for c in completions]


_GRADE_COUNTS = {"verify_timeout": "timeout", "verify_error": "error", "no_answer": "no_answer",
                 "unevaluated": "unevaluated"}  # count key -> the GradeResult status it counts


class _BatchGradeCache:
    """The grader as rewards see it: remembers the last ``grade_many`` call, so that several rewards
    grading the same batch (``accuracy`` and ``cosine``) verify each answer once, not once each."""

    def __init__(self, grader: Grader):
        self.grader = grader
        self._key: tuple[tuple[str, ...], tuple[str, ...]] | None = None
        self._results: list[GradeResult] = []

    def grade_many(self, golds: Sequence[str], predictions: Sequence[str]) -> list[GradeResult]:
        key = (tuple(golds), tuple(predictions))
        if key != self._key:
            self._key, self._results = None, []  # nothing stale survives a failed call
            self._results = self.grader.grade_many(golds, predictions)
            self._key = key
        return list(self._results)

    def grade(self, gold: str, prediction: str) -> GradeResult:
        return self.grade_many([gold], [prediction])[0]

    def __getattr__(self, name: str) -> Any:  # stats, timeout_s, close, ...: the grader's own
        return getattr(self.grader, name)


@dataclass
class RewardOutput:
    """Rewards of one batch of N completions.

    Attributes:
        total: [N] float32, the weighted sum sum_k w_k * R_k over the configured rewards.
        per_reward: name -> [N] float32, each reward unweighted.
        counts: per-batch counts: "verify_timeout", "verify_error", "no_answer" (0 when no reward
            grades answers).
    """

    total: torch.Tensor
    per_reward: dict[str, torch.Tensor]
    counts: dict[str, int] = field(default_factory=dict)


def _as_scores(name: str, values, n: int) -> torch.Tensor:
    """A reward's output as a float tensor, or one line naming the reward and the first value that is
    not a number (a plugin returning None or strings)."""
    if isinstance(values, torch.Tensor):
        return values.detach().to(torch.float32).reshape(-1) if values.dim() <= 1 else values.float()
    try:
        values = list(values)
    except TypeError:
        raise AapoError(f"reward '{name}' returned {type(values).__name__}; it must return a list of {n} floats, "
                        f"one per completion") from None
    for i, v in enumerate(values):
        if not isinstance(v, numbers.Real):  # int, float, bool, numpy scalars
            raise AapoError(f"reward '{name}' returned {v!r} ({type(v).__name__}) for completion {i}; it must return "
                            f"one float per completion")
    return torch.tensor([float(v) for v in values], dtype=torch.float32)


class RewardModel:
    """The weighted sum of named rewards, built from ``rewards.weights``.

    Args:
        weights: reward name -> weight; names must be in ``REWARDS``; at least one weight non-zero.
        grader_timeout_s: time bound per graded answer (see :class:`aapo_app.grader.Grader`).
        num_workers: grader worker processes (default ``min(2, os.cpu_count())``).
        params: reward name -> {field: value} for rewards with ``Params`` (see
            :func:`build_reward_params`); a reward not named here gets its defaults. Params of a
            registered reward that has no weight are validated but unused.

    A Grader (and its worker processes) is created only if a configured reward grades answers.
    Rewards that grade share one verification per answer and batch; their counts enter
    ``RewardOutput.counts`` once.
    """

    def __init__(
        self,
        weights: dict[str, float],
        grader_timeout_s: float = 5.0,
        num_workers: int | None = None,
        params: dict[str, dict[str, Any]] | None = None,
    ):
        choices = ", ".join(sorted(REWARDS))
        if not weights:
            raise AapoError(
                f"rewards.weights is empty; give at least one of {choices} a weight, e.g. accuracy: 1.0"
            )
        for name in weights:
            if name not in REWARDS:
                raise AapoError(f"rewards.weights: unknown reward {name!r}; choose from {choices}")
        if all(float(w) == 0.0 for w in weights.values()):
            raise AapoError("rewards.weights are all zero; give at least one reward a non-zero weight")
        if params is None:
            params = {}
        if not isinstance(params, dict):
            raise AapoError(f"rewards.params must be a mapping of reward name -> {{field: value}} (got {params!r})")
        built = {name: build_reward_params(name, data) for name, data in params.items()}
        self.weights = {name: float(w) for name, w in weights.items()}
        needs_grader = any(REWARDS[name].needs_grader for name in weights)
        self.grader = Grader(grader_timeout_s, num_workers) if needs_grader else None
        shared = _BatchGradeCache(self.grader) if self.grader is not None else None
        self.rewards = {
            name: REWARDS[name](shared, built[name]) if built.get(name) is not None else REWARDS[name](shared)
            for name in weights
        }

    def score(self, completions: list[str], answers: list[str], lengths: list[int]) -> RewardOutput:
        """Score N completions against their gold answers; see :class:`RewardOutput`."""
        n = len(completions)
        if len(answers) != n or len(lengths) != n:
            raise ValueError(f"{n} completions but {len(answers)} answers and {len(lengths)} lengths")
        total = torch.zeros(n, dtype=torch.float32)  # [N]
        per_reward: dict[str, torch.Tensor] = {}
        counts = dict.fromkeys(_GRADE_COUNTS, 0)
        graded = False  # grading rewards share one cached verification: count its statuses once
        for name, reward in self.rewards.items():
            values = _as_scores(name, reward(completions, answers, lengths), n)  # [N]
            if values.shape != (n,):
                raise AapoError(f"reward '{name}' returned {tuple(values.shape)} values for {n} completions; "
                                f"it must return one float per completion")
            if not torch.isfinite(values).all():
                bad = int((~torch.isfinite(values)).sum())
                raise AapoError(f"reward '{name}' returned NaN or inf for {bad} of {n} completions; "
                                f"fix the reward function (rewards must be finite numbers)")
            per_reward[name] = values
            total += self.weights[name] * values
            for key, count in reward.counts.items():
                if key in _GRADE_COUNTS and reward.needs_grader and graded:
                    continue
                counts[key] = counts.get(key, 0) + count
            graded = graded or reward.needs_grader
        return RewardOutput(total=total, per_reward=per_reward, counts=counts)

    def close(self) -> None:
        """Stop the grader's worker processes, if any."""
        if self.grader is not None:
            self.grader.close()

    def __enter__(self) -> RewardModel:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def scored_weights(rewards_cfg) -> dict[str, float]:
    """A run's reward weights with accuracy always present: it is measured (weight 0 when it is not
    a training reward) and graded held out."""
    return {"accuracy": 0.0, **rewards_cfg.weights}


def run_reward_model(rewards_cfg) -> RewardModel:
    """The reward model of a run's ``rewards:`` section (see :func:`scored_weights`)."""
    return RewardModel(scored_weights(rewards_cfg), rewards_cfg.verify_timeout_s, rewards_cfg.num_workers,
                       params=rewards_cfg.params)
