"""Unit tests of aapo_app.algorithms: hand-computed numbers, written next to each assertion."""

import dataclasses
import math
import subprocess
import sys

import pytest
import torch

from aapo_app.algorithms import (
    AAPO,
    ALGORITHMS,
    DAPO,
    GPG,
    GRPO,
    DrGRPO,
    aapo_advantages,
    aggregate_loss,
    algorithm_params_class,
    build_algorithm,
    dapo_keep_mask,
    gpg_advantages,
    group_advantages,
    k3_kl,
    pg_cross_entropy_loss,
    ppo_clip_loss,
)
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
    assert diag["clip_low_frac"] == 0.25  # r − r_ref in {−1, −0.5} < −0.2: 2 of 8
    assert diag["clip_high_frac"] == 0.25  # r − r_ref in {1, 1} > 0.28: 2 of 8
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
    assert diag["clip_low_frac"] == 0.0 and diag["clip_high_frac"] == 0.0  # nothing is clipped
    # momentum mean: (1 − 1 − 0.1 + 0.1 + 0 + 1 − 0.5 + 0.05) / 8 = 0.55 / 8 = 0.06875
    assert diag["momentum_mean"] == pytest.approx(0.06875, abs=1e-6)


def test_aapo_delta_values_are_configurable():
    adv, diag = aapo_advantages(REWARDS, REF_REWARDS, delta_low=-0.5, delta_high=0.5)
    # clip(r − r_ref, −0.5, 0.5): group 0 [0.5, −0.5, −0.1, 0.1]; group 1 [0, 0.5, −0.5, 0.05]
    # (−0.5 sits exactly on δ_low: clamped to itself, not counted as clipped)
    expected = torch.tensor([[A + 0.5, -A - 0.5, -A - 0.1, A + 0.1], [0.0, 0.5, -0.5, 0.05]])
    assert close(adv, expected)
    assert diag["clip_low_frac"] == 0.125  # only −1 < −0.5: 1 of 8
    assert diag["clip_high_frac"] == 0.25  # 1 and 1 > 0.5: 2 of 8

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
# aggregate_loss

PER_TOKEN = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])  # [n=3, L=3]
MASK = torch.tensor([[T, T, F], [T, F, F], [F, F, F]])  # 2, 1 and 0 counted tokens


def test_aggregate_token_mean():
    # (1 + 2 + 4) / 3 tokens = 7/3
    assert aggregate_loss(PER_TOKEN, MASK, "token_mean").item() == pytest.approx(7 / 3)


def test_aggregate_seq_mean_counts_the_empty_row_as_zero():
    # row means: (1 + 2)/2 = 1.5, 4/1 = 4, empty row 0 → (1.5 + 4 + 0) / 3 rows = 5.5/3
    assert aggregate_loss(PER_TOKEN, MASK, "seq_mean").item() == pytest.approx(5.5 / 3)


def test_aggregate_constant():
    # (1 + 2 + 4) / (3 rows · 4) = 7/12
    assert aggregate_loss(PER_TOKEN, MASK, "constant", constant=4).item() == pytest.approx(7 / 12)


def test_aggregate_ignores_garbage_where_masked():
    garbage = PER_TOKEN.clone()
    garbage[~MASK] = float("nan")
    garbage[2, 0] = float("inf")
    assert aggregate_loss(garbage, MASK, "token_mean").item() == pytest.approx(7 / 3)
    assert aggregate_loss(garbage, MASK, "seq_mean").item() == pytest.approx(5.5 / 3)


@pytest.mark.parametrize("mode,constant", [("token_mean", None), ("seq_mean", None), ("constant", 8.0)])
def test_aggregate_zero_tokens_is_zero_with_zero_gradient(mode, constant):
    per_token = PER_TOKEN.clone().requires_grad_(True)
    loss = aggregate_loss(per_token, torch.zeros(3, 3, dtype=torch.bool), mode, constant)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(per_token.grad, torch.zeros(3, 3))
    empty = aggregate_loss(torch.zeros(0, 5), torch.zeros(0, 5, dtype=torch.bool), mode, constant)
    assert empty.item() == 0.0


