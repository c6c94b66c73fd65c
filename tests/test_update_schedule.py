"""The update schedule: the learning rate of every optimizer step, the ratio's clipping over
mini-batches (DAPO, Dr. GRPO), dynamic sampling's filter, and rewards graded once per step."""

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import normalisation_cases as C  # noqa: E402

from aapo_app.config import load_run_config  # noqa: E402
from aapo_app.ds_config import LRSchedule, lr_schedule  # noqa: E402

# ---------------------------------------------------------------------------------------------
# learning rate per optimizer step

COS = lambda x: 0.5 * (1 + math.cos(math.pi * x))  # noqa: E731  the cosine factor at progress x

# train.max_steps = 4; μ = num_iterations optimizer steps per training step (GRPO), so K = 4μ
# optimizer steps and W = warm-up × μ. Warm-up step s takes (s + 1)/W; cosine then runs from the
# peak at s = W over the K − W remaining steps: factor COS((s − W)/(K − W)).
EXPECTED = {
    # (schedule, warm-up, μ): factor of each optimizer step
    ("constant", 2, 1): [1 / 2, 2 / 2, 1, 1],
    ("constant", 2, 2): [1 / 4, 2 / 4, 3 / 4, 4 / 4, 1, 1, 1, 1],
    ("cosine", 0, 1): [COS(0 / 4), COS(1 / 4), COS(2 / 4), COS(3 / 4)],  # 1, 0.8536, 0.5, 0.1464
    ("cosine", 0, 2): [COS(s / 8) for s in range(8)],  # the floor is approached at step 8, not 4
    ("cosine", 2, 1): [1 / 2, 2 / 2, COS(0 / 2), COS(1 / 2)],  # 0.5, 1, 1, 0.5
    ("cosine", 2, 2): [1 / 4, 2 / 4, 3 / 4, 4 / 4, COS(0 / 4), COS(1 / 4), COS(2 / 4), COS(3 / 4)],
}


def schedule_config(kind, warmup, mu, *extra):
    return load_run_config(None, ["algorithm.name=grpo", f"algorithm.num_iterations={mu}", "train.max_steps=4",
                                  f"train.lr_scheduler={kind}", f"train.warmup_steps={warmup}",
                                  "train.learning_rate=0.1", *extra])


@pytest.mark.parametrize("key", sorted(EXPECTED))
def test_lr_factor_of_every_optimizer_step(key):
    kind, warmup, mu = key
    schedule = lr_schedule(schedule_config(kind, warmup, mu))
    factors = [schedule(s) for s in range(4 * mu)]
    assert factors == pytest.approx(EXPECTED[key], abs=1e-12)
    assert min(factors) > 0  # no optimizer step is spent at lr 0


@pytest.mark.parametrize("mu", [1, 2])
def test_constant_without_warmup_has_no_schedule(mu):
    assert lr_schedule(schedule_config("constant", 0, mu)) is None


def test_dapo_mini_batches_count_in_the_schedule():
    # DAPO's default 4 mini-batches: 4 training steps are 16 optimizer steps, warm-up 1 is 4 of them
    cfg = load_run_config(None, ["algorithm.name=dapo", "train.max_steps=4", "train.warmup_steps=1",
                                 "train.lr_scheduler=cosine"])
    schedule = lr_schedule(cfg)
    assert (schedule.total_steps, schedule.warmup_steps) == (16, 4)
    assert [schedule(s) for s in range(5)] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])


def test_lr_schedule_drives_the_engine(tiny_model_dir):
    """The real ZeRO-3 engine (fused AdamW, DeepSpeed's client scheduler) uses these factors: the lr
    read before each optimizer step, over 2 training steps x μ = 2 with warm-up 2, cosine."""
    from aapo_app.ds_config import DEFAULT_POLICY_CONFIG, fill_ds_config, read_ds_config
    from aapo_app.engine import ZeroModel, init_distributed
    from aapo_app.models import load_causal_lm

    init_distributed()
    cfg = schedule_config("cosine", 2, 2, f"model.path={tiny_model_dir}", "rollout.prompts_per_rank=1",
                          "rollout.group_size=2", "train.micro_batch_size=2")
    ds = fill_ds_config(read_ds_config(None, DEFAULT_POLICY_CONFIG), cfg, 1)
    policy = ZeroModel(load_causal_lm(str(tiny_model_dir), ds_config=ds), ds, trainable=True, learning_rate=0.1,
                       lr_schedule=lr_schedule(cfg))
    seen = []
    ids = torch.randint(3, 100, (2, 5))
    for _ in range(8):
        seen.append(policy.engine.get_lr()[0])
        loss = policy.engine(input_ids=ids).logits.float().pow(2).mean()
        policy.engine.backward(loss)
        policy.engine.step()
    assert seen == pytest.approx([0.1 * f for f in EXPECTED[("cosine", 2, 2)]], rel=1e-6)


# ---------------------------------------------------------------------------------------------
# clipping over mini-batches, on the real update stage


@pytest.fixture(scope="module")
def harnesses(norm_model_dir):
    """SGD harnesses at two learning rates (each builds its engines on first use)."""
    from normalisation_script import Harness, rank_batch

    from aapo_app.engine import init_distributed

    init_distributed()
    return ({lr: Harness(str(norm_model_dir), lr=lr, world=1) for lr in (0.5, 1.0)},
            rank_batch(C.make_sequences(), C.rank_groups(1, 0)))


