"""aapo's decoding loop (aapo_app/sampler.py) against transformers' generate and exact distributions."""

import math

import pytest
import torch

from aapo_app.generation import generation_kwargs
from aapo_app.sampler import PreallocatedLayer, decode, draw, process_logits


@pytest.fixture(scope="module")
def tiny(tiny_model_dir, smollm2_tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    tok = smollm2_tokenizer
    tok.padding_side = "left"
    enc = tok(["What is 2 + 3?", "Hi", "Compute 7 times 8, then add one to it."], return_tensors="pt", padding=True)
    return model, tok, enc["input_ids"], enc["attention_mask"].bool()


def _hf_greedy(model, tok, ids, mask, max_new, eos_ids):
    kwargs = generation_kwargs(tok, max_new_tokens=max_new, temperature=None, eos_ids=eos_ids)
    out = model.generate(input_ids=ids, attention_mask=mask.long(), **kwargs)[:, ids.shape[1]:]
    return _cut(out, eos_ids, tok.pad_token_id, max_new)


def _cut(rows, eos_ids, pad, width):
    """Rows padded to ``width`` with ``pad`` after the first EOS (the layout both paths share)."""
    out = torch.full((rows.shape[0], width), pad, dtype=rows.dtype)
    for i, row in enumerate(rows):
        for t, token in enumerate(row.tolist()):
            out[i, t] = token
            if token in eos_ids:
                break
    return out


@pytest.mark.parametrize("compact_below", [0.0, 0.5, 1.0])
def test_greedy_tokens_equal_generate_with_early_eos_and_compaction(tiny, compact_below):
    model, tok, ids, mask = tiny
    free = _hf_greedy(model, tok, ids, mask, 12, eos_ids=[-1])  # no EOS: 12 tokens each
    # make rows end at different steps: the tokens at steps 2 and 6 of rows 0 and 1 become "EOS"
    eos_ids = [int(free[0, 2]), int(free[1, 6])]
    want = _hf_greedy(model, tok, ids, mask, 12, eos_ids=eos_ids)
    lengths = [(row != tok.pad_token_id).sum() for row in want]
    assert len(set(int(x) for x in lengths)) > 1  # the rows really end at different steps
    with torch.no_grad():
        got = decode(model, ids, mask, num_samples=1, max_new_tokens=12, temperature=None, eos_ids=eos_ids,
                     pad_id=tok.pad_token_id, compact_below=compact_below)
    assert torch.equal(_cut(got, eos_ids, tok.pad_token_id, 12), want)


def test_one_prefill_per_prompt_gives_every_sample_the_same_greedy_completion(tiny):
    model, tok, ids, mask = tiny
    want = _hf_greedy(model, tok, ids, mask, 8, eos_ids=[-1])
    with torch.no_grad():
        got = decode(model, ids, mask, num_samples=3, max_new_tokens=8, temperature=None, eos_ids=[-1],
                     pad_id=tok.pad_token_id)
    assert torch.equal(got, want.repeat_interleave(3, dim=0))  # prompt-major: rows 3p..3p+2 are prompt p


def test_small_batch_matmul_changes_no_greedy_token(tiny):
    model, tok, ids, mask = tiny
    with torch.no_grad():
        a = decode(model, ids, mask, num_samples=2, max_new_tokens=10, temperature=None, eos_ids=[-1],
                   pad_id=tok.pad_token_id, small_batch_matmul=True)
        b = decode(model, ids, mask, num_samples=2, max_new_tokens=10, temperature=None, eos_ids=[-1],
                   pad_id=tok.pad_token_id, small_batch_matmul=False)
    assert torch.equal(a, b)
    assert not any("forward" in vars(m) for m in model.modules())  # the patch is undone


def _qwen2_tiny():
    """A 2-layer random Qwen2 (biases on q/k/v, 4 query heads on 2 key/value heads)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(1)
    config = Qwen2Config(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = Qwen2ForCausalLM(config).eval()
    for name, p in model.named_parameters():  # non-zero biases, so that the stacked bias is checked
        if name.endswith("bias"):
            p.data.normal_(0, 0.5)
    return model


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fused_projections_and_one_token_attention_keep_every_step(tiny, arch):
    """Stacked q/k/v and gate/up products and the one-query attention: the same greedy tokens and the
    same sampled tokens (fp32), each drawn token's log-prob within 1e-5 of the plain forward's, with
    left padding of different widths; and both patches undone afterwards."""
    from transformers.modeling_utils import AttentionInterface

    model, tok, ids, mask = tiny
    if arch == "qwen2":
        model = _qwen2_tiny()
        ids = ids.clamp(max=95)
    sdpa = AttentionInterface._global_mapping["sdpa"]
    plain = dict(small_batch_matmul=False, fuse_projections=False, fast_attention=False)
    with torch.no_grad():
        for temperature in (None, 0.9):
            runs = [decode(model, ids, mask, num_samples=2, max_new_tokens=10, temperature=temperature, eos_ids=[-1],
                           pad_id=tok.pad_token_id, generator=torch.Generator().manual_seed(3), logprobs=True, **kw)
                    for kw in (plain, {})]
            assert torch.equal(runs[0][0], runs[1][0])
            torch.testing.assert_close(runs[0][1], runs[1][1], rtol=0, atol=1e-5)
    assert not any("forward" in vars(m) for m in model.modules())
    assert AttentionInterface._global_mapping["sdpa"] is sdpa  # transformers' entry is never swapped
    assert model.config._attn_implementation == "sdpa"  # the model's own switch is put back


def test_one_token_attention_switches_only_its_model(tiny):
    """Inside the context only the given model runs the one-query attention: another model on sdpa
    keeps transformers' function (so a reference model decoding at the same time is unaffected)."""
    from aapo_app.sampler import ONE_TOKEN_ATTENTION, one_token_attention

    model, *_ = tiny
    other = _qwen2_tiny()
    with one_token_attention(model):
        assert model.config._attn_implementation == ONE_TOKEN_ATTENTION
        assert other.config._attn_implementation == "sdpa"
        with one_token_attention(model):  # nested: unchanged, and the outer exit restores
            assert model.config._attn_implementation == ONE_TOKEN_ATTENTION
        assert model.config._attn_implementation == ONE_TOKEN_ATTENTION
    assert model.config._attn_implementation == "sdpa"
    with one_token_attention(model, enabled=False):
        assert model.config._attn_implementation == "sdpa"


def test_one_token_attention_equals_sdpa_with_a_padding_mask():
    """One decoding step's attention against torch's sdpa on the same inputs (GQA repeated by hand)."""
    from types import SimpleNamespace

    from aapo_app import sampler

    g = torch.Generator().manual_seed(0)
    b, heads, kv_heads, length, d = 3, 6, 2, 9, 8
    q = torch.randn(b, heads, 1, d, generator=g)
    k, v = torch.randn(b, kv_heads, length, d, generator=g), torch.randn(b, kv_heads, length, d, generator=g)
    mask = torch.ones(b, 1, 1, length, dtype=torch.bool)
    mask[0, ..., :4] = False  # left padding of row 0
    mask[2, ..., :1] = False
    want = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(3, dim=1), v.repeat_interleave(3, dim=1), attn_mask=mask).transpose(1, 2)
    got, _ = sampler._one_token_attention(SimpleNamespace(num_key_value_groups=3), q, k, v, mask, scaling=d ** -0.5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_suppressed_tokens_are_never_drawn(tiny):
    """``suppress_ids`` (rollout.ignore_eos): the model's greedy choices, banned, never appear."""
    model, tok, ids, mask = tiny
    with torch.no_grad():
        free = decode(model, ids, mask, num_samples=1, max_new_tokens=6, temperature=None, eos_ids=[-1],
                      pad_id=tok.pad_token_id)
        banned = sorted({int(x) for x in free.flatten()})
        got = decode(model, ids, mask, num_samples=4, max_new_tokens=6, temperature=None, eos_ids=[-1],
                     pad_id=tok.pad_token_id, suppress_ids=banned)
    assert not torch.isin(got, torch.tensor(banned)).any()


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 0, 1.0), (1.3, 5, 1.0), (0.7, 0, 0.8), (1.0, 20, 0.5)])
def test_logit_processing_is_generates(temperature, top_k, top_p):
    from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)

    torch.manual_seed(0)
    logits = torch.randn(6, 50) * 3
    logits[0, :4] = logits[0, 4]  # ties at the k-th value
    hf = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
    if top_k:
        hf.append(TopKLogitsWarper(top_k))
    if top_p < 1:
        hf.append(TopPLogitsWarper(top_p))
    assert torch.equal(process_logits(logits, temperature, top_k, top_p), hf(None, logits.clone()))