def test_aggregate_rejects_bad_arguments():
    with pytest.raises(ValueError, match="mode"):
        aggregate_loss(PER_TOKEN, MASK, "sum")
    with pytest.raises(ValueError, match="constant"):
        aggregate_loss(PER_TOKEN, MASK, "constant")
    with pytest.raises(ValueError, match="bool"):
        aggregate_loss(PER_TOKEN, MASK.int(), "token_mean")


def test_aggregate_two_micro_batches_vs_one_batch():
    # What DeepSpeed does with 2 micro-batches (gradient accumulation or 2 data-parallel ranks):
    # the mean of the two micro-batch losses.
    per_token = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]])  # [4, 2]
    mask = torch.tensor([[T, T], [T, F], [T, F], [F, F]])  # micro-batches: rows 0-1 (3 tokens), 2-3 (1 token)

    def split_mean(mode, constant=None):
        halves = [aggregate_loss(per_token[s], mask[s], mode, constant) for s in (slice(0, 2), slice(2, 4))]
        return (sum(halves) / 2).item()

    # seq_mean: row means 1.5, 3, 5, 0 → whole batch 9.5/4 = 2.375;
    # halves (1.5 + 3)/2 = 2.25 and (5 + 0)/2 = 2.5 → mean 2.375: equal (same rows per micro-batch)
    assert split_mean("seq_mean") == pytest.approx(aggregate_loss(per_token, mask, "seq_mean").item()) == pytest.approx(2.375)
    # constant 2: whole (1 + 2 + 3 + 5) / (4 · 2) = 11/8; halves 6/4 and 5/4 → mean 11/8: equal
    assert split_mean("constant", 2.0) == pytest.approx(aggregate_loss(per_token, mask, "constant", 2.0).item()) == pytest.approx(11 / 8)
    # token_mean: whole 11/4 = 2.75 tokens-weighted; halves 6/3 = 2 and 5/1 = 5 → mean 3.5 ≠ 2.75
    # (token counts differ: 3 vs 1)
    assert aggregate_loss(per_token, mask, "token_mean").item() == pytest.approx(2.75)
    assert split_mean("token_mean") == pytest.approx(3.5)
    # With equal token counts per micro-batch (2 and 2) the token mean is the global one:
    mask_eq = torch.tensor([[T, T], [F, F], [T, F], [T, F]])
    # whole (1 + 2 + 5 + 7) / 4 = 3.75; halves 3/2 = 1.5 and 12/2 = 6 → mean 3.75
    halves = [aggregate_loss(per_token[s], mask_eq[s], "token_mean") for s in (slice(0, 2), slice(2, 4))]
    assert (sum(halves) / 2).item() == pytest.approx(aggregate_loss(per_token, mask_eq, "token_mean").item()) == pytest.approx(3.75)


# ---------------------------------------------------------------------------------------------
# AAPO / GPG loss

LOGPROBS = torch.tensor([[-0.5, -1.0, -9.0], [-2.0, -7.0, -7.0], [-3.0, -3.0, -3.0]])  # [n=3, L=3]
LOSS_MASK = torch.tensor([[T, T, F], [T, F, F], [F, F, F]])  # 3 counted tokens; row 2 is empty
ADVANTAGES = torch.tensor([1.0, -2.0, 5.0])  # [n]


def test_aapo_loss_value_by_hand():
    out = build_algorithm("aapo").loss(LOGPROBS, LOSS_MASK, ADVANTAGES, None, None, 16)
    # −logp · A on counted tokens: −(−0.5)(1) = 0.5, −(−1)(1) = 1, −(−2)(−2) = −4
    # (0.5 + 1 − 4) / 3 tokens = −2.5/3 = −0.8333333
    assert out.loss.item() == pytest.approx(-2.5 / 3)
    assert out.stats["loss"] == pytest.approx(-2.5 / 3)
    assert out.stats["num_tokens"] == 3.0
    # mean logp over counted tokens: (−0.5 − 1 − 2) / 3 = −3.5/3
    assert out.stats["logprob_mean"] == pytest.approx(-3.5 / 3)


