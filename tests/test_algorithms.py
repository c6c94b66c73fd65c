"""Unit tests of aapo_app.algorithms: hand-computed numbers, written next to each assertion."""

import dataclasses
import math
import subprocess
import sys
import typing

import pytest
import torch

from aapo_app.algorithms import (
    AAPO,
    ALGORITHMS,
    DAPO,
    GPG,
    GRPO,
    DrGRPO,
    Resampling,
    StepCounts,
    aapo_advantages,
    algorithm_params_class,
    build_algorithm,
    dapo_keep_mask,
    gpg_advantages,
    group_advantages,
    k3_kl,
    pg_cross_entropy_loss,
    ppo_clip_loss,
    sequence_weights,
    step_counts,
    step_metrics,
    weighted_token_sum,
)
from aapo_app.algorithms.base import AGGREGATION_MODES, AGGREGATIONS, PolicyRatioParams
from aapo_app.errors import AapoError

T, F = True, False

# Group [1, 0, 0, 1]: mean 0.5, deviations ±0.5, unbiased var = 4 · 0.25 / (4 − 1) = 1/3,
# std = sqrt(1/3) = 0.5773503; group term = ±0.5 / (0.5773503 + 1e-4) = ±0.5 / 0.5774503 = ±0.8658754.
A = 0.5 / (math.sqrt(1 / 3) + 1e-4)

REWARDS = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]])  # [P=2, G=4]
# r − r_ref: group 0 [1 − 0, 0 − 1, 0 − 0.1, 1 − 0.9] = [1, −1, −0.1, 0.1]
#            group 1 [1 − 1, 1 − 0, 1 − 1.5, 1 − 0.95] = [0, 1, −0.5, 0.05]
REF_REWARDS = torch.tensor([[0.0, 1.0, 0.1, 0.9], [1.0, 0.0, 1.5, 0.95]])


def close(actual, expected, atol=1e-5):
    return torch.allclose(torch.as_tensor(actual, dtype=torch.float32), torch.as_tensor(expected, dtype=torch.float32), atol=atol)


def step_weights(mode, mask, group_ids=None, constant=None):
    """The weights of ``mode`` when the micro-batch ``mask [n, L]`` is a whole optimizer step on its
    own (one micro-batch, one rank); every sequence in one prompt group unless ``group_ids``."""
    n = mask.shape[0]
    lengths = mask.sum(dim=1)
    groups = torch.zeros(n, dtype=torch.long) if group_ids is None else torch.as_tensor(group_ids)
    micro = torch.zeros(n, dtype=torch.long)
    return sequence_weights(mode, lengths, groups, micro, step_counts(lengths, groups, micro), constant)


# ---------------------------------------------------------------------------------------------
# AAPO advantages


def test_aapo_advantages_hit_both_clip_bounds_and_the_interior():
    adv, diag = aapo_advantages(REWARDS, REF_REWARDS)
    # momentum = clip(r − r_ref, −0.2, 0.28):
    #   group 0: [1 → 0.28 (high), −1 → −0.2 (low), −0.1 (interior), 0.1 (interior)]
    #   group 1: [0, 1 → 0.28 (high), −0.5 → −0.2 (low), 0.05 (interior)]
    # group term: group 0 [+A, −A, −A, +A] with A = 0.8658754; group 1 all equal → 0.
    expected = torch.tensor(
        [
            [A + 0.28, -A - 0.2, -A - 0.1, A + 0.1],  # [1.1458754, −1.0658754, −0.9658754, 0.9658754]
            [0.0, 0.28, -0.2, 0.05],
        ]
    )
    assert close(adv, expected)
    assert diag["zero_std_group_frac"] == 0.5  # group 1 of 2
    assert diag["momentum_clip_low_frac"] == 0.25  # r − r_ref in {−1, −0.5} < −0.2: 2 of 8
    assert diag["momentum_clip_high_frac"] == 0.25  # r − r_ref in {1, 1} > 0.28: 2 of 8
    assert diag["group_term_mean"] == pytest.approx(0.0, abs=1e-6)  # (2A − 2A + 0) / 8
    # population std of [A, −A, −A, A, 0, 0, 0, 0]: sqrt(4A² / 8) = A / sqrt(2) = 0.6122664
    assert diag["group_term_std"] == pytest.approx(A / math.sqrt(2), abs=1e-5)
    # momentum mean: (0.28 − 0.2 − 0.1 + 0.1 + 0 + 0.28 − 0.2 + 0.05) / 8 = 0.21 / 8 = 0.02625
    assert diag["momentum_mean"] == pytest.approx(0.02625, abs=1e-6)


def test_aapo_all_equal_group_is_finite_and_only_the_clipped_momentum():
    # 0.1 is not exact in float32; the mean of three 0.1s may differ from 0.1 by rounding, yet the
    # group term must be exactly 0, not a tiny number or NaN.
    rewards = torch.tensor([[0.1, 0.1, 0.1]])
    ref = torch.tensor([[0.1, 0.6, -0.4]])  # r − r_ref = [0, −0.5, 0.5] → clip → [0, −0.2, 0.28]
    adv, diag = aapo_advantages(rewards, ref)
    assert torch.isfinite(adv).all()
    momentum = torch.clamp(rewards - ref, -0.2, 0.28)
    assert torch.equal(adv, momentum)  # exactly: group term is 0.0
    assert close(adv, [[0.0, -0.2, 0.28]])
    assert diag["zero_std_group_frac"] == 1.0
    assert diag["group_term_mean"] == 0.0 and diag["group_term_std"] == 0.0


def test_aapo_all_equal_group_with_zero_eps_is_still_finite():
    adv, _ = aapo_advantages(torch.ones(1, 4), torch.zeros(1, 4), eps=0.0)
    # group term 0 (not 0/0), momentum clip(1 − 0) = 0.28
    assert torch.equal(adv, torch.full((1, 4), 0.28))


def test_aapo_no_clip_ablation_keeps_the_raw_difference():
    adv, diag = aapo_advantages(REWARDS, REF_REWARDS, clip=False)
    # momentum = r − r_ref unclipped: group 0 [1, −1, −0.1, 0.1], group 1 [0, 1, −0.5, 0.05]
    expected = torch.tensor([[A + 1.0, -A - 1.0, -A - 0.1, A + 0.1], [0.0, 1.0, -0.5, 0.05]])
    assert close(adv, expected)
    assert diag["momentum_clip_low_frac"] == 0.0 and diag["momentum_clip_high_frac"] == 0.0  # nothing is clipped
    # momentum mean: (1 − 1 − 0.1 + 0.1 + 0 + 1 − 0.5 + 0.05) / 8 = 0.55 / 8 = 0.06875
    assert diag["momentum_mean"] == pytest.approx(0.06875, abs=1e-6)


def test_aapo_delta_values_are_configurable():
    adv, diag = aapo_advantages(REWARDS, REF_REWARDS, delta_low=-0.5, delta_high=0.5)
    # clip(r − r_ref, −0.5, 0.5): group 0 [0.5, −0.5, −0.1, 0.1]; group 1 [0, 0.5, −0.5, 0.05]
    # (−0.5 sits exactly on δ_low: clamped to itself, not counted as clipped)
    expected = torch.tensor([[A + 0.5, -A - 0.5, -A - 0.1, A + 0.1], [0.0, 0.5, -0.5, 0.05]])
    assert close(adv, expected)
    assert diag["momentum_clip_low_frac"] == 0.125  # only −1 < −0.5: 1 of 8
    assert diag["momentum_clip_high_frac"] == 0.25  # 1 and 1 > 0.5: 2 of 8

    algo = build_algorithm("aapo", AAPO.Params(delta_low=-0.5, delta_high=0.5))
    assert torch.equal(algo.advantages(REWARDS, REF_REWARDS).advantages, adv)


def test_aapo_algorithm_matches_the_function_and_needs_ref_rewards():
    algo = build_algorithm("aapo")
    out = algo.advantages(REWARDS, REF_REWARDS)
    expected, diag = aapo_advantages(REWARDS, REF_REWARDS)
    assert torch.equal(out.advantages, expected) and out.diagnostics == diag
    assert algo.uses_reference_samples and not algo.uses_reference_logprobs and not algo.uses_old_logprobs
    with pytest.raises(ValueError, match="ref_rewards"):
        algo.advantages(REWARDS, None)


def test_advantage_inputs_are_checked():
    with pytest.raises(ValueError, match="G >= 2"):
        aapo_advantages(torch.ones(3, 1), torch.ones(3, 1))
    with pytest.raises(ValueError, match="pairs"):
        aapo_advantages(REWARDS, REF_REWARDS[:, :3])
    with pytest.raises(ValueError, match="NaN"):
        group_advantages(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match=r"\[P, G\]"):
        group_advantages(torch.ones(4))


# ---------------------------------------------------------------------------------------------
# GRPO and GPG advantages


def test_group_advantages_std_and_no_std():
    adv = group_advantages(REWARDS)
    # group 0: ±0.5 / (std 0.5773503 + 1e-4) = ±A; group 1 all equal → exactly 0
    assert close(adv, [[A, -A, -A, A], [0, 0, 0, 0]])
    assert torch.equal(adv[1], torch.zeros(4))
    # scale_by_std=False: r − mean = [0.5, −0.5, −0.5, 0.5]
    assert close(group_advantages(REWARDS, scale_by_std=False), [[0.5, -0.5, -0.5, 0.5], [0, 0, 0, 0]])
    # [0, 1, 2]: mean 1, unbiased std = sqrt((1 + 0 + 1) / 2) = 1 → [−1, 0, 1] / 1.0001
    assert close(group_advantages(torch.tensor([[0.0, 1.0, 2.0]])), [[-1 / 1.0001, 0.0, 1 / 1.0001]])


