"""Chunked completion log-probs and entropy (engine.completion_logprobs) against the full-logits
formula written out in plain torch: values and gradients (of the hidden layers and of lm_head),
chunk sizes 1, 7 and the whole length, temperature != 1, left-padded prompts and padded
completions."""

import pytest
import torch

from aapo_app.engine import completion_logprobs, position_ids


def _model(tiny_model_dir, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=dtype)
    with torch.no_grad():  # a random model's logits are nearly flat; spread them so entropies differ
        model.get_output_embeddings().weight.mul_(40.0)
    return model


def _batch():
    """3 rows: prompts of 5, 3 and 4 tokens left-padded to 5; completions of 6, 2 and 4 tokens
    right-padded to 6."""
    g = torch.Generator().manual_seed(1)
    P, C = 5, 6
    seq = torch.randint(5, 1000, (3, P + C), generator=g)
    attn = torch.ones(3, P + C, dtype=torch.long)
    attn[1, :2] = 0
    attn[2, :1] = 0
    attn[1, P + 2:] = 0
    attn[2, P + 4:] = 0
    seq = seq.masked_fill(attn == 0, 0)
    return seq, attn, P


def _reference(model, seq, attn, P, T):
    """log softmax(logits / T) at the targets and the entropy, from the full [n, T_c, V] logits."""
    logits = model(input_ids=seq, attention_mask=attn, position_ids=position_ids(attn), use_cache=False).logits
    z = logits[:, P - 1:-1, :].double() / T  # position t predicts token t + 1 (float64: the exact value)
    logp_all = torch.log_softmax(z, dim=-1)
    logp = logp_all.gather(-1, seq[:, P:, None]).squeeze(-1)
    ent = -(logp_all.exp() * logp_all).sum(-1)
    valid = attn[:, P:].bool()
    return logp.masked_fill(~valid, 0.0).float(), ent.masked_fill(~valid, 0.0).float(), valid


@pytest.mark.parametrize("chunk", [1, 7, 10_000])
def test_chunked_logprobs_and_entropy_equal_the_full_logits_formula(tiny_model_dir, chunk):
    model = _model(tiny_model_dir)
    seq, attn, P = _batch()
    T = 0.7
    want_logp, want_ent, valid = _reference(model, seq, attn, P, T)
    # a loss that uses both outputs with different weights per token, so every gradient path is exercised
    w1 = torch.linspace(-1.0, 2.0, valid.numel()).reshape(valid.shape) * valid
    w2 = torch.linspace(0.5, -0.3, valid.numel()).reshape(valid.shape) * valid
    (want_logp * w1 + want_ent * w2).sum().backward()
    want_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    logp, ent = completion_logprobs(model, seq, attn, P, T, entropy=True, chunk=chunk)
    assert logp.shape == ent.shape == valid.shape
    torch.testing.assert_close(logp, want_logp, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ent, want_ent, rtol=1e-5, atol=1e-6)
    assert (logp[~valid] == 0).all() and (ent[~valid] == 0).all()
    assert float(want_ent.detach()[valid].std()) > 0.05  # the entropies differ between tokens: the check is not trivial
    (logp * w1 + ent * w2).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == want_grads.keys() and "lm_head.weight" in grads
    for name, g in grads.items():
        # the reference is float64 from the fp32 logits on; fp32 rounding alone (the unchunked fp32
        # computation) is ~2e-6 of the gradient's norm, and so is this one
        err = float((g - want_grads[name]).norm() / want_grads[name].norm())
        assert err < 1e-5, (name, err)


def test_logprobs_alone_match_and_need_no_entropy(tiny_model_dir):
    model = _model(tiny_model_dir)
    seq, attn, P = _batch()
    want_logp, _, _ = _reference(model, seq, attn, P, 1.3)
    with torch.no_grad():
        logp = completion_logprobs(model, seq, attn, P, 1.3, chunk=4)
    torch.testing.assert_close(logp, want_logp, rtol=1e-5, atol=1e-6)
    assert model.get_output_embeddings().forward.__func__ is type(model.get_output_embeddings()).forward


def test_bf16_weights_give_the_logits_of_the_bf16_head_in_fp32(tiny_model_dir):
    """In bf16 the logits are computed in bf16 and the log-softmax in fp32, as lm_head(h).float()."""
    model = _model(tiny_model_dir, torch.bfloat16)
    seq, attn, P = _batch()
    want_logp, _, _ = _reference(model, seq, attn, P, 1.0)
    with torch.no_grad():
        logp = completion_logprobs(model, seq, attn, P, 1.0, chunk=3)
    assert logp.dtype == torch.float32
    torch.testing.assert_close(logp, want_logp, rtol=1e-5, atol=1e-5)


def test_rows_packed_without_prompt_padding_give_the_same_logprobs_and_gradients(tiny_model_dir):
    """pack_left: each row's prompt and completion from column 0, its completion start per row; the
    log-probs, entropies and gradients are those of the left-padded layout."""
    from aapo_app.engine import pack_left

    model = _model(tiny_model_dir)
    seq, attn, P = _batch()
    packed, packed_mask, starts = pack_left(seq, attn.bool(), P)
    assert packed_mask[:, 0].all() and starts.tolist() == [5, 3, 4]  # every row starts at column 0
    results = []
    for args in ((seq, attn, P), (packed, packed_mask, starts)):
        model.zero_grad()
        logp, ent = completion_logprobs(model, *args, 0.7, entropy=True, chunk=4)
        (logp * torch.arange(1.0, 7.0) + ent).sum().backward()
        results.append((logp.detach(), ent.detach(), model.get_output_embeddings().weight.grad.clone(),
                        model.model.layers[0].self_attn.q_proj.weight.grad.clone()))
    (a_lp, a_ent, a_head, a_q), (b_lp, b_ent, b_head, b_q) = results
    torch.testing.assert_close(b_lp[:, :a_lp.shape[1]], a_lp, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b_ent[:, :a_ent.shape[1]], a_ent, rtol=1e-5, atol=1e-6)
    for got, want in ((b_head, a_head), (b_q, a_q)):
        assert float((got - want).norm() / want.norm()) < 1e-5