def test_aapo_loss_gradient_is_minus_advantage_over_token_count():
    logprobs = LOGPROBS.clone().requires_grad_(True)
    build_algorithm("aapo").loss(logprobs, LOSS_MASK, ADVANTAGES).loss.backward()
    # ∂L/∂logp_it = −A_i / N on counted tokens (N = 3), 0 elsewhere:
    # row 0: −1/3; row 1: −(−2)/3 = 2/3; row 2 (no counted token): 0
    expected = torch.tensor([[-1 / 3, -1 / 3, 0.0], [2 / 3, 0.0, 0.0], [0.0, 0.0, 0.0]])
    assert close(logprobs.grad, expected)


def test_ce_loss_is_finite_with_garbage_in_masked_positions():
    logprobs = LOGPROBS.clone()
    logprobs[~LOSS_MASK] = float("-inf")
    logprobs.requires_grad_(True)
    out = pg_cross_entropy_loss(logprobs, LOSS_MASK, ADVANTAGES)
    out.loss.backward()
    assert out.loss.item() == pytest.approx(-2.5 / 3)
    assert torch.isfinite(logprobs.grad).all()


def test_ce_loss_of_an_all_masked_micro_batch_is_zero():
    logprobs = LOGPROBS.clone().requires_grad_(True)
    out = pg_cross_entropy_loss(logprobs, torch.zeros(3, 3, dtype=torch.bool), ADVANTAGES)
    out.loss.backward()
    assert out.loss.item() == 0.0 and out.stats["num_tokens"] == 0.0 and out.stats["logprob_mean"] == 0.0
    assert torch.equal(logprobs.grad, torch.zeros(3, 3))


def test_gpg_loss_is_the_same_ce_loss():
    out = build_algorithm("gpg").loss(LOGPROBS, LOSS_MASK, ADVANTAGES)
    assert out.loss.item() == pytest.approx(-2.5 / 3)


def test_loss_inputs_are_checked():
    with pytest.raises(ValueError, match="bool"):
        pg_cross_entropy_loss(LOGPROBS, LOSS_MASK.float(), ADVANTAGES)
    with pytest.raises(ValueError, match="advantages"):
        pg_cross_entropy_loss(LOGPROBS, LOSS_MASK, ADVANTAGES[:2])


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
    out = build_algorithm("grpo").loss(logprobs, mask, adv, None, ref, 2)
    k = 1 - math.log(2)  # 0.3068528
    # old = logp.detach() → ρ = 1, PPO term = −A: row 0 [−1, −1], row 1 [1]
    # row 0 mean ((−1 + 0.04k) + (−1)) / 2 = −0.9938629; row 1 mean 1 → (−0.9938629 + 1) / 2 = 0.04k/4
    assert out.loss.item() == pytest.approx(0.04 * k / 4, abs=1e-7)  # 0.0030685 (float32)
    assert out.stats["pg_loss"] == pytest.approx(0.0)  # (−1 + 1) / 2
    assert out.stats["kl_mean"] == pytest.approx(k / 3)  # one non-zero of 3 counted tokens
    assert out.stats["clip_frac"] == 0.0
    assert out.stats["num_tokens"] == 3.0
    out.loss.backward()
    # ∂/∂logp[0,0]: PPO −A·ρ = −1, KL β·(1 − e^{ref−logp}) = 0.04 · (1 − 2) = −0.04 → −1.04 / 2 tokens / 2 rows = −0.26
    # ∂/∂logp[0,1]: −1 / 2 / 2 = −0.25; ∂/∂logp[1,0]: −(−1) / 1 / 2 = 0.5; masked: 0
    assert close(logprobs.grad, [[-0.26, -0.25], [0.5, 0.0]])


def test_grpo_loss_with_old_logprobs_clips():
    logprobs = torch.log(torch.tensor([[1.5]])).requires_grad_(True)
    out = build_algorithm("grpo", GRPO.Params(beta=0.0)).loss(
        logprobs, torch.tensor([[T]]), torch.tensor([1.0]), torch.zeros(1, 1), None, 1
    )
    # ρ = 1.5 > 1.2 with A = +1 → loss −1.2, clipped, no KL stat without ref log-probs
    assert out.loss.item() == pytest.approx(-1.2)
    assert out.stats["clip_frac"] == 1.0 and "kl_mean" not in out.stats