def test_draw_samples_the_categorical_distribution():
    # p = (0.5, 0.25, 0.15, 0.1, 0): scores are log p; 200,000 draws, each frequency within 5 standard
    # errors sqrt(p(1-p)/n) of p (for p=0.5: 0.0011 -> tolerance 0.0056), and the p=0 token never drawn
    p = torch.tensor([0.5, 0.25, 0.15, 0.1, 0.0])
    n = 200_000
    scores = p.log().expand(n, -1)
    tokens = draw(scores, torch.Generator().manual_seed(1))
    freq = torch.bincount(tokens, minlength=5).double() / n
    for k in range(4):
        assert abs(freq[k] - p[k]) < 5 * math.sqrt(p[k] * (1 - p[k]) / n), (k, freq[k], p[k])
    assert freq[4] == 0


def test_sampling_is_reproducible_by_seed(tiny):
    model, tok, ids, mask = tiny

    def run(seed):
        with torch.no_grad():
            return decode(model, ids, mask, num_samples=4, max_new_tokens=6, temperature=1.0, eos_ids=[-1],
                          pad_id=tok.pad_token_id, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(3), run(3)) and not torch.equal(run(3), run(4))


def test_first_token_frequencies_follow_the_models_distribution(tiny):
    # 4,000 samples of one prompt at T = 0.02 (the random model's logits are nearly flat; a low
    # temperature gives nine tokens above 2 %): the first token's frequencies against
    # softmax(logits / T), every token with p > 2 % within 5 standard errors sqrt(p(1-p)/n) of p
    model, tok, ids, mask = tiny
    n = 4000
    with torch.no_grad():
        logits = model(input_ids=ids[1:2], attention_mask=mask[1:2].long()).logits[0, -1]
        first = decode(model, ids[1:2], mask[1:2], num_samples=n, max_new_tokens=1, temperature=0.02, eos_ids=[-1],
                       pad_id=tok.pad_token_id, generator=torch.Generator().manual_seed(0))[:, 0]
    p = (logits / 0.02).softmax(-1).double()
    freq = torch.bincount(first, minlength=p.numel()).double() / n
    big = (p > 0.02).nonzero().squeeze(-1)
    assert big.numel() > 3
    assert ((freq[big] - p[big]).abs() < 5 * (p[big] * (1 - p[big]) / n).sqrt()).all()