def test_grpo_advantages_diagnostics():
    out = build_algorithm("grpo").advantages(REWARDS)
    assert close(out.advantages, [[A, -A, -A, A], [0, 0, 0, 0]])
    assert out.diagnostics == {"zero_std_group_frac": 0.5}


def test_gpg_alpha_rescales_with_one_zero_std_group():
    # f_norm "one": r − mean = [0.5, −0.5, −0.5, 0.5] and [0, 0, 0, 0];
    # α = 4 samples in groups with std > 0 / 8 samples = 0.5 → divide by 0.5: [1, −1, −1, 1]
    adv, diag = gpg_advantages(REWARDS, f_norm="one")
    assert close(adv, [[1.0, -1.0, -1.0, 1.0], [0, 0, 0, 0]])
    assert diag == {"alpha": 0.5, "zero_std_group_frac": 0.5}
    # f_norm "std": ±A / 0.5 = ±2A = ±1.7317508
    adv, diag = gpg_advantages(REWARDS, f_norm="std")
    assert close(adv, [[2 * A, -2 * A, -2 * A, 2 * A], [0, 0, 0, 0]])
    assert diag["alpha"] == 0.5


def test_gpg_no_rescale_when_every_group_has_signal():
    rewards = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    # α = 4/4 = 1; f_norm "one": [0.5, −0.5], [−1, 1]
    adv, diag = gpg_advantages(rewards, f_norm="one")
    assert close(adv, [[0.5, -0.5], [-1.0, 1.0]])
    assert diag == {"alpha": 1.0, "zero_std_group_frac": 0.0}


def test_gpg_alpha_zero_gives_zero_advantages_not_nan():
    adv, diag = gpg_advantages(torch.tensor([[1.0, 1.0], [0.0, 0.0]]))
    assert torch.equal(adv, torch.zeros(2, 2))
    assert diag == {"alpha": 0.0, "zero_std_group_frac": 1.0}


def test_gpg_algorithm_uses_its_params():
    out = build_algorithm("gpg", GPG.Params(f_norm="one")).advantages(REWARDS)
    assert close(out.advantages, [[1.0, -1.0, -1.0, 1.0], [0, 0, 0, 0]])
    with pytest.raises(ValueError, match="f_norm"):
        gpg_advantages(REWARDS, f_norm="max")


# ---------------------------------------------------------------------------------------------
# Loss normalisation over the optimizer step: step_counts, sequence_weights, weighted_token_sum,
# step_metrics

# One optimizer step: three groups of two sequences with counted tokens [2, 1 | 3, 0 | 0, 0], in two
# micro-batches (rows 0-2 and 3-5): N = 6 tokens, S = 6 sequences, K = 3 groups, M = 2 micro-batches.
W_LENGTHS = torch.tensor([2, 1, 3, 0, 0, 0])
W_GROUPS = torch.tensor([0, 0, 1, 1, 2, 2])
W_MICRO = torch.tensor([0, 0, 0, 1, 1, 1])
W_TOTALS = StepCounts(tokens=6.0, sequences=6.0, groups=3.0, micro_batches=2.0)
MODES_AND_CONSTANTS = [(mode, 4.0 if mode == "constant" else None) for mode in AGGREGATION_MODES]


def test_aggregation_modes():
    assert AGGREGATION_MODES == ("group_token_mean", "token_mean", "seq_mean", "constant", "micro_batch_token_mean")
    assert tuple(AGGREGATIONS) == AGGREGATION_MODES  # every mode is described


def test_step_counts():
    assert step_counts(W_LENGTHS, W_GROUPS, W_MICRO) == W_TOTALS
    assert W_TOTALS.as_list() == [6.0, 6.0, 3.0, 2.0]
    # ids are any ints, only equality matters: groups {7, −1, 3}, micro-batches {5, 9}
    assert step_counts(W_LENGTHS, torch.tensor([7, 7, -1, -1, 3, 3]), torch.tensor([5, 5, 5, 9, 9, 9])) == W_TOTALS
    # a rank without a sequence in the step adds nothing to the sums over ranks
    empty = torch.zeros(0, dtype=torch.long)
    assert step_counts(empty, empty, empty) == StepCounts(0.0, 0.0, 0.0, 0.0)


@pytest.mark.parametrize(
    "mode,constant,expected",
    [
        # group tokens N_g: 2 + 1 = 3, 3 + 0 = 3, 0 + 0 = 0 → 1/(K · N_g) = 1/(3 · 3) = 1/9 in groups 0 and 1
        # (row 3 too: it has no token but its group has), 0 in the empty group 2 (not 1/0)
        ("group_token_mean", None, [1 / 9, 1 / 9, 1 / 9, 1 / 9, 0.0, 0.0]),
        # 1/N = 1/6 for every sequence
        ("token_mean", None, [1 / 6] * 6),
        # 1/(S · |o_i|): 1/(6 · 2) = 1/12, 1/(6 · 1) = 1/6, 1/(6 · 3) = 1/18; zero-token rows 0 (not 1/0)
        ("seq_mean", None, [1 / 12, 1 / 6, 1 / 18, 0.0, 0.0, 0.0]),
        # 1/(S · constant) = 1/(6 · 4) = 1/24 for every sequence
        ("constant", 4.0, [1 / 24] * 6),
        # micro-batch tokens N_m: rows 0-2 2 + 1 + 3 = 6, rows 3-5 0 → 1/(M · N_m) = 1/(2 · 6) = 1/12, then 0
        ("micro_batch_token_mean", None, [1 / 12, 1 / 12, 1 / 12, 0.0, 0.0, 0.0]),
    ],
)
def test_sequence_weights_by_hand(mode, constant, expected):
    w = sequence_weights(mode, W_LENGTHS, W_GROUPS, W_MICRO, W_TOTALS, constant)
    assert w.dtype == torch.float64 and w.shape == (6,) and torch.isfinite(w).all()
    torch.testing.assert_close(w, torch.tensor(expected, dtype=torch.float64))


@pytest.mark.parametrize("mode,constant", MODES_AND_CONSTANTS)
def test_sequence_weights_on_each_rank_use_the_totals_of_all_ranks(mode, constant):
    # The same step on 2 ranks: rank 0 holds rows 0-3 (groups 0, 1) in micro-batches [0, 0, 1, 1],
    # rank 1 rows 4-5 (group 2) in its micro-batch [0]. Summed counts: rank 0 (6 tokens, 4 seqs,
    # 2 groups, 2 micro-batches) + rank 1 (0, 2, 1, 1) = (6, 6, 3, 3). Each rank's weights with the
    # summed totals are those of one process holding both ranks' micro-batches side by side (ids 0, 1, 2).
    ranks = [(slice(0, 4), torch.tensor([0, 0, 1, 1])), (slice(4, 6), torch.tensor([0, 0]))]
    local = [step_counts(W_LENGTHS[rows], W_GROUPS[rows], micro) for rows, micro in ranks]
    totals = StepCounts(*[a + b for a, b in zip(local[0].as_list(), local[1].as_list())])
    assert totals == StepCounts(6.0, 6.0, 3.0, 3.0)
    per_rank = torch.cat([sequence_weights(mode, W_LENGTHS[rows], W_GROUPS[rows], micro, totals, constant)
                          for rows, micro in ranks])
    micro_all = torch.tensor([0, 0, 1, 1, 2, 2])
    one_process = sequence_weights(mode, W_LENGTHS, W_GROUPS, micro_all, step_counts(W_LENGTHS, W_GROUPS, micro_all),
                                   constant)
    torch.testing.assert_close(per_rank, one_process)


@pytest.mark.parametrize("mode,constant", MODES_AND_CONSTANTS)
def test_sequence_weights_without_tokens_are_finite(mode, constant):
    # a step whose 3 sequences (groups [0, 0, 1], micro-batches [0, 0, 1]) have no counted token: N = 0
    lengths, ids = torch.zeros(3, dtype=torch.long), torch.tensor([0, 0, 1])
    w = sequence_weights(mode, lengths, ids, ids, step_counts(lengths, ids, ids), constant)
    assert torch.isfinite(w).all()  # no 1/0 = inf, no 0/0 = NaN
    if mode in ("group_token_mean", "seq_mean", "micro_batch_token_mean"):
        assert torch.equal(w, torch.zeros(3, dtype=torch.float64))  # 0 where the formula would divide by 0
    # the loss of such a step is exactly 0, with a zero gradient
    per_token = torch.ones(3, 2, requires_grad=True)
    loss = weighted_token_sum(per_token, torch.zeros(3, 2, dtype=torch.bool), w)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(per_token.grad, torch.zeros(3, 2))
    # a rank with no sequence in the step: no weights, whatever the totals of the others
    empty = torch.zeros(0, dtype=torch.long)
    assert sequence_weights(mode, empty, empty, empty, W_TOTALS, constant).shape == (0,)


def test_sequence_weights_reject_a_bad_mode_or_constant():
    args = (W_LENGTHS, W_GROUPS, W_MICRO, W_TOTALS)
    with pytest.raises(ValueError, match="unknown loss aggregation mode 'sum'"):
        sequence_weights("sum", *args)
    with pytest.raises(ValueError, match="constant must be given for mode 'constant'"):
        sequence_weights("constant", *args)  # no constant
    with pytest.raises(ValueError, match="constant must be given for mode 'constant' and only for it"):
        sequence_weights("token_mean", *args, 4.0)  # a constant for another mode
    for bad in (0.0, -4.0, float("nan")):
        with pytest.raises(ValueError, match="constant must be > 0"):
            sequence_weights("constant", *args, bad)


PER_TOKEN = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])  # [n=3, L=3]
MASK = torch.tensor([[T, T, F], [T, F, F], [F, F, F]])  # 2, 1 and 0 counted tokens