def test_grpo_reference_logprob_needs():
    assert build_algorithm("grpo").uses_reference_logprobs  # β = 0.04
    assert not build_algorithm("grpo", GRPO.Params(beta=0.0)).uses_reference_logprobs
    assert build_algorithm("grpo").uses_old_logprobs
    assert not build_algorithm("grpo").uses_reference_samples
    with pytest.raises(ValueError, match="ref_logprobs"):
        build_algorithm("grpo").loss(LOGPROBS, LOSS_MASK, ADVANTAGES, None, None, 3)


def test_grpo_loss_is_finite_with_garbage_in_masked_positions():
    logprobs = LOGPROBS.clone()
    logprobs[~LOSS_MASK] = float("-inf")
    ref = torch.full_like(LOGPROBS, float("-inf"))
    ref[LOSS_MASK] = LOGPROBS[LOSS_MASK]
    logprobs.requires_grad_(True)
    out = build_algorithm("grpo").loss(logprobs, LOSS_MASK, ADVANTAGES, None, ref, 3)
    out.loss.backward()
    # KL 0 everywhere; PPO −A: row 0 mean −1, row 1 mean 2, row 2 empty 0 → (−1 + 2 + 0) / 3
    assert out.loss.item() == pytest.approx(1 / 3)
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
        ("gpg", {"f_norm": "max"}, "algorithm.f_norm must be 'std' or 'one' (got 'max')"),
    ],
)
def test_invalid_params_name_the_field(name, kwargs, message):
    params = algorithm_params_class(name)(**kwargs)
    with pytest.raises(AapoError) as err:
        build_algorithm(name, params)
    assert str(err.value) == message


def test_params_of_another_algorithm_are_rejected():
    with pytest.raises(TypeError, match="AAPOParams"):
        build_algorithm("aapo", GRPO.Params())


def test_params_defaults_and_help():
    assert dataclasses.asdict(AAPO.Params()) == {"delta_low": -0.2, "delta_high": 0.28, "clip": True, "eps": 1e-4}
    assert dataclasses.asdict(GRPO.Params()) == {"epsilon": 0.2, "beta": 0.04, "eps": 1e-4, "num_iterations": 1}
    assert dataclasses.asdict(GPG.Params()) == {
        "f_norm": "std", "eps": 1e-4, "regenerate": False, "min_valid_frac": 0.5, "max_regenerate_tries": 3,
    }
    for cls in ALGORITHMS.values():
        for f in dataclasses.fields(cls.Params):
            assert f.metadata.get("help"), f"{cls.__name__}.Params.{f.name} has no help"


