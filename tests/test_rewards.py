"""Reward functions by name and their weighted sum, with hand-computed values."""

import pytest
import torch

from aapo_app.errors import AapoError
from aapo_app.rewards import (
    REWARDS,
    CosineReward,
    OverlongReward,
    RewardModel,
    build_reward_params,
    format_reward,
    register_reward,
    reward_params_help,
)

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
    assert model.rewards["accuracy"].counts == {"verify_timeout": 0, "verify_error": 0, "no_answer": 1,
                                                 "unevaluated": 0}


def test_an_answer_that_restates_the_sum_scores_zero(model):
    """The reward hack SmolLM2 found on two-digit addition within ten steps: the grader (lighteval's rule)
    evaluates the final answer "15 + 26" to 41 and accepts it, so restating the question earned the reward.
    The training reward scores it 0; a computed answer, and a fraction for a decimal gold, still score 1."""
    hack = "15 + 26 is the final answer to the given equation."
    assert model.grader.grade("41", hack).correct  # what the grader alone says
    completions = [hack, "15 + 26 = 41", "\\boxed{15+26}", "3 \\times 4 = 12, so \\boxed{3 \\times 4}", "\\boxed{1/2}",
                   "15 + 26 = 189"]
    answers = ["41", "41", "41", "12", "0.5", "41"]
    assert call("accuracy", completions, answers, model) == [0.0, 1.0, 0.0, 0.0, 1.0, 0.0]
    assert model.rewards["accuracy"].counts["unevaluated"] == 3
    out = model.score(completions, answers, [10] * len(completions))
    assert out.counts["unevaluated"] == 3 and out.per_reward["accuracy"].tolist() == [0.0, 1.0, 0.0, 0.0, 1.0, 0.0]


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
    assert out.counts == {"verify_timeout": 1, "verify_error": 0, "no_answer": 2, "unevaluated": 0}


def test_format_only_model_needs_no_grader():
    # weights {format: 1, tag_format: 2}: "<think>\n...": format 1, tag_format 1 -> 3; "x": 0
    with RewardModel({"format": 1.0, "tag_format": 2.0}) as m:
        assert m.grader is None
        out = m.score(["<think>\na\n</think>\n<answer>\n7\n</answer>", "x"], ["7", "7"], [5, 1])
    assert out.total.tolist() == [3.0, 0.0]
    assert out.counts == {"verify_timeout": 0, "verify_error": 0, "no_answer": 0, "unevaluated": 0}


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


def test_format_reward_is_the_first_registered_format_kind_configured():
    assert {name for name, cls in REWARDS.items() if cls.kind == "format"} >= {"boxed_format", "format", "tag_format"}
    assert REWARDS["accuracy"].kind is None and REWARDS["cosine"].kind is None
    assert format_reward({"accuracy": 1.0, "boxed_format": 0.5}) == "boxed_format"
    assert format_reward(["tag_format", "accuracy", "format"]) == "format"  # registration order, not config order
    assert format_reward(["tag_format"]) == "tag_format"
    assert format_reward({"accuracy": 1.0, "cosine": 1.0}) is None
    with pytest.raises(ValueError, match="reward kind must be one of format"):
        register_reward("test_kind", kind="style")
    assert "test_kind" not in REWARDS


# ----------------------------------------------------------------------------------------------
# Reward parameters, cosine and overlong

COSINE_L = 4  # small L, so that l = 0, L/2, L, 2L are 0, 2, 4, 8 tokens


@pytest.fixture(scope="module")
def cosine_model():
    params = {"cosine": {"max_len": COSINE_L}}
    with RewardModel({"cosine": 2.0, "boxed_format": 1.0}, grader_timeout_s=1.0, num_workers=1, params=params) as m:
        yield m


def test_cosine_default_params_are_the_papers():
    p = REWARDS["cosine"]().params
    assert (p.correct_min, p.correct_max, p.wrong_min, p.wrong_max, p.max_len) == (0.5, 1.0, -0.5, 0.0, 1000)
    assert REWARDS["cosine"].needs_grader