def test_weighted_token_sum_by_hand():
    # token_mean of this micro-batch alone: w = 1/N = 1/3 → (1 + 2 + 4) / 3 = 7/3
    w = step_weights("token_mean", MASK)
    assert close(w, [1 / 3, 1 / 3, 1 / 3])
    assert weighted_token_sum(PER_TOKEN, MASK, w).item() == pytest.approx(7 / 3)
    # seq_mean: w = 1/(3 · 2), 1/(3 · 1) and 0 for the empty row (which still counts in S = 3):
    # (1 + 2)/6 + 4/3 + 0 = 1.5/3 + 4/3 = 5.5/3
    w = step_weights("seq_mean", MASK)
    assert close(w, [1 / 6, 1 / 3, 0.0])
    assert weighted_token_sum(PER_TOKEN, MASK, w).item() == pytest.approx(5.5 / 3)
    # constant 4: w = 1/(3 · 4) = 1/12 → (1 + 2 + 4) / 12 = 7/12
    w = step_weights("constant", MASK, constant=4.0)
    assert close(w, [1 / 12] * 3)
    assert weighted_token_sum(PER_TOKEN, MASK, w).item() == pytest.approx(7 / 12)
    # group_token_mean with groups [0, 0, 1]: N_0 = 3, N_1 = 0, K = 2 → w = 1/6, 1/6, 0 → (3 + 4)/6 = 7/6
    w = step_weights("group_token_mean", MASK, group_ids=[0, 0, 1])
    assert close(w, [1 / 6, 1 / 6, 0.0])
    assert weighted_token_sum(PER_TOKEN, MASK, w).item() == pytest.approx(7 / 6)


def test_weighted_token_sum_ignores_garbage_where_masked():
    garbage = PER_TOKEN.clone()
    garbage[~MASK] = float("nan")
    garbage[2, 0] = float("inf")
    garbage.requires_grad_(True)
    loss = weighted_token_sum(garbage, MASK, step_weights("token_mean", MASK))
    loss.backward()
    assert loss.item() == pytest.approx(7 / 3)
    # ∂loss/∂ℓ_it = w_i = 1/3 on counted tokens, exactly 0 (not NaN) on the garbage
    assert close(garbage.grad, [[1 / 3, 1 / 3, 0.0], [1 / 3, 0.0, 0.0], [0.0, 0.0, 0.0]])
    assert torch.equal(garbage.grad[~MASK], torch.zeros(int((~MASK).sum())))
    assert weighted_token_sum(garbage.detach(), MASK, step_weights("seq_mean", MASK)).item() == pytest.approx(5.5 / 3)


@pytest.mark.parametrize("mode,constant", MODES_AND_CONSTANTS)
def test_weighted_token_sum_of_an_all_false_mask_is_zero_with_zero_gradient(mode, constant):
    per_token = PER_TOKEN.clone().requires_grad_(True)
    mask = torch.zeros(3, 3, dtype=torch.bool)
    # the weights of MASK's step (finite, some non-zero): an all-False micro-batch of it still gives 0
    loss = weighted_token_sum(per_token, mask, step_weights(mode, MASK, constant=constant))
    assert loss.requires_grad  # connected to the graph: backward works and gives zeros
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(per_token.grad, torch.zeros(3, 3))
    no_rows = torch.zeros(0, dtype=torch.float64)
    empty = weighted_token_sum(torch.zeros(0, 5), torch.zeros(0, 5, dtype=torch.bool), no_rows)
    assert empty.item() == 0.0


def test_weighted_token_sum_rejects_bad_arguments():
    w = step_weights("token_mean", MASK)
    with pytest.raises(ValueError, match="bool"):
        weighted_token_sum(PER_TOKEN, MASK.int(), w)
    with pytest.raises(ValueError, match="shaped like per_token"):
        weighted_token_sum(PER_TOKEN, MASK[:, :2], w)
    with pytest.raises(ValueError, match="weights must be"):
        weighted_token_sum(PER_TOKEN, MASK, w[:2])


def test_step_metrics_turn_sums_into_means_and_fractions():
    # the loss stats of an update of 2 optimizer steps, summed over its micro-batches and ranks
    totals = {
        "num_tokens": 12.0,
        "ratio_clip_tokens": 3.0,
        "ratio_clip_low_tokens": 1.0,
        "ratio_clip_high_tokens": 2.0,
        "kl_sum": 0.6,
        "logprob_sum": -6.0,
        "loss": 0.5,
        "pg_loss": 0.4,
    }
    assert step_metrics(totals, 2) == pytest.approx({
        "num_tokens": 6.0,  # 12 tokens / 2 optimizer steps: tokens per step
        "ratio_clip_frac": 0.25,  # *_tokens → *_frac: 3 / 12 tokens
        "ratio_clip_low_frac": 1 / 12,  # 1 / 12
        "ratio_clip_high_frac": 1 / 6,  # 2 / 12
        "kl_mean": 0.05,  # *_sum → *_mean per token: 0.6 / 12
        "logprob_mean": -0.5,  # −6 / 12
        "loss": 0.25,  # a share of the step objective → mean per step: 0.5 / 2
        "pg_loss": 0.2,  # 0.4 / 2
    })
    # no counted token at all: fractions and means are 0, not 0/0
    none = step_metrics({"num_tokens": 0.0, "ratio_clip_tokens": 0.0, "kl_sum": 0.0, "loss": 0.0}, 1)
    assert none == {"num_tokens": 0.0, "ratio_clip_frac": 0.0, "kl_mean": 0.0, "loss": 0.0}


# One optimizer step of 4 sequences in 2 prompt groups (rows 0-1 and 2-3); row token sums 3, 3, 5, 0.
SPLIT_PER_TOKEN = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]])  # [4, 2]
SPLIT_MASK = torch.tensor([[T, T], [T, F], [T, F], [F, F]])  # 2, 1, 1, 0 counted tokens: N = 4, S = 4, K = 2
SPLIT_GROUPS = torch.tensor([0, 0, 1, 1])
ONE_MICRO = torch.tensor([0, 0, 0, 0])  # the whole step in one micro-batch
TWO_MICRO = torch.tensor([0, 0, 1, 1])  # micro-batches rows 0-1 (3 tokens) and rows 2-3 (1 token)


def split_loss(mode, micro_ids, constant=None, mask=SPLIT_MASK):
    """The step's loss as the update computes it: the step's weights (over all its micro-batches),
    then each micro-batch's share Σ_i w_i Σ_t ℓ_it, summed over the micro-batches."""
    lengths = mask.sum(dim=1)
    totals = step_counts(lengths, SPLIT_GROUPS, micro_ids)
    w = sequence_weights(mode, lengths, SPLIT_GROUPS, micro_ids, totals, constant)
    shares = [weighted_token_sum(SPLIT_PER_TOKEN[micro_ids == m], mask[micro_ids == m], w[micro_ids == m])
              for m in micro_ids.unique()]
    return float(sum(shares))


@pytest.mark.parametrize(
    "mode,constant,expected",
    [
        # groups N_0 = 2 + 1 = 3, N_1 = 1 + 0 = 1, K = 2: ((3 + 3)/3 + (5 + 0)/1) / 2 = (2 + 5) / 2 = 3.5
        ("group_token_mean", None, 3.5),
        # (3 + 3 + 5 + 0) / 4 tokens = 11/4 = 2.75
        ("token_mean", None, 2.75),
        # row means 1.5, 3, 5 and 0 for the empty row → 9.5 / 4 = 2.375
        ("seq_mean", None, 2.375),
        # (3 + 3 + 5) / (4 · 2) = 11/8
        ("constant", 2.0, 11 / 8),
    ],
)
def test_splitting_a_step_into_micro_batches_keeps_its_loss(mode, constant, expected):
    assert split_loss(mode, ONE_MICRO, constant) == pytest.approx(expected)
    assert split_loss(mode, TWO_MICRO, constant) == pytest.approx(expected)
    assert split_loss(mode, torch.tensor([0, 1, 1, 1]), constant) == pytest.approx(expected)  # unequal sizes


def test_micro_batch_token_mean_depends_on_the_split():
    # one micro-batch: the step's token mean 11/4 = 2.75
    assert split_loss("micro_batch_token_mean", ONE_MICRO) == pytest.approx(2.75)
    # two: the token means 6/3 = 2 (rows 0-1) and 5/1 = 5 (rows 2-3), averaged: 3.5 ≠ 2.75 (3 vs 1 tokens)
    assert split_loss("micro_batch_token_mean", TWO_MICRO) == pytest.approx(3.5)
    # with equal token counts per micro-batch (2 and 2) it is the step's token mean again:
    # whole (1 + 2 + 5 + 7) / 4 = 3.75; halves 3/2 = 1.5 and 12/2 = 6 → mean 3.75
    mask_eq = torch.tensor([[T, T], [F, F], [T, F], [T, F]])
    assert split_loss("micro_batch_token_mean", TWO_MICRO, mask=mask_eq) == pytest.approx(3.75)
    assert split_loss("token_mean", ONE_MICRO, mask=mask_eq) == pytest.approx(3.75)


# ---------------------------------------------------------------------------------------------
# AAPO / GPG loss

LOGPROBS = torch.tensor([[-0.5, -1.0, -9.0], [-2.0, -7.0, -7.0], [-3.0, -3.0, -3.0]])  # [n=3, L=3]
LOSS_MASK = torch.tensor([[T, T, F], [T, F, F], [F, F, F]])  # 3 counted tokens; row 2 is empty
ADVANTAGES = torch.tensor([1.0, -2.0, 5.0])  # [n]
# token_mean with this micro-batch as the whole step: w_i = 1/N = 1/3 for every sequence
TOKEN_MEAN_W = torch.full((3,), 1 / 3, dtype=torch.float64)