def test_preallocated_layer_grows_by_doubling_and_keeps_its_contents():
    layer = PreallocatedLayer(capacity=3)
    k = torch.arange(2 * 2 * 4, dtype=torch.float32).reshape(1, 2, 2, 4)
    layer.update(k, -k)
    layer.update(k[:, :, :1] + 100, -k[:, :, :1] - 100)  # 3 of 3 positions used
    assert layer.capacity == 3 and layer.get_seq_length() == 3
    keys, values = layer.update(k + 200, -k - 200)  # 5 positions needed -> capacity max(5, 2 * 3) = 6
    assert layer.capacity == 6 and keys.shape == (1, 2, 5, 4)
    assert torch.equal(keys, torch.cat([k, k[:, :, :1] + 100, k + 200], dim=2)) and torch.equal(values, -keys)


def test_top_k_zero_reaches_generate_as_off():
    # None would make generate fill in its global default top_k=50 (a silent top-50 truncation)
    config = generation_kwargs(_Tok(), max_new_tokens=4, temperature=0.7, top_k=0, eos_ids=[2])["generation_config"]
    assert config.top_k == 0 and config.do_sample and config.repetition_penalty == 1.0


class _Tok:
    pad_token_id = 0


def test_prefill_of_many_prompts_never_copies_the_output_layer_per_row(tiny):
    """More than SMALL_BATCH_ROWS prompts take F.linear; the prefill's last position is a 3-D view
    that is not contiguous, and with a frozen bf16 weight torch.matmul would expand the output layer to
    one copy per row (rows x V x H; 5.7 GB for SmolLM2 and 100 prompts). The largest allocation of
    the whole decode must stay within twice the larger of that weight and the rows' fp32 logits
    (here 3.1 and 13.8 MB; the per-row copies would be 220 MB)."""
    from torch.profiler import ProfilerActivity, profile

    from aapo_app.sampler import SMALL_BATCH_ROWS

    import copy

    base, tok, _, _ = tiny
    model = copy.deepcopy(base).to(torch.bfloat16).requires_grad_(False)  # as the gathered bf16 copy we decode with
    prompts = [f"What is {i} + {i % 7}?" for i in range(SMALL_BATCH_ROWS + 6)]
    enc = tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = decode(model, enc["input_ids"], enc["attention_mask"].bool(), num_samples=1, max_new_tokens=2,
                     temperature=None, eos_ids=[-1], pad_id=tok.pad_token_id)
    head = model.get_output_embeddings().weight
    largest = max(e.self_cpu_memory_usage for e in prof.events())
    bound = 2 * max(head.numel() * head.element_size(), len(prompts) * head.shape[0] * 4)
    assert out.shape == (len(prompts), 2)
    assert largest < bound < len(prompts) * head.numel() * head.element_size(), (largest, bound)