def test_cosine_correct_and_wrong(cosine_model):
    reward = cosine_model.rewards["cosine"]
    assert reward.params.max_len == COSINE_L
    lengths = [0, 2, 4, 8]  # l = 0, L/2, L, 2L; p = min(l/L, 1) = 0, 0.5, 1, 1
    # correct: 0.5 + 0.5 * (1.0 - 0.5) * (1 + cos(pi p))
    #   p=0: 0.5 + 0.25 * 2 = 1.0;  p=0.5: 0.5 + 0.25 * 1 = 0.75;  p=1: 0.5 + 0.25 * 0 = 0.5;  l=2L: as l=L
    # (the completion is 9 characters: measured in characters, l=0 would already be past L)
    correct = reward(["\\boxed{7}"] * 4, ["7"] * 4, lengths)
    assert correct == pytest.approx([1.0, 0.75, 0.5, 0.5])
    # wrong: 0.0 + 0.5 * (-0.5 - 0.0) * (1 + cos(pi p))
    #   p=0: -0.25 * 2 = -0.5;  p=0.5: -0.25 * 1 = -0.25;  p=1: -0.25 * 0 = 0.0;  l=2L: as l=L
    wrong = reward(["\\boxed{8}"] * 4, ["7"] * 4, lengths)
    assert wrong == pytest.approx([-0.5, -0.25, 0.0, 0.0])
    # clipped: unclipped, p = 2 would give cos(2 pi) = 1, i.e. the l = 0 values 1.0 and -0.5 again
    assert correct[3] == correct[2] and wrong[3] == wrong[2]
    assert reward.counts == {"verify_timeout": 0, "verify_error": 0, "no_answer": 0, "unevaluated": 0}


def test_cosine_custom_ranges(cosine_model):
    params = build_reward_params(
        "cosine", {"correct_min": 1, "correct_max": 3, "wrong_min": -2, "wrong_max": -1, "max_len": 10}
    )
    assert isinstance(params.correct_min, float)  # an int given for a float field is converted
    reward = CosineReward(cosine_model.rewards["cosine"].grader, params)
    # l=5 -> p=0.5, 1 + cos(pi/2) = 1: correct 1 + 0.5*(3-1)*1 = 2.0; wrong -1 + 0.5*(-2-(-1))*1 = -1.5
    # l=0 -> 1 + cos 0 = 2: correct 1 + 0.5*2*2 = 3.0;  l=30 -> p=1, 1 + cos(pi) = 0: wrong -1.0
    values = reward(["\\boxed{7}", "\\boxed{8}", "\\boxed{7}", "\\boxed{8}"], ["7"] * 4, [5, 5, 0, 30])
    assert values == pytest.approx([2.0, -1.5, 3.0, -1.0])


def test_overlong():
    reward = OverlongReward(params=build_reward_params("overlong", {"max_len": 8, "cache_len": 4}))
    # L_max = 8, L_cache = 4: soft window (4, 8]
    lengths = [2, 4, 5, 6, 8, 9, 100]
    # 2 <= 4: 0;  4 = start of window (inclusive): 0;  5: (4-5)/4 = -0.25;  6: (4-6)/4 = -0.5;
    # 8 = end of window: (4-8)/4 = -1.0;  9 and 100 > L_max: -1
    assert reward(["x"] * 7, ["7"] * 7, lengths) == [0.0, 0.0, -0.25, -0.5, -1.0, -1.0, -1.0]
    assert not OverlongReward.needs_grader


def test_overlong_defaults_in_a_model():
    with RewardModel({"overlong": 1.0}) as m:  # max_len 1024, cache_len 256: window (768, 1024]
        assert m.grader is None
        # 768: 0;  896: (768-896)/256 = -0.5;  1024: -1;  1025: -1
        out = m.score(["a"] * 4, ["7"] * 4, [768, 896, 1024, 1025])
    assert out.total.tolist() == [0.0, -0.5, -1.0, -1.0]


def test_cosine_weighted_total(cosine_model):
    completions = ["\\boxed{7}", "\\boxed{8}", "3 + 4 = 7", "no idea"]
    lengths = [2, 2, 8, 0]  # with L = 4: p = 0.5, 0.5, 1 (clipped from 2), 0
    # cosine        [0.75 (correct, p=.5), -0.25 (wrong, p=.5), 0.5 (correct, p=1), -0.5 (wrong, p=0)]
    # boxed_format  [1,                     1,                   0,                  0]
    # total = 2 * cosine + 1 * boxed_format = [2.5, 0.5, 1.0, -1.0]
    out = cosine_model.score(completions, ["7"] * 4, lengths)
    assert out.total.tolist() == pytest.approx([2.5, 0.5, 1.0, -1.0])
    assert out.per_reward["cosine"].tolist() == pytest.approx([0.75, -0.25, 0.5, -0.5])
    assert out.per_reward["boxed_format"].tolist() == [1.0, 1.0, 0.0, 0.0]
    assert out.counts == {"verify_timeout": 0, "verify_error": 0, "no_answer": 1, "unevaluated": 0}