def test_token_mean_weights_of_the_loss_micro_batch():
    assert torch.equal(step_weights("token_mean", LOSS_MASK), TOKEN_MEAN_W)
    # AAPO's and GPG's default, group_token_mean, is the same here: one group, N_g = 3, K = 1 → 1/3
    for name in ("aapo", "gpg"):
        mode, constant = build_algorithm(name).aggregation(16)
        assert (mode, constant) == ("group_token_mean", None)
        assert torch.equal(step_weights(mode, LOSS_MASK, constant=constant), TOKEN_MEAN_W)


def test_aapo_loss_value_by_hand():
    out = build_algorithm("aapo").loss(LOGPROBS, LOSS_MASK, ADVANTAGES, TOKEN_MEAN_W, None, None)
    # −logp · A on counted tokens: −(−0.5)(1) = 0.5, −(−1)(1) = 1, −(−2)(−2) = −4
    # Σ_i w_i Σ_t: (0.5 + 1 − 4) / 3 = −2.5/3 = −0.8333333
    assert out.loss.item() == pytest.approx(-2.5 / 3)
    assert out.stats["loss"] == pytest.approx(-2.5 / 3)
    assert out.stats["num_tokens"] == 3.0
    # Σ logp over counted tokens: −0.5 − 1 − 2 = −3.5; as a metric, the mean per token −3.5/3
    assert out.stats["logprob_sum"] == pytest.approx(-3.5)
    assert step_metrics(out.stats, 1)["logprob_mean"] == pytest.approx(-3.5 / 3)


def test_aapo_loss_gradient_is_minus_advantage_times_weight():
    logprobs = LOGPROBS.clone().requires_grad_(True)
    build_algorithm("aapo").loss(logprobs, LOSS_MASK, ADVANTAGES, TOKEN_MEAN_W).loss.backward()
    # ∂L/∂logp_it = −w_i A_i = −A_i / N on counted tokens (N = 3), 0 elsewhere:
    # row 0: −1/3; row 1: −(−2)/3 = 2/3; row 2 (no counted token): 0
    expected = torch.tensor([[-1 / 3, -1 / 3, 0.0], [2 / 3, 0.0, 0.0], [0.0, 0.0, 0.0]])
    assert close(logprobs.grad, expected)


def test_ce_loss_is_finite_with_garbage_in_masked_positions():
    logprobs = LOGPROBS.clone()
    logprobs[~LOSS_MASK] = float("-inf")
    logprobs.requires_grad_(True)
    out = pg_cross_entropy_loss(logprobs, LOSS_MASK, ADVANTAGES, TOKEN_MEAN_W)
    out.loss.backward()
    assert out.loss.item() == pytest.approx(-2.5 / 3)
    assert out.stats["logprob_sum"] == pytest.approx(-3.5)  # the −inf garbage is not summed
    assert torch.isfinite(logprobs.grad).all()


def test_ce_loss_of_an_all_masked_micro_batch_is_zero():
    logprobs = LOGPROBS.clone().requires_grad_(True)
    mask = torch.zeros(3, 3, dtype=torch.bool)
    out = pg_cross_entropy_loss(logprobs, mask, ADVANTAGES, step_weights("token_mean", mask))
    out.loss.backward()
    assert out.loss.item() == 0.0 and out.stats["num_tokens"] == 0.0 and out.stats["logprob_sum"] == 0.0
    assert torch.equal(logprobs.grad, torch.zeros(3, 3))


def test_gpg_loss_is_the_same_ce_loss():
    out = build_algorithm("gpg").loss(LOGPROBS, LOSS_MASK, ADVANTAGES, TOKEN_MEAN_W)
    assert out.loss.item() == pytest.approx(-2.5 / 3)


def test_loss_inputs_are_checked():
    with pytest.raises(ValueError, match="bool"):
        pg_cross_entropy_loss(LOGPROBS, LOSS_MASK.float(), ADVANTAGES, TOKEN_MEAN_W)
    with pytest.raises(ValueError, match="advantages"):
        pg_cross_entropy_loss(LOGPROBS, LOSS_MASK, ADVANTAGES[:2], TOKEN_MEAN_W)
    with pytest.raises(ValueError, match="weights"):
        pg_cross_entropy_loss(LOGPROBS, LOSS_MASK, ADVANTAGES, TOKEN_MEAN_W[:2])
    with pytest.raises(ValueError, match="weights"):
        build_algorithm("dapo").loss(LOGPROBS, LOSS_MASK, ADVANTAGES, TOKEN_MEAN_W[:2])


@pytest.mark.parametrize("name", ["aapo", "gpg", "grpo", "dr_grpo", "dapo"])
def test_loss_stats_of_micro_batches_add_up_to_the_step(name):
    # The update sums each micro-batch's stats over the step: the step's weights make rows 0-1 and
    # row 2 as two micro-batches add up to the whole step as one, stats and loss alike.
    algo = build_algorithm(name)
    mask = torch.tensor([[T, T, F], [T, F, F], [T, T, T]])  # 2, 1, 3 counted tokens
    old = torch.zeros(3, 3)  # ρ = exp(logp) < 0.8 everywhere: row 1 (A = −2 < 0) is clipped below
    ref = LOGPROBS - 0.3 if algo.uses_reference_logprobs else None
    mode, constant = algo.aggregation(3)
    w = step_weights(mode, mask, constant=constant)
    whole = algo.loss(LOGPROBS, mask, ADVANTAGES, w, old, ref)
    parts = [algo.loss(LOGPROBS[s], mask[s], ADVANTAGES[s], w[s], old[s], None if ref is None else ref[s])
             for s in (slice(0, 2), slice(2, 3))]
    assert set(parts[0].stats) == set(parts[1].stats) == set(whole.stats)
    for key, value in whole.stats.items():
        assert parts[0].stats[key] + parts[1].stats[key] == pytest.approx(value, abs=1e-6), key
    assert float(parts[0].loss + parts[1].loss) == pytest.approx(whole.loss.item(), abs=1e-6)
    if algo.uses_old_logprobs:
        assert whole.stats["ratio_clip_tokens"] > 0  # the split covers clipped tokens too


# ---------------------------------------------------------------------------------------------
# PPO clip, k3, GRPO loss


def test_ppo_clip_loss_positive_and_negative_advantages():
    old = torch.zeros(2, 2)
    # column 0: ratio 1.5 (logp = ln 1.5), column 1: ratio 0.5 (logp = ln 0.5)
    logprobs = torch.log(torch.tensor([[1.5, 0.5], [1.5, 0.5]])).requires_grad_(True)
    adv = torch.tensor([1.0, -1.0])
    mask = torch.ones(2, 2, dtype=torch.bool)
    per_token, clipped = ppo_clip_loss(logprobs, old, adv, mask, 0.2, 0.2)
    # A = +1: ρ 1.5 → −min(1.5, 1.2) = −1.2 (clipped);  ρ 0.5 → −min(0.5, 0.8) = −0.5 (not clipped)
    # A = −1: ρ 1.5 → −min(−1.5, −1.2) = 1.5 (not);    ρ 0.5 → −min(−0.5, −0.8) = 0.8 (clipped)
    assert close(per_token, [[-1.2, -0.5], [1.5, 0.8]])
    assert torch.equal(clipped, torch.tensor([[T, F], [F, T]]))
    per_token.sum().backward()
    # clipped tokens get no gradient; the others get ∂(−ρA)/∂logp = −A·ρ: −0.5 and +1.5
    assert close(logprobs.grad, [[0.0, -0.5], [1.5, 0.0]])


def test_ppo_clip_loss_asymmetric_range_and_mask():
    logprobs = torch.log(torch.tensor([[1.5, 1.5]]))
    old = torch.tensor([[0.0, float("nan")]])  # garbage where masked
    per_token, clipped = ppo_clip_loss(logprobs, old, torch.tensor([1.0]), torch.tensor([[T, F]]), 0.2, 0.28)
    # A = +1, ρ 1.5 → −min(1.5, 1.28) = −1.28; masked token → 0
    assert close(per_token, [[-1.28, 0.0]])
    assert torch.equal(clipped, torch.tensor([[T, F]]))


def test_k3_kl():
    logprobs = torch.tensor([[-1.0, -2.0]])
    assert torch.equal(k3_kl(logprobs, logprobs), torch.zeros(1, 2))  # e^0 − 0 − 1 = 0
    # ref − logp = ln 2: 2 − ln 2 − 1 = 0.3068528
    assert k3_kl(torch.tensor([0.0]), torch.tensor([math.log(2)])).item() == pytest.approx(1 - math.log(2))


def test_grpo_loss_value_and_gradient_by_hand():
    logprobs = torch.tensor([[-1.0, -2.0], [-0.5, -9.0]], requires_grad=True)  # [n=2, L=2]
    mask = torch.tensor([[T, T], [T, F]])
    adv = torch.tensor([1.0, -1.0])
    ref = torch.tensor([[-1.0 + math.log(2), -2.0], [-0.5, 0.0]])  # k3 = 1 − ln 2 at [0, 0], else 0
    algo = build_algorithm("grpo")
    mode, constant = algo.aggregation(2)
    # seq_mean over this micro-batch: w_i = 1/(n · |o_i|) = 1/(2 · 2) = 1/4, 1/(2 · 1) = 1/2
    w = step_weights(mode, mask, constant=constant)
    assert mode == "seq_mean" and close(w, [0.25, 0.5])
    out = algo.loss(logprobs, mask, adv, w, None, ref)
    k = 1 - math.log(2)  # 0.3068528
    # old = logp.detach() → ρ = 1, PPO term = −A: row 0 [−1, −1], row 1 [1]
    # row 0 mean ((−1 + 0.04k) + (−1)) / 2 = −0.9938629; row 1 mean 1 → (−0.9938629 + 1) / 2 = 0.04k/4
    assert out.loss.item() == pytest.approx(0.04 * k / 4, abs=1e-7)  # 0.0030685 (float32)
    assert out.stats["pg_loss"] == pytest.approx(0.0)  # (−1 + 1) / 2
    assert out.stats["kl_sum"] == pytest.approx(k)  # one non-zero k3
    assert out.stats["num_tokens"] == 3.0
    assert out.stats["ratio_clip_tokens"] == 0.0
    metrics = step_metrics(out.stats, 1)
    assert metrics["kl_mean"] == pytest.approx(k / 3)  # one non-zero of 3 counted tokens
    assert metrics["ratio_clip_frac"] == 0.0
    out.loss.backward()
    # ∂/∂logp[0,0]: PPO −A·ρ = −1, KL β·(1 − e^{ref−logp}) = 0.04 · (1 − 2) = −0.04 → −1.04 / 2 tokens / 2 rows = −0.26
    # ∂/∂logp[0,1]: −1 / 2 / 2 = −0.25; ∂/∂logp[1,0]: −(−1) / 1 / 2 = 0.5; masked: 0
    assert close(logprobs.grad, [[-0.26, -0.25], [0.5, 0.0]])


