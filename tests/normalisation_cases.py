"""A fixed batch, the algorithm/aggregation cases, and the objective written out in plain torch on
unpadded sequences: shared by tests/test_normalisation.py (the formula side) and
tests/normalisation_script.py (the real update stage on DeepSpeed ZeRO-3 under torchrun)."""

from __future__ import annotations

import math

import torch

G = 4  # samples per group
VOCAB = 64
TEMPERATURE = 0.7
MAX_NEW = 12  # rollout.max_new_tokens: the constant of Dr. GRPO's aggregation
PROMPT_LENGTHS = [3, 5, 2, 4]  # one prompt per group, different lengths (left padding on a rank)
# completion lengths per group: very different inside groups and between them
LENGTHS = [[1, 9, 2, 12], [7, 7, 3, 1], [12, 11, 10, 2], [1, 1, 5, 3]]
GROUPS = len(LENGTHS)
MODES = ("group_token_mean", "token_mean", "seq_mean", "constant", "micro_batch_token_mean")
RATIO_ALGOS = ("grpo", "dr_grpo", "dapo")
# train.micro_batch_tokens: padded prompt + completion tokens per micro-batch (rows are 4 to 15 tokens
# long): 24 gives micro-batches of one to three rows, and with 2 ranks rank 0 makes 4 of them, rank 1 5
TOKEN_BUDGETS = (24,)


def make_sequences(seed: int = 0):
    """Per group: (prompt ids [T_p], [completion ids [T_i]] * G, advantages [G], [ref log-probs [T_i]] * G)."""
    g = torch.Generator().manual_seed(seed)
    groups = []
    for p_len, lengths in zip(PROMPT_LENGTHS, LENGTHS):
        prompt = torch.randint(3, VOCAB, (p_len,), generator=g)
        completions = [torch.randint(3, VOCAB, (n,), generator=g) for n in lengths]
        advantages = torch.randn(G, generator=g)
        refs = [-torch.rand(n, generator=g) * 4 for n in lengths]
        groups.append((prompt, completions, advantages, refs))
    return groups


def cases():
    """(name, params overrides): every algorithm with every aggregation mode at its default
    update schedule, plus several mini-batches and iterations for the ratio-based ones."""
    out = []
    for name in ("aapo", "gpg", *RATIO_ALGOS):
        for mode in MODES:
            out.append((name, {"loss_aggregation": mode}))
    # β = 0 here: four SGD steps at lr 1 drive the k3 term's exp(ref − logp) to inf
    out.append(("grpo", {"mini_batches": 2, "num_iterations": 2, "beta": 0.0}))
    # the entropy bonus and masked truncated completions, in the modes where they count differently
    out.append(("aapo", {"entropy_coef": 0.5}))
    out.append(("grpo", {"mask_truncated": True}))
    out.append(("dapo", {"mask_truncated": True, "entropy_coef": 0.2}))
    out.append(("dr_grpo", {"mask_truncated": True}))
    # truncated importance sampling against a sampler whose log-probs differ by SAMPLER_SHIFT
    out.append(("aapo", {"tis": "token", "tis_cap": 1.5}))
    out.append(("grpo", {"tis": "sequence", "tis_mode": "mask", "tis_cap": 3.0}))
    out.append(("dapo", {"tis": "token", "tis_mode": "mask", "tis_cap": 2.0, "mini_batches": 2}))
    out.append(("dr_grpo", {"mini_batches": 4}))
    out.append(("dapo", {"mini_batches": 2, "num_iterations": 2, "loss_aggregation": "group_token_mean"}))
    return out


def case_key(name: str, params: dict, micro: int, world: int) -> str:
    return f"{name}|{sorted(params.items())}|micro={micro}|world={world}"


def rank_groups(world: int, rank: int) -> list[int]:
    """The groups rank ``rank`` holds: consecutive blocks."""
    per = GROUPS // world
    return list(range(rank * per, (rank + 1) * per))


def sampler_shift(seed: int = 1) -> dict:
    """(group, sample) -> ``[T_i]`` δ: the sampler's log-prob of each token is the trainer's (at the
    initial weights) minus δ, so that π_train / π_sampler = exp(δ) per token."""
    g = torch.Generator().manual_seed(seed)
    return {(grp, j): (torch.rand(n, generator=g) * 1.6 - 0.8).double() for grp, lengths in enumerate(LENGTHS)
            for j, n in enumerate(lengths)}


def tis_factor(params: dict, shift: torch.Tensor) -> torch.Tensor:
    """``[T_i]`` the factor TIS puts on each token's loss, from its shift δ (written out from the definition)."""
    cap, mode = params.get("tis_cap", 2.0), params.get("tis_mode", "truncate")
    ratio = torch.exp(shift) if params["tis"] == "token" else torch.exp(shift.sum()).expand_as(shift)
    if mode == "truncate":
        return torch.minimum(ratio, torch.tensor(cap, dtype=ratio.dtype))
    return torch.where((ratio > cap) | (ratio < 1 / cap), torch.zeros_like(ratio), ratio)


def truncated(grp: int, j: int) -> bool:
    """A completion of MAX_NEW tokens is one the sampler cut (no EOS): groups 0 and 2 have one."""
    return LENGTHS[grp][j] == MAX_NEW


