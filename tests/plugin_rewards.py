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

if "test_none" not in REWARDS:

    @register_reward("test_none")
    class NoneReward(Reward):
        """None for every completion: a plugin bug that must be reported naming the reward."""

        def __call__(self, completions, answers, lengths):
            return [None] * len(completions)

if "test_fill_disk" not in REWARDS:

    @register_reward("test_fill_disk")
    class FillDiskReward(Reward):
        """0 for every completion; once the run in $AAPO_TEST_RUN has saved checkpoints/step-1, it fills
        the disk of $AAPO_TEST_FILL once (another job filling a shared disk), so that the next save meets
        a real full disk."""

        def __call__(self, completions, answers, lengths):
            import os
            from pathlib import Path

            run, fill = Path(os.environ["AAPO_TEST_RUN"]), Path(os.environ["AAPO_TEST_FILL"])
            once = fill.with_name(fill.name + ".done")  # only once: not again after the test frees the space
            if (run / "checkpoints" / "step-1").is_dir() and not once.exists():
                once.touch()
                with open(fill, "wb") as f:
                    try:
                        while True:
                            f.write(b"\0" * 2**20)
                            f.flush()
                    except OSError:  # ENOSPC: the disk is full
                        pass
            return [len(c) / 100.0 for c in completions]

if "test_sigterm" not in REWARDS:

    @register_reward("test_sigterm")
    class SigtermReward(Reward):
        """Sends SIGTERM to its own process when first called (a scheduler stopping the job during the
        step), then grades like test_char_length."""

        sent = False

        def __call__(self, completions, answers, lengths):
            import os
            import signal

            if not SigtermReward.sent:
                SigtermReward.sent = True
                os.kill(os.getpid(), signal.SIGTERM)
            return [len(c) / 100.0 for c in completions]