def test_grpo_loss_with_old_logprobs_clips():
    logprobs = torch.log(torch.tensor([[1.5]])).requires_grad_(True)
    # seq_mean of one sequence with one token: w = 1/(1 · 1) = 1
    out = build_algorithm("grpo", GRPO.Params(beta=0.0)).loss(
        logprobs, torch.tensor([[T]]), torch.tensor([1.0]), torch.ones(1, dtype=torch.float64), torch.zeros(1, 1), None
    )
    # ρ = 1.5 > 1.2 with A = +1 → loss −1.2, clipped above, no KL stat without ref log-probs
    assert out.loss.item() == pytest.approx(-1.2)
    assert out.stats["ratio_clip_tokens"] == 1.0 and "kl_sum" not in out.stats
    assert out.stats["ratio_clip_high_tokens"] == 1.0 and out.stats["ratio_clip_low_tokens"] == 0.0
    assert step_metrics(out.stats, 1)["ratio_clip_frac"] == 1.0


def test_grpo_reference_logprob_needs():
    assert build_algorithm("grpo").uses_reference_logprobs  # β = 0.04
    assert not build_algorithm("grpo", GRPO.Params(beta=0.0)).uses_reference_logprobs
    assert build_algorithm("grpo").uses_old_logprobs
    assert not build_algorithm("grpo").uses_reference_samples
    with pytest.raises(ValueError, match="ref_logprobs"):
        build_algorithm("grpo").loss(LOGPROBS, LOSS_MASK, ADVANTAGES, step_weights("seq_mean", LOSS_MASK), None, None)


def test_grpo_loss_is_finite_with_garbage_in_masked_positions():
    logprobs = LOGPROBS.clone()
    logprobs[~LOSS_MASK] = float("-inf")
    ref = torch.full_like(LOGPROBS, float("-inf"))
    ref[LOSS_MASK] = LOGPROBS[LOSS_MASK]
    logprobs.requires_grad_(True)
    # seq_mean: w = 1/(3 · 2), 1/(3 · 1), 0 for the empty row (S = 3)
    w = step_weights("seq_mean", LOSS_MASK)
    assert close(w, [1 / 6, 1 / 3, 0.0])
    out = build_algorithm("grpo").loss(logprobs, LOSS_MASK, ADVANTAGES, w, None, ref)
    out.loss.backward()
    # KL 0 everywhere; PPO −A: row 0 mean −1, row 1 mean 2, row 2 empty 0 → (−1 + 2 + 0) / 3
    assert out.loss.item() == pytest.approx(1 / 3)
    assert out.stats["kl_sum"] == 0.0
    assert torch.isfinite(logprobs.grad).all()


# ---------------------------------------------------------------------------------------------
# Registry and params


def test_registry_holds_every_algorithm():
    assert set(ALGORITHMS) == {"aapo", "dapo", "dr_grpo", "gpg", "grpo"}
    assert ALGORITHMS["aapo"] is AAPO and ALGORITHMS["gpg"] is GPG and ALGORITHMS["grpo"] is GRPO
    for name, cls in ALGORITHMS.items():
        assert algorithm_params_class(name) is cls.Params
        algo = build_algorithm(name)
        assert isinstance(algo, cls) and algo.params == cls.Params()


def test_unknown_algorithm_name():
    with pytest.raises(AapoError) as err:
        build_algorithm("ppo")
    assert str(err.value) == "algorithm.name: unknown algorithm 'ppo'; choose from aapo, dapo, dr_grpo, gpg, grpo"
    with pytest.raises(AapoError, match="unknown algorithm 'x'"):
        algorithm_params_class("x")


@pytest.mark.parametrize(
    "name,kwargs,message",
    [
        ("aapo", {"delta_low": 0.3}, "algorithm.delta_low must be <= 0 (got 0.3)"),
        ("aapo", {"delta_high": -0.1}, "algorithm.delta_high must be >= 0 (got -0.1)"),
        ("aapo", {"clip": "yes"}, "algorithm.clip must be true or false (got 'yes')"),
        ("aapo", {"eps": -1.0}, "algorithm.eps must be >= 0 (got -1.0)"),
        ("aapo", {"delta_low": float("nan")}, "algorithm.delta_low must be a finite number (got nan)"),
        ("grpo", {"epsilon": 1.5}, "algorithm.epsilon must be in (0, 1) (got 1.5)"),
        ("grpo", {"beta": -0.04}, "algorithm.beta must be >= 0 (got -0.04)"),
        ("gpg", {"f_norm": "max"}, "algorithm.f_norm must be one of std, one (got 'max')"),
    ],
)
def test_invalid_params_name_the_field(name, kwargs, message):
    params = algorithm_params_class(name)(**kwargs)
    with pytest.raises(AapoError) as err:
        build_algorithm(name, params)
    assert str(err.value) == message


@pytest.mark.parametrize("name", ["aapo", "dapo", "dr_grpo", "gpg", "grpo"])
@pytest.mark.parametrize("value", ["sum", "token-mean", None, 1])
def test_loss_aggregation_is_validated_for_every_algorithm(name, value):
    with pytest.raises(AapoError) as err:
        build_algorithm(name, algorithm_params_class(name)(loss_aggregation=value))
    assert str(err.value) == ("algorithm.loss_aggregation must be one of group_token_mean, token_mean, seq_mean, "
                              f"constant, micro_batch_token_mean (got {value!r})")


@pytest.mark.parametrize("name", ["aapo", "dapo", "dr_grpo", "gpg", "grpo"])
def test_every_loss_aggregation_is_accepted_and_drives_the_aggregation(name):
    for mode in AGGREGATION_MODES:
        algo = build_algorithm(name, algorithm_params_class(name)(loss_aggregation=mode))
        # the constant of the constant mode is rollout.max_new_tokens; no other mode has one
        assert algo.aggregation(512) == (mode, 512.0 if mode == "constant" else None)


def test_default_aggregation_of_each_algorithm():
    assert build_algorithm("aapo").aggregation(512) == ("group_token_mean", None)  # AAPO's Definition
    assert build_algorithm("gpg").aggregation(512) == ("group_token_mean", None)
    assert build_algorithm("grpo").aggregation(512) == ("seq_mean", None)
    assert build_algorithm("dr_grpo").aggregation(512) == ("constant", 512.0)
    assert build_algorithm("dapo").aggregation(512) == ("token_mean", None)


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("field_name", ["mini_batches", "num_iterations"])
@pytest.mark.parametrize("value", [0, -1, 1.5, 2.0, True, "2", None])
def test_policy_ratio_params_must_be_integers_of_at_least_one(name, field_name, value):
    assert issubclass(algorithm_params_class(name), PolicyRatioParams)
    with pytest.raises(AapoError) as err:
        build_algorithm(name, algorithm_params_class(name)(**{field_name: value}))
    message = str(err.value)
    assert message == f"algorithm.{field_name} must be an integer >= 1 (got {value!r})"
    assert "\n" not in message


def test_rollout_passes_and_optimizer_steps():
    for name in ("aapo", "gpg"):  # no ratio: one on-policy optimizer step per rollout
        assert not issubclass(algorithm_params_class(name), PolicyRatioParams)
        algo = build_algorithm(name)
        assert algo.rollout_passes == (1, 1) and algo.optimizer_steps_per_rollout == 1
    assert build_algorithm("grpo").rollout_passes == (1, 1)
    assert build_algorithm("dr_grpo").rollout_passes == (1, 1)
    assert build_algorithm("dapo").rollout_passes == (4, 1)  # DAPO's mini-batch updates
    assert build_algorithm("dapo").optimizer_steps_per_rollout == 4
    grpo = build_algorithm("grpo", GRPO.Params(num_iterations=3))
    assert grpo.rollout_passes == (1, 3) and grpo.optimizer_steps_per_rollout == 3
    dr = build_algorithm("dr_grpo", DrGRPO.Params(mini_batches=2, num_iterations=3))
    assert dr.rollout_passes == (2, 3) and dr.optimizer_steps_per_rollout == 6  # 2 mini-batches × μ = 3


def test_params_of_another_algorithm_are_rejected():
    with pytest.raises(TypeError, match="AAPOParams"):
        build_algorithm("aapo", GRPO.Params())