def test_every_logged_key_is_defined_in_metrics():
    logprobs = LOGPROBS.clone().requires_grad_(True)
    for name, cls in ALGORITHMS.items():
        algo = build_algorithm(name)
        keys = set(algo.advantages(REWARDS, REF_REWARDS).diagnostics)
        keys |= set(algo.loss(logprobs, LOSS_MASK, ADVANTAGES, None, LOGPROBS.detach(), 3).stats)
        assert keys <= set(cls.metrics), f"{name}: undefined {keys - set(cls.metrics)}"


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
    logprobs = LOGPROBS.clone().requires_grad_(True)
    out = build_algorithm("dr_grpo").loss(logprobs, LOSS_MASK, ADVANTAGES_DR, None, None, 4)
    # old = logp.detach() → ρ = 1, per-token loss −A: row 0 [−1.5, −1.5], row 1 [0.5], row 2 none
    # token sums: −3, 0.5, 0; each / 4 (max_completion_length): −0.75, 0.125, 0
    # mean over the n = 3 rows (the empty one counts): (−0.75 + 0.125 + 0) / 3 = −0.625/3 = −0.2083333
    # = aggregate_loss "constant": Σ tokens / (n · 4) = −2.5 / 12
    assert out.loss.item() == pytest.approx(-2.5 / 12)
    assert out.stats["pg_loss"] == pytest.approx(-2.5 / 12) and "kl_mean" not in out.stats
    assert out.stats["num_tokens"] == 3.0 and out.stats["clip_frac"] == 0.0
    # GRPO's seq_mean on the same tokens: (−1.5 + 0.5 + 0) / 3 = −1/3 — longer row 0 weighs less there
    grpo = build_algorithm("grpo", GRPO.Params(beta=0.0)).loss(LOGPROBS, LOSS_MASK, ADVANTAGES_DR)
    assert grpo.loss.item() == pytest.approx(-1 / 3)
    out.loss.backward()
    # ∂L/∂logp_it = −A_i · ρ / (n · 4) on counted tokens: row 0 −1.5/12 = −0.125, row 1 0.5/12 = 0.0416667
    expected = torch.tensor([[-0.125, -0.125, 0.0], [0.5 / 12, 0.0, 0.0], [0.0, 0.0, 0.0]])
    assert close(logprobs.grad, expected)
    # the constant changes the scale only: 8 instead of 4 halves the loss, −2.5 / 24
    assert build_algorithm("dr_grpo").loss(LOGPROBS, LOSS_MASK, ADVANTAGES_DR, None, None, 8).loss.item() == pytest.approx(-2.5 / 24)


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
    out = algo.loss(logprobs, mask, adv, old, ref, 4)
    # PPO, ε = 0.2:
    #   row 0, A = +1: ρ 1.5 → −min(1.5, 1.2) = −1.2 (clipped); ρ 1.0 → −1.0      sum −2.2
    #   row 1, A = −1: ρ 0.5 → −min(−0.5, −0.8) = 0.8 (clipped); ρ 1.1 → 1.1     sum  1.9
    # pg = (−2.2 + 1.9) / (2 rows · 4) = −0.3 / 8 = −0.0375
    # KL: β · k / (2 · 4) = 0.1 · 0.3068528 / 8 = 0.0038357 → loss −0.0336643
    assert out.stats["pg_loss"] == pytest.approx(-0.0375)
    assert out.loss.item() == pytest.approx(-0.0375 + 0.1 * k / 8)
    assert out.stats["kl_mean"] == pytest.approx(k / 4)  # one non-zero k3 over 4 counted tokens
    assert out.stats["clip_frac"] == 0.5  # 2 of 4 counted tokens
    out.loss.backward()
    # [0, 1]: PPO −A·ρ = −1, KL β · (1 − e^{ref − logp}) = 0.1 · (1 − 2) = −0.1 → −1.1 / 8 = −0.1375
    # [1, 1]: −A·ρ = 1.1 → 1.1 / 8 = 0.1375; clipped tokens and masked garbage: 0
    assert close(logprobs.grad, [[0.0, -0.1375, 0.0], [0.0, 0.1375, 0.0]])


def test_dr_grpo_needs_max_completion_length_and_its_flags():
    algo = build_algorithm("dr_grpo")
    with pytest.raises(ValueError, match="max_completion_length"):
        algo.loss(LOGPROBS, LOSS_MASK, ADVANTAGES_DR)
    with pytest.raises(ValueError, match="more than max_completion_length = 1"):
        algo.loss(LOGPROBS, LOSS_MASK, ADVANTAGES_DR, None, None, 1)  # row 0 has 2 counted tokens
    with pytest.raises(ValueError, match="positive int"):
        algo.loss(LOGPROBS, LOSS_MASK, ADVANTAGES_DR, None, None, 0)
    assert not algo.uses_reference_logprobs and algo.uses_old_logprobs and not algo.uses_reference_samples  # β = 0
    with_kl = build_algorithm("dr_grpo", DrGRPO.Params(beta=0.04))
    assert with_kl.uses_reference_logprobs
    with pytest.raises(ValueError, match="ref_logprobs"):
        with_kl.loss(LOGPROBS, LOSS_MASK, ADVANTAGES_DR, None, None, 4)


# ---------------------------------------------------------------------------------------------
# DAPO