@pytest.mark.parametrize("name,lr,clip,wide", [
    ("dapo", 1.0, {"epsilon_high": 0.28}, {"epsilon_low": 0.9999, "epsilon_high": 1e6}),
    # Dr. GRPO's ε is symmetric and below 1: at lr 0.5 no ratio leaves [0.0001, 1.9999]
    ("dr_grpo", 0.5, {"epsilon": 0.2}, {"epsilon": 0.9999}),
])
def test_clipping_acts_over_four_mini_batches(harnesses, norm_model_dir, name, lr, clip, wide):
    from transformers import LlamaForCausalLM

    h, scored = harnesses[0][lr], harnesses[1]
    schedule = {"mini_batches": 4}
    clipped, metrics = h.update(scored, name, {**schedule, **clip}, micro=2)
    # steps 2-4 of the update take their ratio against the weights before step 1: tokens get clipped
    assert metrics["algo/ratio_clip_frac"] > 0
    assert metrics["algo/ratio_clip_frac"] == pytest.approx(
        metrics["algo/ratio_clip_low_frac"] + metrics["algo/ratio_clip_high_frac"])
    assert metrics["optimizer_steps"] == 4
    if name == "dapo":  # Clip-Higher: a wider upper range changes the update
        higher, _ = h.update(scored, name, {**schedule, "epsilon_high": 0.5}, micro=2)
        assert C.relative_difference(higher, clipped) > 1e-4
    # with a clip range no ratio reaches, the update is the unclipped policy gradient: the formula
    # with ρ·A alone (ℓ = −ρA), stepped over the same four mini-batches
    unclipped, metrics_wide = h.update(scored, name, {**schedule, **wide}, micro=2)
    assert metrics_wide["algo/ratio_clip_frac"] == 0
    base = LlamaForCausalLM.from_pretrained(norm_model_dir, torch_dtype=torch.float64)
    expected = C.formula_update(base, name, {**schedule, **wide}, 1, 2, lr, C.make_sequences())
    assert C.relative_difference(unclipped, expected) < 1e-5
    assert C.relative_difference(clipped, unclipped) > 1e-4


def test_one_step_per_rollout_never_clips(harnesses):
    h, scored = harnesses[0][1.0], harnesses[1]
    _, metrics = h.update(scored, "dapo", {"mini_batches": 1}, micro=4)
    assert metrics["algo/ratio_clip_frac"] == 0  # ρ = 1: the clip range cannot matter


# ---------------------------------------------------------------------------------------------
# dynamic sampling's filter, and one grading per completion per step


def test_all_correct_group_that_differs_only_by_length_is_dropped():
    """With the `overlong` length penalty an all-correct group has different rewards; the paper's
    filter (0 < #correct < G) drops it, the reward filter would keep it."""
    from aapo_app.batches import Grades
    from aapo_app.scoring import signal_groups

    accuracy = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0])  # group 0 all correct, group 1 mixed
    overlong = torch.tensor([0.0, -0.5, -1.0, 0.0, 0.0, 0.0, -0.2, 0.0])  # group 0 lengths differ
    grades = Grades(total=accuracy + overlong, parts={"accuracy": accuracy, "overlong": overlong})
    assert signal_groups(grades, 4, "accuracy").tolist() == [False, True]
    assert signal_groups(grades, 4, "reward").tolist() == [True, True]


@pytest.mark.parametrize("name,extra,graded", [
    # DAPO: every group is flat (the reward is 0), 2 extra rounds: 3 rounds x 8 completions, each once
    ("dapo", ["algorithm.max_resample_tries=2", "algorithm.keep_groups_by=reward"], 3 * 8),
    # AAPO: the policy's 8 and the reference's 8 completions
    ("aapo", [], 8 + 8),
])
def test_rewards_are_graded_once_per_completion_per_step(tiny_model_dir, tmp_path, monkeypatch, name, extra, graded):
    import plugin_rewards
    from test_engine import tiny_overrides, train_run

    from aapo_app.rewards import REWARDS

    accuracy_calls = []
    accuracy_class = REWARDS["accuracy"]
    original = accuracy_class.__call__

    def counted(self, completions, answers, lengths):
        accuracy_calls.append(len(completions))
        return original(self, completions, answers, lengths)

    monkeypatch.setattr(accuracy_class, "__call__", counted)
    plugin_rewards.COUNTED.clear()
    cfg = load_run_config(None, tiny_overrides(tiny_model_dir, tmp_path / name, f"algorithm.name={name}",
                                               "train.max_steps=1", "rewards.weights={test_counted: 1.0}",
                                               "train.eval_max_new_tokens=2", "data.eval_size=2", *extra))
    trainer = train_run(cfg)
    evaluations = 2 * 2  # the held-out evaluation before and after grades 2 problems with accuracy
    assert sum(plugin_rewards.COUNTED) == graded
    assert sum(accuracy_calls) == graded + evaluations
    assert trainer.history[-1]["step"] == 1


def test_lr_schedule_class_rejects_unknown_kinds():
    with pytest.raises(ValueError, match="constant or cosine"):
        LRSchedule("linear", 4, 0)