def test_params_defaults_and_help():
    # every algorithm: no entropy bonus, truncated completions trained on, TIS only for an off-trainer sampler
    common = {"entropy_coef": 0.0, "tis": "auto", "tis_cap": 2.0, "tis_mode": "truncate", "mask_truncated": False}
    assert dataclasses.asdict(AAPO.Params()) == {
        "loss_aggregation": "group_token_mean", **common, "delta_low": -0.2, "delta_high": 0.28, "clip": True,
        "eps": 1e-4,
    }
    assert dataclasses.asdict(GRPO.Params()) == {
        "loss_aggregation": "seq_mean", **common, "mini_batches": 1, "num_iterations": 1,
        "epsilon": 0.2, "beta": 0.04, "eps": 1e-4,
    }
    assert dataclasses.asdict(GPG.Params()) == {
        "loss_aggregation": "group_token_mean", **common, "f_norm": "std", "eps": 1e-4, "regenerate": False,
        "keep_groups_by": "accuracy", "min_valid_frac": 0.5, "max_regenerate_tries": 3,
    }
    assert build_algorithm("aapo").tis_level(off_trainer_sampler=True) == "token"
    assert build_algorithm("aapo").tis_level(off_trainer_sampler=False) is None
    assert build_algorithm("grpo", GRPO.Params(tis="sequence")).tis_level(off_trainer_sampler=False) == "sequence"
    assert build_algorithm("grpo", GRPO.Params(tis="off")).tis_level(off_trainer_sampler=True) is None
    for bad, words in (({"tis_cap": 1.0}, "algorithm.tis_cap must be a number > 1"),
                       ({"tis": "tokens"}, "algorithm.tis must be one of"),
                       ({"mask_truncated": "yes"}, "algorithm.mask_truncated")):
        with pytest.raises(AapoError, match=words):
            build_algorithm("aapo", AAPO.Params(**bad))
    for cls in ALGORITHMS.values():
        for f in dataclasses.fields(cls.Params):
            assert f.metadata.get("help"), f"{cls.__name__}.Params.{f.name} has no help"


@pytest.mark.parametrize(
    "name,kwargs",
    [(name, {}) for name in sorted(ALGORITHMS)]
    + [
        ("aapo", {"clip": False}),
        ("gpg", {"f_norm": "one", "regenerate": True}),
        ("grpo", {"beta": 0.0}),
        ("grpo", {"mini_batches": 3, "num_iterations": 2}),
        ("dr_grpo", {"beta": 0.04, "mini_batches": 3}),
        ("dapo", {"dynamic_sampling": False, "loss_aggregation": "micro_batch_token_mean"}),
    ],
)
def test_metrics_define_every_logged_key(name, kwargs):
    # What the trainer logs of an algorithm: its advantage diagnostics, and step_metrics of its
    # loss stats (summed over the update), with reference and old log-probs whenever it uses them.
    algo = build_algorithm(name, algorithm_params_class(name)(**kwargs))
    logged = set(algo.advantages(REWARDS, REF_REWARDS).diagnostics)
    mode, constant = algo.aggregation(3)
    ref = LOGPROBS - 0.3 if algo.uses_reference_logprobs else None
    old = torch.zeros(3, 3) if algo.uses_old_logprobs else None
    logprobs = LOGPROBS.clone().requires_grad_(True)
    stats = algo.loss(logprobs, LOSS_MASK, ADVANTAGES, step_weights(mode, LOSS_MASK, constant=constant), old, ref).stats
    logged |= set(step_metrics(stats, algo.optimizer_steps_per_rollout))
    assert logged <= set(algo.metrics), f"{name}: undefined {logged - set(algo.metrics)}"
    assert all(text for text in algo.metrics.values())
    assert {"loss", "num_tokens"} <= logged
    if algo.uses_old_logprobs:  # GRPO, Dr. GRPO, DAPO
        assert {"pg_loss", "ratio_clip_frac", "ratio_clip_low_frac", "ratio_clip_high_frac"} <= logged
    else:  # AAPO, GPG
        assert "logprob_mean" in logged
    assert ("kl_mean" in logged) == algo.uses_reference_logprobs


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_declared_metrics_are_the_glossarys(name):
    # every key an algorithm declares is logged as algo/<key> and means what metrics.METRICS says
    from aapo_app.metrics import METRICS, glossary_key

    for key, text in ALGORITHMS[name].metrics.items():
        assert glossary_key(f"algo/{key}") == f"algo/{key}", key  # its own entry, no wildcard
        assert text == METRICS[f"algo/{key}"], key


def test_algorithms_do_not_import_deepspeed():
    code = "import sys, aapo_app.algorithms; print('deepspeed' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


# ---------------------------------------------------------------------------------------------
# Dr. GRPO

# Group 0 [1, 0, 0, 0]: mean 0.25, deviations [0.75, −0.25, −0.25, −0.25];
# unbiased var = (0.5625 + 3 · 0.0625) / 3 = 0.75 / 3 = 0.25, std = 0.5.
# Group 1 [0.5, 0.5, 0.5, 0.5]: all equal → advantage exactly 0 in every algorithm.
REWARDS_ONE_RIGHT = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.5, 0.5]])  # [P=2, G=4]


def test_dr_grpo_advantages_are_mean_centred_without_std():
    out = build_algorithm("dr_grpo").advantages(REWARDS_ONE_RIGHT)
    # r − mean, no division by std 0.5: [0.75, −0.25, −0.25, −0.25]; flat group → 0
    assert close(out.advantages, [[0.75, -0.25, -0.25, -0.25], [0.0, 0.0, 0.0, 0.0]])
    assert torch.equal(out.advantages[1], torch.zeros(4))
    assert out.diagnostics == {"zero_std_group_frac": 0.5}
    # REWARDS [1, 0, 0, 1]: mean 0.5 → [0.5, −0.5, −0.5, 0.5] (GRPO would give ±A = ±0.8658754)
    assert close(build_algorithm("dr_grpo").advantages(REWARDS).advantages, [[0.5, -0.5, -0.5, 0.5], [0, 0, 0, 0]])
    # 0.1 is not exact in float32; the flat group is still exactly 0, not a rounding residue
    assert torch.equal(build_algorithm("dr_grpo").advantages(torch.tensor([[0.1, 0.1, 0.1]])).advantages, torch.zeros(1, 3))


ADVANTAGES_DR = torch.tensor([1.5, -0.5, 5.0])  # [n]; row 2 has no counted token


def test_dr_grpo_loss_is_token_sum_over_the_constant_then_batch_mean():
    algo = build_algorithm("dr_grpo")
    mode, constant = algo.aggregation(4)  # rollout.max_new_tokens = 4
    # constant over this micro-batch: w_i = 1/(n · 4) = 1/12 for each of the n = 3 rows
    w = step_weights(mode, LOSS_MASK, constant=constant)
    assert (mode, constant) == ("constant", 4.0) and close(w, [1 / 12] * 3)
    logprobs = LOGPROBS.clone().requires_grad_(True)
    out = algo.loss(logprobs, LOSS_MASK, ADVANTAGES_DR, w, None, None)
    # old = logp.detach() → ρ = 1, per-token loss −A: row 0 [−1.5, −1.5], row 1 [0.5], row 2 none
    # token sums: −3, 0.5, 0; each / 4 (max_new_tokens): −0.75, 0.125, 0
    # mean over the n = 3 rows (the empty one counts): (−0.75 + 0.125 + 0) / 3 = −0.625/3 = −0.2083333
    # = "constant": Σ tokens / (n · 4) = −2.5 / 12
    assert out.loss.item() == pytest.approx(-2.5 / 12)
    assert out.stats["pg_loss"] == pytest.approx(-2.5 / 12) and "kl_sum" not in out.stats
    assert out.stats["num_tokens"] == 3.0 and out.stats["ratio_clip_tokens"] == 0.0
    # GRPO's seq_mean on the same tokens: w = 1/6, 1/3, 0 → (−1.5 + 0.5 + 0) / 3 = −1/3 — longer row 0 weighs less there
    grpo = build_algorithm("grpo", GRPO.Params(beta=0.0))
    grpo_out = grpo.loss(LOGPROBS, LOSS_MASK, ADVANTAGES_DR, step_weights("seq_mean", LOSS_MASK))
    assert grpo_out.loss.item() == pytest.approx(-1 / 3)
    out.loss.backward()
    # ∂L/∂logp_it = −A_i · ρ / (n · 4) on counted tokens: row 0 −1.5/12 = −0.125, row 1 0.5/12 = 0.0416667
    expected = torch.tensor([[-0.125, -0.125, 0.0], [0.5 / 12, 0.0, 0.0], [0.0, 0.0, 0.0]])
    assert close(logprobs.grad, expected)
    # the constant changes the scale only: 8 instead of 4 halves the loss, −2.5 / 24
    mode, constant = algo.aggregation(8)
    w8 = step_weights(mode, LOSS_MASK, constant=constant)
    assert close(w8, [1 / 24] * 3)
    assert algo.loss(LOGPROBS, LOSS_MASK, ADVANTAGES_DR, w8).loss.item() == pytest.approx(-2.5 / 24)


