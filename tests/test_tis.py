"""Truncated importance sampling (algorithm.tis): the factors on every token's loss and their
gradient, for a 2-sequence example computed by hand in token and sequence modes; the sampler's
log-probs recorded by aapo's own sampler."""

import math

import pytest
import torch

from aapo_app.algorithms.base import tis_weights
from aapo_app.algorithms.cross_entropy_pg import pg_cross_entropy_loss

# sequence A: 3 counted tokens; sequence B: 2 (its third position is padding)
TRAIN = torch.tensor([[-1.0, -2.0, -0.5], [-0.2, -3.0, -7.0]])
SAMPLER = torch.tensor([[-1.5, -1.0, -0.5], [-1.2, -2.9, 0.0]])
MASK = torch.tensor([[True, True, True], [True, True, False]])
# log ratios log π_train - log π_sampler: A (0.5, -1.0, 0.0), B (1.0, -0.1); A sums to -0.5, B to 0.9
e = math.exp
HAND = {  # (level, mode, cap) -> factors, by the definition
    ("token", "truncate", 2.0): [[e(0.5), e(-1.0), 1.0], [2.0, e(-0.1), 0.0]],  # e^1 = 2.72 > 2: cut to 2
    ("token", "mask", 2.0): [[e(0.5), 0.0, 1.0], [0.0, e(-0.1), 0.0]],  # e^-1 < 1/2 and e^1 > 2: dropped
    ("sequence", "truncate", 2.0): [[e(-0.5)] * 3, [2.0, 2.0, 0.0]],  # B: e^0.9 = 2.46 > 2
    ("sequence", "mask", 2.0): [[e(-0.5)] * 3, [0.0, 0.0, 0.0]],  # B dropped, A (0.61 >= 1/2) kept
    ("token", "truncate", math.inf): [[e(0.5), e(-1.0), 1.0], [e(1.0), e(-0.1), 0.0]],  # plain importance ratio
}
CUT = {("token", "truncate", 2.0): 1, ("token", "mask", 2.0): 2, ("sequence", "truncate", 2.0): 1,
       ("sequence", "mask", 2.0): 1, ("token", "truncate", math.inf): 0}


@pytest.mark.parametrize("key", list(HAND), ids=str)
def test_factors_and_statistics_by_hand(key):
    level, mode, cap = key
    factors, stats = tis_weights(TRAIN, SAMPLER, MASK, level, cap, mode)
    torch.testing.assert_close(factors, torch.tensor(HAND[key]), rtol=1e-6, atol=1e-7)
    units = 5 if level == "token" else 2
    ratios = [e(0.5), e(-1.0), 1.0, e(1.0), e(-0.1)] if level == "token" else [e(-0.5), e(0.9)]
    assert stats["units"] == units and stats["cut"] == CUT[key]
    assert stats["ratio_sum"] == pytest.approx(sum(ratios)) and stats["ratio_max"] == pytest.approx(max(ratios))
    assert stats["ratio_min"] == pytest.approx(min(ratios))
    assert stats["abs_diff_sum"] == pytest.approx(0.5 + 1.0 + 0.0 + 1.0 + 0.1) and stats["tokens"] == 5


@pytest.mark.parametrize("key", list(HAND)[:4], ids=str)
def test_the_corrected_gradient_is_the_importance_weighted_formula(key):
    """The CE policy-gradient loss Σ_i w_i Σ_t f_it (−A_i log π_it): ∂/∂ log π_it = −w_i f_it A_i."""
    level, mode, cap = key
    logp = TRAIN.clone().requires_grad_(True)
    adv = torch.tensor([0.7, -1.3])
    w = torch.tensor([0.25, 0.5])
    factors, _ = tis_weights(logp, SAMPLER, MASK, level, cap, mode)
    pg_cross_entropy_loss(logp, MASK, adv, w[:, None] * factors).loss.backward()
    want = -(w[:, None] * torch.tensor(HAND[key]) * adv[:, None]) * MASK
    torch.testing.assert_close(logp.grad, want.float(), rtol=1e-6, atol=1e-7)


def test_a_sampler_that_is_the_trainer_leaves_the_loss_unchanged():
    logp = TRAIN.clone().requires_grad_(True)
    adv, w = torch.tensor([0.7, -1.3]), torch.tensor([0.25, 0.5])
    for level in ("token", "sequence"):
        factors, stats = tis_weights(logp, TRAIN, MASK, level, 2.0, "mask")
        assert torch.equal(factors, MASK.float()) and stats["cut"] == 0
        corrected = pg_cross_entropy_loss(logp, MASK, adv, w[:, None] * factors).loss
        plain = pg_cross_entropy_loss(logp, MASK, adv, w).loss
        assert float(corrected.detach()) == pytest.approx(float(plain.detach()), rel=1e-7)


def test_aapos_sampler_reports_the_log_prob_of_the_distribution_it_drew_from(tiny_model_dir):
    """decode(logprobs=True): each drawn token's log-prob under softmax(process_logits(logits)), i.e.
    at temperature T with top-k/top-p truncation and renormalisation, recomputed here from the full
    logits of the finished sequences."""
    from transformers import AutoModelForCausalLM

    from aapo_app.engine import position_ids
    from aapo_app.sampler import decode, process_logits

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(30.0)  # peaked distributions: top-p cuts real mass
    prompts = torch.tensor([[0, 0, 11, 12], [21, 22, 23, 24]])
    pmask = torch.tensor([[False, False, True, True], [True, True, True, True]])
    T, top_k, top_p = 0.8, 50, 0.7
    with torch.no_grad():
        tokens, lps = decode(model, prompts, pmask, num_samples=3, max_new_tokens=6, temperature=T, top_k=top_k,
                             top_p=top_p, eos_ids=[2], pad_id=0, generator=torch.Generator().manual_seed(0),
                             logprobs=True)
        seq = torch.cat([prompts.repeat_interleave(3, 0), tokens], dim=1)
        attn = torch.cat([pmask.repeat_interleave(3, 0), torch.ones_like(tokens, dtype=torch.bool)], dim=1)
        logits = model(input_ids=seq, attention_mask=attn.long(), position_ids=position_ids(attn.long())).logits
    checked = 0
    for r in range(tokens.shape[0]):
        for t in range(tokens.shape[1]):
            if t > 0 and int(tokens[r, t - 1]) in (0, 2):
                assert float(lps[r, t]) == 0.0  # after the end
                break
            scores = process_logits(logits[r, 3 + t].float()[None], T, top_k, top_p)[0]
            want = float(torch.log_softmax(scores, dim=-1)[tokens[r, t]])
            assert float(lps[r, t]) == pytest.approx(want, abs=2e-4), (r, t)
            checked += 1
    assert checked >= 12
    raw = torch.log_softmax(logits[:, 3:-1].float() / T, dim=-1).gather(-1, tokens[:, :, None]).squeeze(-1)
    assert float((lps - raw).abs().max()) > 1e-3  # truncation renormalises: not the plain softmax at T
