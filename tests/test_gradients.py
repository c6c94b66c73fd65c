"""Each loss's autograd gradient on a tiny model equals the analytic policy-gradient expression.

The step is one micro-batch holding one prompt group of n = 3 sequences, and each loss gets the
weights of its algorithm's default ``loss_aggregation`` for that step (``sequence_weights``). The
analytic side is built from the per-token score functions g_it = ∇_θ log π_θ(o_it | q, o_<it)
(each obtained on its own), weighted as the papers write the gradient at ratio 1 (one optimizer step
per rollout, π_old = π_θ):

- AAPO, GPG (group token mean; with one group the token mean), DAPO (token mean):
                                  ∇L = −(1/N) Σ_i Σ_t A_i g_it,      N = Σ_i |o_i|
- GRPO (sequence mean, + β k3):   ∇L = (1/n) Σ_i (1/|o_i|) Σ_t [−A_i + β (1 − e^{ref_it − logp_it})] g_it
- Dr. GRPO (constant L_max):      ∇L = −(1/(n L_max)) Σ_i Σ_t A_i g_it
(the k3 term's derivative: d/dx [e^{r−x} − (r − x) − 1] = 1 − e^{r−x}.)
"""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from aapo_app.algorithms import build_algorithm, sequence_weights, step_counts
from aapo_app.engine import completion_logprobs

PROMPT, COMPLETION, T = 2, 4, 0.7
LENGTHS = [4, 2, 3]  # counted completion tokens per sequence; N = 9
ADV = torch.tensor([1.5, -0.5, 0.25], dtype=torch.float64)
L_MAX = 4


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    model = LlamaForCausalLM(config).double()
    seq = torch.randint(0, 40, (3, PROMPT + COMPLETION))
    cmask = torch.arange(COMPLETION).unsqueeze(0) < torch.tensor(LENGTHS).unsqueeze(1)  # [3, 4]
    attn = torch.cat([torch.ones(3, PROMPT, dtype=torch.bool), cmask], 1)
    ref = (completion_logprobs(model, seq, attn, PROMPT, T).detach() - 0.3).masked_fill(~cmask, 0.0)
    return model, seq, attn, cmask, ref


def grads(model, loss):
    model.zero_grad()
    loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def score_functions(model, seq, attn, cmask):
    """g_it for every counted token: {(i, t): flat gradient of log π(o_it)}."""
    out = {}
    for i in range(seq.shape[0]):
        for t in range(COMPLETION):
            if cmask[i, t]:
                logp = completion_logprobs(model, seq, attn, PROMPT, T)
                out[(i, t)] = grads(model, logp[i, t])
    return out


def step_weights(mode, constant):
    """The weights of ``mode`` for the step: one micro-batch with one prompt group of the 3 sequences."""
    lengths = torch.tensor(LENGTHS)
    ids = torch.zeros(len(LENGTHS), dtype=torch.long)  # one group, one micro-batch
    return sequence_weights(mode, lengths, ids, ids, step_counts(lengths, ids, ids), constant)


# w_i of each algorithm's default mode for this step: N = 9 tokens, n = 3 sequences, L_max = 4
EXPECTED_WEIGHTS = {
    "aapo": [1 / 9] * 3,  # group_token_mean: 1/(K · N_g) = 1/(1 · 9)
    "gpg": [1 / 9] * 3,  # the same
    "dapo": [1 / 9] * 3,  # token_mean: 1/N
    "grpo": [1 / (3 * 4), 1 / (3 * 2), 1 / (3 * 3)],  # seq_mean: 1/(n · |o_i|)
    "dr_grpo": [1 / (3 * L_MAX)] * 3,  # constant: 1/(n · L_max)
}


@pytest.mark.parametrize("name", ["aapo", "gpg", "dapo", "grpo", "dr_grpo"])
def test_default_weights_of_the_one_group_step(name):
    mode, constant = build_algorithm(name).aggregation(L_MAX)
    weights = step_weights(mode, constant)
    torch.testing.assert_close(weights, torch.tensor(EXPECTED_WEIGHTS[name], dtype=torch.float64))
    if mode == "group_token_mean":  # one group: the group's token mean is the step's token mean
        torch.testing.assert_close(weights, step_weights("token_mean", None))


@pytest.mark.parametrize("name", ["aapo", "gpg", "dapo", "grpo", "dr_grpo"])
def test_autograd_equals_analytic_policy_gradient(setup, name):
    model, seq, attn, cmask, ref = setup
    algo = build_algorithm(name)
    use_ref = algo.uses_reference_logprobs  # GRPO's default β = 0.04
    weights = step_weights(*algo.aggregation(L_MAX))
    logp = completion_logprobs(model, seq, attn, PROMPT, T)
    out = algo.loss(logp, cmask, ADV, weights, None, ref if use_ref else None)
    autograd = grads(model, out.loss)

    g = score_functions(model, seq, attn, cmask)
    logp = completion_logprobs(model, seq, attn, PROMPT, T).detach()
    n, N = len(LENGTHS), sum(LENGTHS)
    analytic = torch.zeros_like(autograd)
    for (i, t), g_it in g.items():
        if name in ("aapo", "gpg", "dapo"):
            weight = -ADV[i] / N
        elif name == "dr_grpo":
            weight = -ADV[i] / (n * L_MAX)
        else:
            beta = algo.params.beta
            weight = (-ADV[i] + beta * (1 - torch.exp(ref[i, t] - logp[i, t]))) / (n * LENGTHS[i])
        analytic += float(weight) * g_it
    assert autograd.abs().max() > 1e-2
    # float64 model, but LlamaRMSNorm computes in float32: agreement to ~1e-7 of the largest entry,
    # while a wrong normaliser or weight (N vs n, a missing 1/|o_i|) would be off by tens of percent
    torch.testing.assert_close(autograd, analytic, rtol=1e-5, atol=1e-6 * float(autograd.abs().max()))