def test_dr_grpo_loss_with_old_logprobs_clipping_and_kl_by_hand():
    # ratios ρ = exp(logp − old) with old = 0: row 0 [1.5, 1.0], row 1 [0.5, 1.1]; column 2 is masked garbage
    logprobs = torch.log(torch.tensor([[1.5, 1.0, 1.0], [0.5, 1.1, 1.0]]))
    logprobs[:, 2] = float("-inf")
    logprobs.requires_grad_(True)
    mask = torch.tensor([[T, T, F], [T, T, F]])
    old = torch.zeros(2, 3)
    adv = torch.tensor([1.0, -1.0])
    ref = logprobs.detach().clone()
    ref[0, 1] = math.log(2.0)  # ref − logp = ln 2 at [0, 1] → k3 = 2 − ln 2 − 1 = 1 − ln 2; else 0
    ref[:, 2] = float("nan")
    k = 1 - math.log(2)  # 0.3068528
    algo = build_algorithm("dr_grpo", DrGRPO.Params(beta=0.1))
    # constant 4 over the 2 rows: w = 1/(2 · 4) = 1/8
    mode, constant = algo.aggregation(4)
    w = step_weights(mode, mask, constant=constant)
    assert close(w, [1 / 8, 1 / 8])
    out = algo.loss(logprobs, mask, adv, w, old, ref)
    # PPO, ε = 0.2:
    #   row 0, A = +1: ρ 1.5 → −min(1.5, 1.2) = −1.2 (clipped); ρ 1.0 → −1.0      sum −2.2
    #   row 1, A = −1: ρ 0.5 → −min(−0.5, −0.8) = 0.8 (clipped); ρ 1.1 → 1.1     sum  1.9
    # pg = (−2.2 + 1.9) / (2 rows · 4) = −0.3 / 8 = −0.0375
    # KL: β · k / (2 · 4) = 0.1 · 0.3068528 / 8 = 0.0038357 → loss −0.0336643
    assert out.stats["pg_loss"] == pytest.approx(-0.0375)
    assert out.loss.item() == pytest.approx(-0.0375 + 0.1 * k / 8)
    assert out.stats["kl_sum"] == pytest.approx(k)  # one non-zero k3; the NaN garbage is not summed
    # 2 of 4 counted tokens clipped: [0, 0] above (A > 0, ρ > 1.2), [1, 0] below (A < 0, ρ < 0.8)
    assert out.stats["ratio_clip_tokens"] == 2.0
    assert out.stats["ratio_clip_high_tokens"] == 1.0 and out.stats["ratio_clip_low_tokens"] == 1.0
    metrics = step_metrics(out.stats, 1)
    assert metrics["kl_mean"] == pytest.approx(k / 4)  # over 4 counted tokens
    assert metrics["ratio_clip_frac"] == 0.5
    out.loss.backward()
    # [0, 1]: PPO −A·ρ = −1, KL β · (1 − e^{ref − logp}) = 0.1 · (1 − 2) = −0.1 → −1.1 / 8 = −0.1375
    # [1, 1]: −A·ρ = 1.1 → 1.1 / 8 = 0.1375; clipped tokens and masked garbage: 0
    assert close(logprobs.grad, [[0.0, -0.1375, 0.0], [0.0, 0.1375, 0.0]])


def test_dr_grpo_constant_comes_from_max_new_tokens_and_its_flags():
    algo = build_algorithm("dr_grpo")
    assert algo.aggregation(4) == ("constant", 4.0)
    lengths, ids = LOSS_MASK.sum(dim=1), torch.zeros(3, dtype=torch.long)
    totals = step_counts(lengths, ids, ids)
    with pytest.raises(ValueError, match="constant must be given"):
        sequence_weights("constant", lengths, ids, ids, totals, None)  # no max_new_tokens
    mode, constant = algo.aggregation(0)  # max_new_tokens 0
    with pytest.raises(ValueError, match="constant must be > 0"):
        sequence_weights(mode, lengths, ids, ids, totals, constant)
    # another mode chosen for Dr. GRPO: no constant
    assert build_algorithm("dr_grpo", DrGRPO.Params(loss_aggregation="seq_mean")).aggregation(4) == ("seq_mean", None)
    assert not algo.uses_reference_logprobs and algo.uses_old_logprobs and not algo.uses_reference_samples  # β = 0
    with_kl = build_algorithm("dr_grpo", DrGRPO.Params(beta=0.04))
    assert with_kl.uses_reference_logprobs
    with pytest.raises(ValueError, match="ref_logprobs"):
        with_kl.loss(LOGPROBS, LOSS_MASK, ADVANTAGES_DR, step_weights("constant", LOSS_MASK, constant=4.0), None, None)


# ---------------------------------------------------------------------------------------------
# DAPO


def test_dapo_advantages_by_hand():
    out = build_algorithm("dapo").advantages(REWARDS_ONE_RIGHT)
    # (r − mean) / (std + 1e-4) with std 0.5: 0.75 / 0.5001 = 1.4997001, −0.25 / 0.5001 = −0.4999000
    expected = [[0.75 / 0.5001, -0.25 / 0.5001, -0.25 / 0.5001, -0.25 / 0.5001], [0.0, 0.0, 0.0, 0.0]]
    assert close(out.advantages, expected)
    assert torch.equal(out.advantages[1], torch.zeros(4))
    # group 1 is flat (the trainer's dynamic sampling drops such groups before the advantages)
    assert out.diagnostics == {"zero_std_group_frac": 0.5}
    off = build_algorithm("dapo", DAPO.Params(dynamic_sampling=False)).advantages(REWARDS_ONE_RIGHT)
    assert torch.equal(off.advantages, out.advantages)
    assert off.diagnostics == {"zero_std_group_frac": 0.5}
    # same advantages as GRPO's on REWARDS: ±A = ±0.8658754
    assert close(build_algorithm("dapo").advantages(REWARDS).advantages, [[A, -A, -A, A], [0, 0, 0, 0]])


def test_dapo_keep_mask():
    rewards = torch.tensor(
        [
            [1.0, 0.0, 0.0, 1.0],  # spread → keep
            [1.0, 1.0, 1.0, 1.0],  # all right → drop
            [0.0, 0.0, 0.0, 0.0],  # all wrong → drop
            [0.1, 0.1, 0.1, 0.2],  # one differs → keep
        ]
    )
    keep = dapo_keep_mask(rewards)
    assert keep.dtype == torch.bool
    assert torch.equal(keep, torch.tensor([T, F, F, T]))
    # flat groups with a shaped reward (e.g. the same overlong penalty) are dropped too
    assert torch.equal(dapo_keep_mask(torch.tensor([[-0.5, -0.5]])), torch.tensor([F]))
    # accuracies (keep_groups_by=accuracy): 0 < #correct < G
    assert torch.equal(dapo_keep_mask(torch.tensor([[1, 0, 1], [1, 1, 1], [0, 0, 0]])), torch.tensor([T, F, F]))
    with pytest.raises(ValueError, match="G >= 2"):
        dapo_keep_mask(torch.ones(3, 1))
    with pytest.raises(ValueError, match="NaN"):
        dapo_keep_mask(torch.tensor([[1.0, float("nan")]]))


def test_dapo_is_a_clipped_pg_algorithm_without_kl():
    from aapo_app.algorithms.clipped_pg import ClippedPGKLAlgorithm

    algo = build_algorithm("dapo")
    assert isinstance(algo, ClippedPGKLAlgorithm)
    assert algo.beta == 0.0 and algo.clip_range() == (0.2, 0.28)
    assert build_algorithm("dapo", DAPO.Params(epsilon_low=0.1, epsilon_high=0.5)).clip_range() == (0.1, 0.5)
    assert "kl_mean" not in DAPO.metrics


def test_dapo_clip_higher_for_positive_and_negative_advantages():
    # old = 0, so ρ = exp(logp): columns ρ = 1.25 (between 1.2 and 1.28), 1.30 (above 1.28), 0.75 (below 0.8)
    logprobs = torch.log(torch.tensor([[1.25, 1.30, 0.75], [1.25, 1.30, 0.75]])).requires_grad_(True)
    mask = torch.ones(2, 3, dtype=torch.bool)
    adv = torch.tensor([1.0, -1.0])
    algo = build_algorithm("dapo")
    # DAPO's token_mean over this micro-batch: w = 1/N = 1/6 for both rows (6 tokens)
    mode, constant = algo.aggregation(16)
    w = step_weights(mode, mask, constant=constant)
    assert close(w, [1 / 6, 1 / 6])
    out = algo.loss(logprobs, mask, adv, w, torch.zeros(2, 3))
    # clip(ρ, 0.8, 1.28):
    #   A = +1: ρ 1.25 → −min(1.25, 1.25) = −1.25 (not clipped; GRPO's 1.2 would clip it)
    #           ρ 1.30 → −min(1.30, 1.28) = −1.28 (clipped high)
    #           ρ 0.75 → −min(0.75, 0.80) = −0.75 (not clipped: A > 0 is only bounded above)
    #   A = −1: ρ 1.25 → −min(−1.25, −1.25) = 1.25 (not clipped)
    #           ρ 1.30 → −min(−1.30, −1.28) = 1.30 (not clipped: A < 0 is only bounded below)
    #           ρ 0.75 → −min(−0.75, −0.80) = 0.80 (clipped low)
    # token mean over 6 tokens: (−1.25 − 1.28 − 0.75 + 1.25 + 1.30 + 0.80) / 6 = 0.07 / 6 = 0.0116667
    assert out.loss.item() == pytest.approx(0.07 / 6, abs=1e-6)
    assert out.stats["pg_loss"] == pytest.approx(0.07 / 6, abs=1e-6)  # no KL: the same
    assert out.stats["ratio_clip_tokens"] == 2.0
    assert out.stats["ratio_clip_high_tokens"] == 1.0
    assert out.stats["ratio_clip_low_tokens"] == 1.0
    assert out.stats["num_tokens"] == 6.0
    assert "kl_sum" not in out.stats
    metrics = step_metrics(out.stats, 1)
    assert metrics["ratio_clip_frac"] == pytest.approx(2 / 6)
    assert metrics["ratio_clip_high_frac"] == pytest.approx(1 / 6)
    assert metrics["ratio_clip_low_frac"] == pytest.approx(1 / 6)
    out.loss.backward()
    # unclipped tokens: ∂(−ρA)/∂logp = −A·ρ, over 6 tokens; clipped ones: 0
    expected = torch.tensor([[-1.25, 0.0, -0.75], [1.25, 1.30, 0.0]]) / 6
    assert close(logprobs.grad, expected)

    # GRPO (ε = 0.2 both sides) on the same tokens clips ρ 1.25 with A = +1: no gradient there
    grpo_logprobs = logprobs.detach().clone().requires_grad_(True)
    grpo = build_algorithm("grpo", GRPO.Params(beta=0.0)).loss(grpo_logprobs, mask, adv, w, torch.zeros(2, 3))
    grpo.loss.backward()
    assert grpo_logprobs.grad[0, 0].item() == 0.0 and logprobs.grad[0, 0].item() != 0.0
    assert grpo.stats["ratio_clip_high_tokens"] == 2.0  # ρ 1.25 and 1.30 with A = +1 are above 1.2