def logprobs_unpadded(model, prompt: torch.Tensor, completion: torch.Tensor, entropy: bool = False):
    """log π(o_t | q, o_<t) at TEMPERATURE for one unpadded sequence: ``[T_i]``; with ``entropy`` also
    the entropy -Σ_v π log π of each of those distributions."""
    ids = torch.cat([prompt, completion]).unsqueeze(0)
    logits = model(input_ids=ids).logits[0, len(prompt) - 1: -1].float() / TEMPERATURE  # [T_i, V]
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, completion.unsqueeze(-1)).squeeze(-1)
    return (logp, -(logp_all.exp() * logp_all).sum(-1)) if entropy else logp


def per_token_loss(name: str, params: dict, logp: torch.Tensor, old: torch.Tensor, ref: torch.Tensor,
                   adv: float) -> torch.Tensor:
    """ℓ_t of one sequence, as the papers write it (at π_old = ``old``)."""
    if name in ("aapo", "gpg"):
        return -logp * adv
    if name == "dapo":
        eps_low, eps_high, beta = params.get("epsilon_low", 0.2), params.get("epsilon_high", 0.28), 0.0
    else:
        eps_low = eps_high = params.get("epsilon", 0.2)
        beta = params.get("beta", 0.04 if name == "grpo" else 0.0)
    ratio = torch.exp(logp - old)
    surrogate = torch.minimum(ratio * adv, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv)
    loss = -surrogate
    if beta > 0:
        loss = loss + beta * (torch.exp(ref - logp) - (ref - logp) - 1)
    return loss


DEFAULT_MODE = {"aapo": "group_token_mean", "gpg": "group_token_mean", "grpo": "seq_mean", "dr_grpo": "constant",
                "dapo": "token_mean"}
DEFAULT_MINI_BATCHES = {"dapo": 4}


def schedule(name: str, params: dict, world: int, micro: int):
    """The optimizer steps of one update as the formula sees them: a list (over steps) of lists of
    (group, sample, micro-batch key) for every sequence of the step, over all ranks."""
    mini = params.get("mini_batches", DEFAULT_MINI_BATCHES.get(name, 1))
    iters = params.get("num_iterations", 1)
    steps = []
    for _ in range(iters):
        for m in range(mini):
            members = []
            for rank in range(world):
                rows = [(grp, j) for grp in rank_groups(world, rank) for j in range(G)]
                size = len(rows) // mini
                chunk = rows[m * size:(m + 1) * size]
                for k, (grp, j) in enumerate(chunk):
                    members.append((grp, j, (rank, k // min(micro, size))))
            steps.append(members)
    return steps


def formula_update(model, name: str, params: dict, world: int, micro: int, lr: float, data) -> dict:
    """SGD with ``lr`` on the objective of each optimizer step, computed sequence by sequence on
    unpadded data; returns {parameter name: change}. The ratio's π_old is the model before the update."""
    mode = params.get("loss_aggregation", DEFAULT_MODE[name])
    shifts = sampler_shift()
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    with torch.no_grad():
        old = {(grp, j): logprobs_unpadded(model, data[grp][0], data[grp][1][j]) for grp in range(GROUPS)
               for j in range(G)}
    for members in schedule(name, params, world, micro):
        sums, lengths = {}, {}
        for grp, j, mb in members:
            prompt, completions, adv, refs = data[grp]
            logp, entropy = logprobs_unpadded(model, prompt, completions[j], entropy=True)
            # the entropy bonus: −c·H_t joins every token's loss, normalised like it
            loss = per_token_loss(name, params, logp, old[(grp, j)], refs[j], float(adv[j]))
            loss = loss - params.get("entropy_coef", 0.0) * entropy
            if params.get("tis", "off") in ("token", "sequence"):  # every token's loss times its TIS factor
                loss = loss * tis_factor(params, shifts[(grp, j)]).to(loss.dtype)
            masked = params.get("mask_truncated", False) and truncated(grp, j)  # no token of it counts
            sums[(grp, j)] = loss.sum() * 0.0 if masked else loss.sum()
            lengths[(grp, j)] = 0 if masked else len(completions[j])
        # the objective of the step, by its definition (AGGREGATIONS in aapo_app.algorithms.base)
        # (a masked sequence still counts as a sequence of its group and of the step, with no tokens)
        if mode == "group_token_mean":
            groups = sorted({grp for grp, _, _ in members})
            objective = sum(sum(sums[(g2, j)] for g2, j, _ in members if g2 == grp)
                            / sum(lengths[(g2, j)] for g2, j, _ in members if g2 == grp) for grp in groups) / len(groups)
        elif mode == "token_mean":
            objective = sum(sums.values()) / sum(lengths.values())
        elif mode == "seq_mean":
            objective = sum(sums[k] / max(lengths[k], 1) for k in sums) / len(sums)
        elif mode == "constant":
            objective = sum(sums.values()) / (len(sums) * MAX_NEW)
        else:  # micro_batch_token_mean
            micros = sorted({mb for _, _, mb in members})
            objective = sum(sum(sums[(grp, j)] for grp, j, m in members if m == mb)
                            / sum(lengths[(grp, j)] for grp, j, m in members if m == mb) for mb in micros) / len(micros)
        model.zero_grad()
        objective.backward()
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    p -= lr * p.grad
    return {k: (p.detach() - before[k]) for k, p in model.named_parameters()}


def relative_difference(a: dict, b: dict) -> float:
    num = math.sqrt(sum(float(((a[k].double() - b[k].double()) ** 2).sum()) for k in a))
    den = math.sqrt(sum(float((b[k].double() ** 2).sum()) for k in b))
    return num / max(den, 1e-30)