def test_dapo_advantages_by_hand():
    out = build_algorithm("dapo").advantages(REWARDS_ONE_RIGHT)
    # (r − mean) / (std + 1e-4) with std 0.5: 0.75 / 0.5001 = 1.4997001, −0.25 / 0.5001 = −0.4999000
    expected = [[0.75 / 0.5001, -0.25 / 0.5001, -0.25 / 0.5001, -0.25 / 0.5001], [0.0, 0.0, 0.0, 0.0]]
    assert close(out.advantages, expected)
    assert torch.equal(out.advantages[1], torch.zeros(4))
    # group 1 is flat: dynamic sampling drops it and keeps 1 of 2
    assert out.diagnostics == {"zero_std_group_frac": 0.5, "kept_group_frac": 0.5}
    off = build_algorithm("dapo", DAPO.Params(dynamic_sampling=False)).advantages(REWARDS_ONE_RIGHT)
    assert torch.equal(off.advantages, out.advantages)
    assert off.diagnostics == {"zero_std_group_frac": 0.5, "kept_group_frac": 1.0}  # nothing dropped
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
    with pytest.raises(ValueError, match="G >= 2"):
        dapo_keep_mask(torch.ones(3, 1))
    with pytest.raises(ValueError, match="NaN"):
        dapo_keep_mask(torch.tensor([[1.0, float("nan")]]))


def test_dapo_clip_higher_for_positive_and_negative_advantages():
    # old = 0, so ρ = exp(logp): columns ρ = 1.25 (between 1.2 and 1.28), 1.30 (above 1.28), 0.75 (below 0.8)
    logprobs = torch.log(torch.tensor([[1.25, 1.30, 0.75], [1.25, 1.30, 0.75]])).requires_grad_(True)
    mask = torch.ones(2, 3, dtype=torch.bool)
    adv = torch.tensor([1.0, -1.0])
    out = build_algorithm("dapo").loss(logprobs, mask, adv, torch.zeros(2, 3))
    # clip(ρ, 0.8, 1.28):
    #   A = +1: ρ 1.25 → −min(1.25, 1.25) = −1.25 (not clipped; GRPO's 1.2 would clip it)
    #           ρ 1.30 → −min(1.30, 1.28) = −1.28 (clipped high)
    #           ρ 0.75 → −min(0.75, 0.80) = −0.75 (not clipped: A > 0 is only bounded above)
    #   A = −1: ρ 1.25 → −min(−1.25, −1.25) = 1.25 (not clipped)
    #           ρ 1.30 → −min(−1.30, −1.28) = 1.30 (not clipped: A < 0 is only bounded below)
    #           ρ 0.75 → −min(−0.75, −0.80) = 0.80 (clipped low)
    # token mean over 6 tokens: (−1.25 − 1.28 − 0.75 + 1.25 + 1.30 + 0.80) / 6 = 0.07 / 6 = 0.0116667
    assert out.loss.item() == pytest.approx(0.07 / 6, abs=1e-6)
    assert out.stats["clip_frac"] == pytest.approx(2 / 6)
    assert out.stats["clip_high_frac"] == pytest.approx(1 / 6)
    assert out.stats["clip_low_frac"] == pytest.approx(1 / 6)
    assert out.stats["num_tokens"] == 6.0
    out.loss.backward()
    # unclipped tokens: ∂(−ρA)/∂logp = −A·ρ, over 6 tokens; clipped ones: 0
    expected = torch.tensor([[-1.25, 0.0, -0.75], [1.25, 1.30, 0.0]]) / 6
    assert close(logprobs.grad, expected)

    # GRPO (ε = 0.2 both sides) on the same tokens clips ρ 1.25 with A = +1: no gradient there
    grpo_logprobs = logprobs.detach().clone().requires_grad_(True)
    build_algorithm("grpo", GRPO.Params(beta=0.0)).loss(grpo_logprobs, mask, adv, torch.zeros(2, 3)).loss.backward()
    assert grpo_logprobs.grad[0, 0].item() == 0.0 and logprobs.grad[0, 0].item() != 0.0


def test_dapo_lower_bound_just_below_0_8():
    # ρ = 0.79 (just below 1 − ε_low = 0.8) and 0.81 (just above), A = −1:
    # 0.79 → −min(−0.79, −0.80) = 0.80 (clipped); 0.81 → −min(−0.81, −0.81) = 0.81 (not)
    logprobs = torch.log(torch.tensor([[0.79, 0.81]])).requires_grad_(True)
    out = build_algorithm("dapo").loss(logprobs, torch.ones(1, 2, dtype=torch.bool), torch.tensor([-1.0]), torch.zeros(1, 2))
    assert out.loss.item() == pytest.approx((0.80 + 0.81) / 2, abs=1e-6)
    assert out.stats["clip_low_frac"] == 0.5 and out.stats["clip_high_frac"] == 0.0
    out.loss.backward()
    assert close(logprobs.grad, [[0.0, 0.81 / 2]])  # −A·ρ / 2 tokens on the unclipped one