def test_dapo_lower_bound_just_below_0_8():
    # ρ = 0.79 (just below 1 − ε_low = 0.8) and 0.81 (just above), A = −1:
    # 0.79 → −min(−0.79, −0.80) = 0.80 (clipped); 0.81 → −min(−0.81, −0.81) = 0.81 (not)
    logprobs = torch.log(torch.tensor([[0.79, 0.81]])).requires_grad_(True)
    mask = torch.ones(1, 2, dtype=torch.bool)
    w = step_weights("token_mean", mask)  # 1/2 (2 tokens)
    out = build_algorithm("dapo").loss(logprobs, mask, torch.tensor([-1.0]), w, torch.zeros(1, 2))
    assert out.loss.item() == pytest.approx((0.80 + 0.81) / 2, abs=1e-6)
    assert out.stats["ratio_clip_low_tokens"] == 1.0 and out.stats["ratio_clip_high_tokens"] == 0.0
    metrics = step_metrics(out.stats, 1)
    assert metrics["ratio_clip_low_frac"] == 0.5 and metrics["ratio_clip_high_frac"] == 0.0
    out.loss.backward()
    assert close(logprobs.grad, [[0.0, 0.81 / 2]])  # −A·ρ / 2 tokens on the unclipped one


def test_dapo_loss_is_a_token_mean_without_kl():
    logprobs = LOGPROBS.clone()
    logprobs[~LOSS_MASK] = float("-inf")
    logprobs.requires_grad_(True)
    algo = build_algorithm("dapo")
    out = algo.loss(logprobs, LOSS_MASK, ADVANTAGES_DR, TOKEN_MEAN_W, None, torch.full((3, 3), float("nan")))
    # ρ = 1, per-token −A: −1.5, −1.5, 0.5 → (−1.5 − 1.5 + 0.5) / 3 tokens = −2.5/3 = −0.8333333
    # (NaN ref_logprobs never reach the loss: β = 0, no KL term)
    assert out.loss.item() == pytest.approx(-2.5 / 3)
    out.loss.backward()
    # −A / 3 tokens: row 0 −0.5, row 1 0.5/3 = 0.1666667; masked garbage → 0, finite
    assert close(logprobs.grad, [[-0.5, -0.5, 0.0], [0.5 / 3, 0.0, 0.0], [0.0, 0.0, 0.0]])
    assert not algo.uses_reference_logprobs and algo.uses_old_logprobs and not algo.uses_reference_samples


def test_dapo_stats_do_not_read_ref_logprobs():
    out = build_algorithm("dapo").loss(LOGPROBS, LOSS_MASK, ADVANTAGES_DR, TOKEN_MEAN_W, None, LOGPROBS - 0.3)
    assert set(step_metrics(out.stats, 1)) <= set(DAPO.metrics)


# ---------------------------------------------------------------------------------------------
# Dr. GRPO / DAPO registry and params


def test_build_dr_grpo_and_dapo():
    dr = build_algorithm("dr_grpo")
    assert isinstance(dr, DrGRPO) and ALGORITHMS["dr_grpo"] is DrGRPO
    common = {"entropy_coef": 0.0, "tis": "auto", "tis_cap": 2.0, "tis_mode": "truncate", "mask_truncated": False}
    assert dataclasses.asdict(dr.params) == {
        "loss_aggregation": "constant", **common, "mini_batches": 1, "num_iterations": 1, "epsilon": 0.2,
        "beta": 0.0,
    }
    dapo = build_algorithm("dapo")
    assert isinstance(dapo, DAPO) and ALGORITHMS["dapo"] is DAPO
    assert dataclasses.asdict(dapo.params) == {
        "loss_aggregation": "token_mean",
        **common,
        "mini_batches": 4,
        "num_iterations": 1,
        "epsilon_low": 0.2,
        "epsilon_high": 0.28,
        "eps": 1e-4,
        "dynamic_sampling": True,
        "keep_groups_by": "accuracy",
        "max_resample_tries": 3,
    }
    assert build_algorithm("dapo", DAPO.Params(max_resample_tries=0)).params.max_resample_tries == 0
    with pytest.raises(TypeError, match="DrGRPOParams"):
        build_algorithm("dr_grpo", DAPO.Params())


@pytest.mark.parametrize(
    "name,kwargs,message",
    [
        ("dr_grpo", {"epsilon": 0.0}, "algorithm.epsilon must be in (0, 1) (got 0.0)"),
        ("dr_grpo", {"epsilon": "0.2"}, "algorithm.epsilon must be a finite number (got '0.2')"),
        ("dr_grpo", {"beta": -0.1}, "algorithm.beta must be >= 0 (got -0.1)"),
        ("dapo", {"epsilon_low": 1.0}, "algorithm.epsilon_low must be in (0, 1) (got 1.0)"),
        ("dapo", {"epsilon_high": 0.0}, "algorithm.epsilon_high must be > 0 (got 0.0)"),
        ("dapo", {"epsilon_high": float("inf")}, "algorithm.epsilon_high must be a finite number (got inf)"),
        ("dapo", {"eps": -1e-4}, "algorithm.eps must be >= 0 (got -0.0001)"),
        ("dapo", {"dynamic_sampling": "yes"}, "algorithm.dynamic_sampling must be true or false (got 'yes')"),
        ("dapo", {"keep_groups_by": "std"}, "algorithm.keep_groups_by must be one of accuracy, reward (got 'std')"),
        ("dapo", {"max_resample_tries": -1}, "algorithm.max_resample_tries must be an integer >= 0 (got -1)"),
        ("dapo", {"max_resample_tries": 2.5}, "algorithm.max_resample_tries must be an integer >= 0 (got 2.5)"),
        ("dapo", {"max_resample_tries": True}, "algorithm.max_resample_tries must be an integer >= 0 (got True)"),
    ],
)
def test_dr_grpo_and_dapo_invalid_params_name_the_field(name, kwargs, message):
    params = algorithm_params_class(name)(**kwargs)
    with pytest.raises(AapoError) as err:
        build_algorithm(name, params)
    assert str(err.value) == message


LITERAL_FIELDS = [
    (name, f.name, typing.get_args(tp))
    for name in sorted(ALGORITHMS)
    for f in dataclasses.fields(ALGORITHMS[name].Params)
    if typing.get_origin(tp := typing.get_type_hints(ALGORITHMS[name].Params)[f.name]) is typing.Literal
]


def test_string_choices_are_literal_fields():
    assert {(name, field) for name, field, _ in LITERAL_FIELDS} == {
        *((name, field) for name in ALGORITHMS for field in ("loss_aggregation", "tis", "tis_mode")),
        ("gpg", "f_norm"), ("gpg", "keep_groups_by"), ("dapo", "keep_groups_by"),
    }
    for name, field, choices in LITERAL_FIELDS:
        if field == "loss_aggregation":
            assert choices == AGGREGATION_MODES
        for choice in choices:
            build_algorithm(name, algorithm_params_class(name)(**{field: choice}))


@pytest.mark.parametrize("name,field,choices", LITERAL_FIELDS)
def test_literal_fields_are_validated_in_one_line_when_built_and_when_loaded(name, field, choices):
    from aapo_app.config import load_run_config

    message = f"algorithm.{field} must be one of {', '.join(choices)} (got 'nope')"
    with pytest.raises(AapoError) as err:
        build_algorithm(name, algorithm_params_class(name)(**{field: "nope"}))
    assert str(err.value) == message
    with pytest.raises(AapoError) as err:
        load_run_config(None, [f"algorithm.name={name}", f"algorithm.{field}=nope"])
    assert str(err.value) == message


@pytest.mark.parametrize("name,params,message", [
    ("grpo", {"num_iterations": 0}, "algorithm.num_iterations must be an integer >= 1 (got 0)"),
    ("gpg", {"min_valid_frac": 0.0}, "algorithm.min_valid_frac must be in (0, 1] (got 0.0)"),
    ("gpg", {"max_regenerate_tries": -1}, "algorithm.max_regenerate_tries must be an integer >= 0 (got -1)"),
    ("gpg", {"keep_groups_by": None}, "algorithm.keep_groups_by must be one of accuracy, reward (got None)"),
])
def test_iteration_and_regeneration_params_are_validated(name, params, message):
    with pytest.raises(AapoError) as err:
        build_algorithm(name, algorithm_params_class(name)(**params))
    assert str(err.value) == message


def test_resampling_plans():
    assert build_algorithm("aapo").resampling() is None and build_algorithm("grpo").resampling() is None
    assert build_algorithm("dr_grpo").resampling() is None
    # DAPO: refill until every group carries signal (0 < #correct < G by default)
    plan = build_algorithm("dapo").resampling()
    assert plan == Resampling(max_extra_rounds=3, min_kept_fraction=1.0, signal="accuracy")
    assert build_algorithm("dapo", DAPO.Params(keep_groups_by="reward", max_resample_tries=5)).resampling() == \
        Resampling(5, 1.0, "reward")
    assert build_algorithm("dapo", DAPO.Params(dynamic_sampling=False)).resampling() is None
    # GPG: only with regenerate, until min_valid_frac of the groups carry signal
    assert build_algorithm("gpg").resampling() is None
    assert build_algorithm("gpg", GPG.Params(regenerate=True)).resampling() == Resampling(3, 0.5, "accuracy")
    plan = build_algorithm("gpg", GPG.Params(regenerate=True, keep_groups_by="reward", min_valid_frac=0.75,
                                             max_regenerate_tries=1)).resampling()
    assert plan == Resampling(max_extra_rounds=1, min_kept_fraction=0.75, signal="reward")
    assert Resampling(2, 0.5).signal == "accuracy"  # the default signal
