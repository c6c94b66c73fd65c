"""Reward functions, chosen by name, and their weighted sum (SPEC §5).

Every reward is a class registered under its name with ``@register_reward``; ``REWARDS`` is the only
place names are looked up. A reward is called as ``reward(completions, answers, lengths)`` with N
completions, their N gold answers and their N lengths in tokens, and returns N floats.

:class:`RewardModel` turns a config's ``rewards.weights`` into one scorer::

    model = RewardModel({"accuracy": 1.0, "boxed_format": 0.5})
    out = model.score(completions, answers, lengths)
    out.total          # [N] float32, sum_k w_k * R_k
    out.per_reward     # {"accuracy": [N], "boxed_format": [N]}, unweighted
    out.counts         # {"verify_timeout": ..., "verify_error": ..., "no_answer": ...}
    model.close()      # stops the grader's worker processes
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from aapo_app.errors import AapoError
from aapo_app.grader import Grader

REWARDS: dict[str, type] = {}


def register_reward(name: str) -> Callable[[type], type]:
    """Class decorator: make the reward available as ``name`` in ``rewards.weights``."""

    def decorator(cls: type) -> type:
        if name in REWARDS:
            raise ValueError(f"reward {name!r} is already registered by {REWARDS[name].__name__}")
        cls.name = name
        REWARDS[name] = cls
        return cls

    return decorator


class Reward:
    """Base class. Subclasses that grade answers set ``needs_grader = True`` and get ``self.grader``."""

    name: str = ""
    needs_grader: bool = False

    def __init__(self, grader: Grader | None = None):
        self.grader = grader
        self.counts: dict[str, int] = {}  # per-call counts, read by RewardModel after each call

    def __call__(self, completions: list[str], answers: list[str], lengths: list[int]) -> list[float]:
        raise NotImplementedError


@register_reward("accuracy")
class AccuracyReward(Reward):
    """R = 1.0 if the grader judges the completion's final answer equal to the gold answer, else 0.0.

    The answer is extracted and compared by :class:`aapo_app.grader.Grader` (math-verify: the last
    ``\\boxed{}`` first, else the last expression). A verification that times out or errors scores
    0.0 and is counted in ``self.counts`` ("verify_timeout", "verify_error", "no_answer").
    """

    needs_grader = True

    def __call__(self, completions: list[str], answers: list[str], lengths: list[int]) -> list[float]:
        results = self.grader.grade_many(answers, completions)
        statuses = [r.status for r in results]
        self.counts = {
            "verify_timeout": statuses.count("timeout"),
            "verify_error": statuses.count("error"),
            "no_answer": statuses.count("no_answer"),
        }
        return [1.0 if r.correct else 0.0 for r in results]


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


@register_reward("boxed_format")
class BoxedFormatReward(Reward):
    """R = 1.0 if the completion contains ``\\boxed{...}`` whose argument is non-empty (not just
    whitespace) and closes with balanced braces, else 0.0.

    The format reward of the built-in arithmetic task, whose prompts ask for the final answer in
    ``\\boxed{}``. One well-formed box is enough; others may be malformed.
    """

    def __call__(self, completions: list[str], answers: list[str], lengths: list[int]) -> list[float]:
        return [1.0 if _has_boxed_answer(c) else 0.0 for c in completions]


@register_reward("format")
class ThinkFormatReward(Reward):
    """R = 1.0 if the completion contains ``"\\n</think>\\n"`` exactly once, else 0.0 (open-rs; the
    prompt already opens ``<think>``)."""

    def __call__(self, completions: list[str], answers: list[str], lengths: list[int]) -> list[float]:
        return [1.0 if c.count("\n</think>\n") == 1 else 0.0 for c in completions]


_TAG_FORMAT = re.compile(r"^<think>\n.*?\n</think>\n<answer>\n.*?\n</answer>$", re.DOTALL)


@register_reward("tag_format")
class TagFormatReward(Reward):
    """R = 1.0 if the whole completion matches
    ``^<think>\\n.*?\\n</think>\\n<answer>\\n.*?\\n</answer>$`` (re.DOTALL, fullmatch), else 0.0."""

    def __call__(self, completions: list[str], answers: list[str], lengths: list[int]) -> list[float]:
        return [1.0 if _TAG_FORMAT.fullmatch(c) else 0.0 for c in completions]


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


class RewardModel:
    """The weighted sum of named rewards, built from ``rewards.weights``.

    Args:
        weights: reward name -> weight; names must be in ``REWARDS``; at least one weight non-zero.
        grader_timeout_s: time bound per graded answer (see :class:`aapo_app.grader.Grader`).
        num_workers: grader worker processes (default ``min(2, os.cpu_count())``).

    A Grader (and its worker processes) is created only if a configured reward grades answers.
    """

    def __init__(
        self, weights: dict[str, float], grader_timeout_s: float = 5.0, num_workers: int | None = None
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
        self.weights = {name: float(w) for name, w in weights.items()}
        needs_grader = any(REWARDS[name].needs_grader for name in weights)
        self.grader = Grader(grader_timeout_s, num_workers) if needs_grader else None
        self.rewards = {name: REWARDS[name](self.grader) for name in weights}

    def score(self, completions: list[str], answers: list[str], lengths: list[int]) -> RewardOutput:
        """Score N completions against their gold answers; see :class:`RewardOutput`."""
        n = len(completions)
        if len(answers) != n or len(lengths) != n:
            raise ValueError(f"{n} completions but {len(answers)} answers and {len(lengths)} lengths")
        total = torch.zeros(n, dtype=torch.float32)  # [N]
        per_reward: dict[str, torch.Tensor] = {}
        counts = {"verify_timeout": 0, "verify_error": 0, "no_answer": 0}
        for name, reward in self.rewards.items():
            values = torch.tensor(reward(completions, answers, lengths), dtype=torch.float32)  # [N]
            per_reward[name] = values
            total += self.weights[name] * values
            for key, count in reward.counts.items():
                counts[key] = counts.get(key, 0) + count
        return RewardOutput(total=total, per_reward=per_reward, counts=counts)

    def close(self) -> None:
        """Stop the grader's worker processes, if any."""
        if self.grader is not None:
            self.grader.close()

    def __enter__(self) -> RewardModel:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