def test_dapo_loss_is_a_token_mean_without_kl():
    logprobs = LOGPROBS.clone()
    logprobs[~LOSS_MASK] = float("-inf")
    logprobs.requires_grad_(True)
    algo = build_algorithm("dapo")
    out = algo.loss(logprobs, LOSS_MASK, ADVANTAGES_DR, None, torch.full((3, 3), float("nan")), 4)
    # ρ = 1, per-token −A: −1.5, −1.5, 0.5 → (−1.5 − 1.5 + 0.5) / 3 tokens = −2.5/3 = −0.8333333
    # (ref_logprobs are never read: no KL term)
    assert out.loss.item() == pytest.approx(-2.5 / 3)
    out.loss.backward()
    # −A / 3 tokens: row 0 −0.5, row 1 0.5/3 = 0.1666667; masked garbage → 0, finite
    assert close(logprobs.grad, [[-0.5, -0.5, 0.0], [0.5 / 3, 0.0, 0.0], [0.0, 0.0, 0.0]])
    assert not algo.uses_reference_logprobs and algo.uses_old_logprobs and not algo.uses_reference_samples


# ---------------------------------------------------------------------------------------------
# Dr. GRPO / DAPO registry and params


def test_build_dr_grpo_and_dapo():
    dr = build_algorithm("dr_grpo")
    assert isinstance(dr, DrGRPO) and ALGORITHMS["dr_grpo"] is DrGRPO
    assert dataclasses.asdict(dr.params) == {"epsilon": 0.2, "beta": 0.0}
    dapo = build_algorithm("dapo")
    assert isinstance(dapo, DAPO) and ALGORITHMS["dapo"] is DAPO
    assert dataclasses.asdict(dapo.params) == {
        "epsilon_low": 0.2,
        "epsilon_high": 0.28,
        "eps": 1e-4,
        "dynamic_sampling": True,
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
        ("dapo", {"max_resample_tries": -1}, "algorithm.max_resample_tries must be >= 0 (got -1)"),
        ("dapo", {"max_resample_tries": 2.5}, "algorithm.max_resample_tries must be an integer (got 2.5)"),
        ("dapo", {"max_resample_tries": True}, "algorithm.max_resample_tries must be an integer (got True)"),
    ],
)
def test_dr_grpo_and_dapo_invalid_params_name_the_field(name, kwargs, message):
    params = algorithm_params_class(name)(**kwargs)
    with pytest.raises(AapoError) as err:
        build_algorithm(name, params)
    assert str(err.value) == message


@pytest.mark.parametrize("name,params,message", [
    ("grpo", {"num_iterations": 0}, "algorithm.num_iterations must be an integer >= 1 (got 0)"),
    ("gpg", {"min_valid_frac": 0.0}, "algorithm.min_valid_frac must be in (0, 1] (got 0.0)"),
    ("gpg", {"max_regenerate_tries": -1}, "algorithm.max_regenerate_tries must be an integer >= 0 (got -1)"),
])
def test_iteration_and_regeneration_params_are_validated(name, params, message):
    with pytest.raises(AapoError) as err:
        build_algorithm(name, algorithm_params_class(name)(**params))
    assert str(err.value) == message


def test_resampling_plans():
    assert build_algorithm("aapo").resampling() is None and build_algorithm("grpo").resampling() is None
    assert build_algorithm("dapo").resampling() == (3, 1.0)  # refill until every group has spread
    assert build_algorithm("dapo", DAPO.Params(dynamic_sampling=False)).resampling() is None
    assert build_algorithm("gpg").resampling() is None
    assert build_algorithm("gpg", GPG.Params(regenerate=True)).resampling() == (3, 0.5)
    assert build_algorithm("grpo", GRPO.Params(num_iterations=3)).updates_per_rollout == 3
    assert build_algorithm("aapo").updates_per_rollout == 1
