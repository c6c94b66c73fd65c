"""Reward functions by name and their weighted sum, with hand-computed values."""

import pytest
import torch

from aapo_app.errors import AapoError
from aapo_app.rewards import REWARDS, RewardModel, register_reward

TOWER = "\\boxed{10^{10^{10^{10}}}}"  # sympy cannot finish this within the grader's bound


@pytest.fixture(scope="module")
def model():
    with RewardModel({"accuracy": 1.0, "boxed_format": 0.5}, grader_timeout_s=1.0) as m:
        yield m


def call(name, completions, answers=None, model=None):
    """Call the reward ``name`` on completions (answers default to "7", lengths to 10)."""
    answers = answers or ["7"] * len(completions)
    reward = model.rewards[name] if model else REWARDS[name]()
    return reward(completions, answers, [10] * len(completions))


def test_registry_names():
    assert {"accuracy", "boxed_format", "format", "tag_format"} <= set(REWARDS)


def test_accuracy(model):
    completions = ["so \\boxed{7}", "3 + 4 = 7", "\\boxed{8}", "no idea", "\\boxed{0.5}"]
    answers = ["7", "7", "7", "7", "\\frac{1}{2}"]
    assert call("accuracy", completions, answers, model) == [1.0, 1.0, 0.0, 0.0, 1.0]
    assert model.rewards["accuracy"].counts == {"verify_timeout": 0, "verify_error": 0, "no_answer": 1}


def test_boxed_format():
    completions = [
        "\\boxed{7}",  # 1
        "x \\boxed{\\frac{1}{2}} y",  # 1: nested braces balanced
        "\\boxed{}",  # 0: empty
        "\\boxed{  }",  # 0: blank
        "\\boxed{\\frac{1}{2",  # 0: never closes
        "the answer is 7",  # 0: no box
        "\\boxed{\\frac{1}{2 and later \\boxed{3}",  # 1: the second box is well formed
    ]
    assert call("boxed_format", completions) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0]


def test_format():
    completions = [
        "reasoning\n</think>\nThe answer is 7",  # 1: exactly one
        "reasoning</think>answer",  # 0: no newlines around the tag
        "a\n</think>\nb\n</think>\nc",  # 0: twice
        "",  # 0
    ]
    assert call("format", completions) == [1.0, 0.0, 0.0, 0.0]


def test_tag_format():
    completions = [
        "<think>\n3 + 4\n</think>\n<answer>\n7\n</answer>",  # 1
        "<think>\nline 1\nline 2\n</think>\n<answer>\n7\n</answer>",  # 1: DOTALL
        "<think>\n3 + 4\n</think>\n<answer>\n7\n</answer>\n",  # 0: trailing newline (fullmatch)
        "Sure! <think>\n3 + 4\n</think>\n<answer>\n7\n</answer>",  # 0: text before
        "<think>3 + 4</think><answer>7</answer>",  # 0: no newlines
        "<think>\n3 + 4\n</think>\n",  # 0: no answer block
    ]
    assert call("tag_format", completions) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]


def test_weighted_sum(model):
    completions = ["so \\boxed{7}", "3 + 4 = 7", "\\boxed{8}", "no idea", "\\boxed{\\frac{1}{2", TOWER]
    # accuracy      [1,   1,   0,   0, 0, 0]   (the tower times out: 0, counted)
    # boxed_format  [1,   0,   1,   0, 0, 1]
    # total = 1 * accuracy + 0.5 * boxed_format = [1.5, 1.0, 0.5, 0.0, 0.0, 0.5]
    out = model.score(completions, ["7"] * 6, [10] * 6)
    assert out.total.dtype == torch.float32 and out.total.shape == (6,)
    assert out.total.tolist() == [1.5, 1.0, 0.5, 0.0, 0.0, 0.5]
    assert out.per_reward["accuracy"].tolist() == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    assert out.per_reward["boxed_format"].tolist() == [1.0, 0.0, 1.0, 0.0, 0.0, 1.0]
    # "no idea" and the unclosed box extract nothing mathematical
    assert out.counts == {"verify_timeout": 1, "verify_error": 0, "no_answer": 2}


def test_format_only_model_needs_no_grader():
    # weights {format: 1, tag_format: 2}: "<think>\n...": format 1, tag_format 1 -> 3; "x": 0
    with RewardModel({"format": 1.0, "tag_format": 2.0}) as m:
        assert m.grader is None
        out = m.score(["<think>\na\n</think>\n<answer>\n7\n</answer>", "x"], ["7", "7"], [5, 1])
    assert out.total.tolist() == [3.0, 0.0]
    assert out.counts == {"verify_timeout": 0, "verify_error": 0, "no_answer": 0}


def test_unknown_reward_name():
    expected = r"rewards.weights: unknown reward 'acuracy'; choose from accuracy, boxed_format"
    with pytest.raises(AapoError, match=expected):
        RewardModel({"acuracy": 1.0})


@pytest.mark.parametrize("weights", [{}, {"format": 0.0, "accuracy": 0}])
def test_empty_or_zero_weights(weights):
    with pytest.raises(AapoError, match="rewards.weights"):
        RewardModel(weights)


def test_duplicate_registration_is_refused():
    with pytest.raises(ValueError, match="already registered"):

        @register_reward("format")
        class Again:
            pass