def test_accuracy_and_cosine_share_one_verification():
    # {accuracy: 1, cosine: 1}, L = 4, l = 0: "\boxed{7}" 1 + 1.0 = 2.0; "no idea" 0 + (-0.5) = -0.5
    with RewardModel({"accuracy": 1.0, "cosine": 1.0}, grader_timeout_s=1.0, num_workers=1,
                     params={"cosine": {"max_len": 4}}) as m:
        out = m.score(["\\boxed{7}", "no idea"], ["7", "7"], [0, 0])
        assert m.grader.stats["graded"] == 2  # not 4
    assert out.total.tolist() == [2.0, -0.5]
    assert out.counts == {"verify_timeout": 0, "verify_error": 0, "no_answer": 1, "unevaluated": 0}  # counted once


@pytest.mark.parametrize(
    "params, expected",
    [
        ({"cosine": {"max_length": 4}}, r"rewards\.params\.cosine\.max_length is not a known field; valid fields: "
                                         r"correct_max, correct_min, max_len, wrong_max, wrong_min"),
        ({"cosine": {"max_len": 0}}, r"rewards\.params\.cosine\.max_len must be > 0 \(got 0\)"),
        ({"cosine": {"max_len": "1000"}}, r"rewards\.params\.cosine\.max_len must be an integer \(got '1000'\)"),
        ({"cosine": {"max_len": 4.5}}, r"rewards\.params\.cosine\.max_len must be an integer"),
        ({"cosine": {"correct_min": True}}, r"rewards\.params\.cosine\.correct_min must be a finite number"),
        ({"cosine": {"wrong_max": float("nan")}}, r"rewards\.params\.cosine\.wrong_max must be a finite number"),
        ({"cosine": {"correct_min": 2.0}}, r"rewards\.params\.cosine\.correct_min \(2\.0\) must be <= "
                                           r"rewards\.params\.cosine\.correct_max \(1\.0\); swap them"),
        ({"cosine": {"wrong_min": 0.5}}, r"rewards\.params\.cosine\.wrong_min \(0\.5\) must be <= "),
        ({"overlong": {"cache_len": 0}}, r"rewards\.params\.overlong\.cache_len must satisfy 0 < cache_len <= max_len"),
        ({"overlong": {"max_len": 100}}, r"rewards\.params\.overlong\.cache_len .*cache_len=256, max_len=100"),
        ({"overlong": {"max_len": "x"}}, r"rewards\.params\.overlong\.max_len must be an integer"),
        ({"cosinus": {"max_len": 4}}, r"rewards\.params: unknown reward 'cosinus'; choose from accuracy, "),
        ({"format": {"x": 1}}, r"rewards\.params\.format: reward 'format' takes no params; remove it "
                               r"\(rewards with params: cosine, overlong\)"),
        ({"cosine": 4}, r"rewards\.params\.cosine must be a mapping"),
        ([("cosine", {})], r"rewards\.params must be a mapping"),
    ],
)
def test_params_errors(params, expected):
    with pytest.raises(AapoError, match=expected) as info:
        RewardModel({"cosine": 1.0, "overlong": 1.0}, params=params)
    assert "\n" not in str(info.value)


def test_params_of_a_reward_without_weight_are_validated_but_unused():
    # decided: params for a registered reward that has no weight are fine (a preset's params survive
    # a rewards.weights override) but still checked, so a typo is caught either way
    with RewardModel({"format": 1.0}, params={"overlong": {"cache_len": 16}, "format": {}}) as m:
        assert set(m.rewards) == {"format"}
    with pytest.raises(AapoError, match=r"rewards\.params\.overlong\.cache_len must satisfy"):
        RewardModel({"format": 1.0}, params={"overlong": {"cache_len": 0}})


def test_reward_without_params_keeps_none():
    assert REWARDS["format"]().params is None
    assert build_reward_params("format", None) is None


def test_reward_params_help():
    doc = reward_params_help()
    assert set(doc) >= {"cosine", "overlong"} and "format" not in doc
    assert doc["cosine"]["max_len"][0] == 1000 and doc["overlong"]["cache_len"][0] == 256
    assert set(doc["cosine"]) == {"correct_min", "correct_max", "wrong_min", "wrong_max", "max_len"}
    assert all(help_text for fields in doc.values() for _, help_text in fields.values())
