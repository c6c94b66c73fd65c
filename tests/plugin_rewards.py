"""A reward plugin for tests (loaded with rewards.plugins=[plugin_rewards] and PYTHONPATH=tests, or
imported by conftest): a reward that varies on a random model's gibberish, where the real ones are
all 0, so that training tests see non-zero advantages. It is the length of the decoded completion
in characters / 100."""

from aapo_app.rewards import REWARDS, Reward, register_reward

if "test_char_length" not in REWARDS:

    @register_reward("test_char_length")
    class CharLengthReward(Reward):
        def __call__(self, completions, answers, lengths):
            return [len(c) / 100.0 for c in completions]

if "test_nan" not in REWARDS:

    @register_reward("test_nan")
    class NanReward(Reward):
        """NaN for every completion: the loss becomes NaN, so every update must be skipped."""

        def __call__(self, completions, answers, lengths):
            return [float("nan")] * len(completions)

if "test_huge" not in REWARDS:

    @register_reward("test_huge")
    class HugeReward(Reward):
        """3e38 (finite, near float32's maximum) for completions of even character length, else 0:
        with Dr. GRPO's unnormalised advantages the loss overflows to inf."""

        def __call__(self, completions, answers, lengths):
            return [3e38 if len(c) % 2 == 0 else 0.0 for c in completions]

#: completions graded by `test_counted`, one entry (the batch size) per call
COUNTED: list[int] = []

if "test_counted" not in REWARDS:

    @register_reward("test_counted")
    class CountedReward(Reward):
        """0 for every completion (so every group is flat); records how many completions it graded."""

        def __call__(self, completions, answers, lengths):
            COUNTED.append(len(completions))
            return [0.0] * len(completions)
