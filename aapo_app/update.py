"""Stage 3, update: the algorithm's loss over the scored batch, in optimizer steps of exact size.

Each rank's P × G sequences are split into the algorithm's ``mini_batches`` consecutive
mini-batches (one optimizer step each; one for the on-policy algorithms), passed over
``num_iterations`` times, and each mini-batch into micro-batches of at most
``train.micro_batch_size`` sequences (gradient accumulation; memory only).

Loss normalisation belongs to the optimizer step, not the micro-batch: before the first backward
of a step, the token, sequence, group and micro-batch counts of the whole step are summed over the
data-parallel ranks, and :func:`~aapo_app.algorithms.base.sequence_weights` turns them into one
weight per sequence, so that the micro-batch losses add up to the algorithm's objective over the
step (``algorithm.loss_aggregation``). DeepSpeed would divide each micro-batch loss by the
accumulation steps and average gradients over ranks; the backward here is taken without the
first (``scale_wrt_gas=False``) and with the loss multiplied by the world size against the second,
so the gradient applied is exactly that of the step objective.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from aapo_app.algorithms import StepCounts, sequence_weights, step_counts, step_metrics, weighted_token_sum
from aapo_app.algorithms.base import tis_weights
from aapo_app.batches import ScoredBatch
from aapo_app.engine import all_reduce_max, all_reduce_sum, device, pack_left
from aapo_app.errors import AapoError


def _trim(sequences, attention_mask, completion_mask, prompt_width):
    """Drop prompt columns that are padding in every row and completion columns past the longest."""
    lead = int((~attention_mask[:, :prompt_width]).all(dim=0).long().cumprod(0).sum())
    tail = int(completion_mask.any(dim=0).nonzero().max()) + 1 if completion_mask.any() else 1
    end = prompt_width + tail
    return (sequences[:, lead:end], attention_mask[:, lead:end], completion_mask[:, :tail], prompt_width - lead)


@dataclass
class MicroBatch:
    """One forward/backward: rows ``rows`` of the rank's batch, trimmed to their own widths."""

    rows: list[int]
    sequences: torch.Tensor
    attention_mask: torch.Tensor
    completion_mask: torch.Tensor  # the tokens trained on (without truncated completions with mask_truncated)
    tokens: torch.Tensor  # every completion token (for the entropy metric)
    prompt_width: torch.Tensor  # [n] the column each row's completion starts at (rows packed from column 0)
    advantages: torch.Tensor
    ref_logprobs: torch.Tensor | None
    old_logprobs: torch.Tensor | None = None
    empty: bool = False  # a stand-in that keeps the ranks' collectives in step: no token counts, weight 0
    sampler_logprobs: torch.Tensor | None = None
    tis_factors: torch.Tensor | None = None  # [n, T_c] truncated importance weights, fixed at π_old


def split_rows(n: int, mini_batches: int, micro_batch_size: int) -> list[list[slice]]:
    """Rows ``0..n-1`` as ``mini_batches`` equal consecutive mini-batches, each a list of consecutive
    micro-batch slices of at most ``micro_batch_size`` rows (the last one may be shorter)."""
    if mini_batches < 1 or n % mini_batches:
        raise ValueError(f"{mini_batches} mini-batches do not divide {n} sequences")
    size = n // mini_batches
    return [[slice(s, min(s + micro_batch_size, start + size)) for s in range(start, start + size, micro_batch_size)]
            for start in range(0, n, size)]


def split_by_tokens(widths: torch.Tensor, mini_batches: int, budget: int) -> list[list[list[int]]]:
    """Rows ``0..n-1`` as ``mini_batches`` equal consecutive mini-batches, each cut into micro-batches
    of at most ``budget`` padded tokens (rows x the widest row's prompt + completion length; at
    least one row each). Inside a mini-batch rows are taken shortest first, so that rows of similar
    length share a micro-batch and one long completion sets the size of few others."""
    n = widths.numel()
    if mini_batches < 1 or n % mini_batches:
        raise ValueError(f"{mini_batches} mini-batches do not divide {n} sequences")
    size = n // mini_batches
    plan = []
    for start in range(0, n, size):
        rows = sorted(range(start, start + size), key=lambda r: (int(widths[r]), r))
        micro, widest = [], 0
        step = []
        for r in rows:
            w = max(widest, int(widths[r]))
            if micro and w * (len(micro) + 1) > budget:
                step.append(micro)
                micro, w = [], int(widths[r])
            micro.append(r)
            widest = w
        step.append(micro)
        plan.append(step)
    return plan


def update(policy, scored: ScoredBatch, algorithm, *, micro_batch_size: int, temperature: float,
           max_new_tokens: int, micro_batch_tokens: int = 0, tis: str | None = None) -> dict[str, float]:
    """``algorithm.optimizer_steps_per_rollout`` optimizer steps on the scored batch; returns the loss,
    gradient norm, learning rate and the algorithm's update metrics (the same on every rank).

    Micro-batches hold ``micro_batch_size`` rows, or with ``micro_batch_tokens`` > 0 as many rows as
    fit that many padded tokens (:func:`split_by_tokens`); their number then varies between steps
    and ranks, so the accumulation boundary is set by hand and a rank with fewer micro-batches runs
    empty ones (weight 0) so that every rank makes the same ZeRO-3 collectives.

    With ``tis`` (``"token"`` or ``"sequence"``, see :meth:`Algorithm.tis_level`) every token's loss is
    also multiplied by the truncated importance ratio of the trainer's π_old against the sampler's
    log-probs (:func:`~aapo_app.algorithms.base.tis_weights`), fixed for the whole update."""
    import torch.distributed as dist

    start = time.perf_counter()
    samples = scored.rollout.policy
    n, G = samples.sequences.shape[0], scored.rollout.group_size
    advantages = scored.advantages.reshape(-1)  # [N], prompt-major like the samples
    params = algorithm.params
    trained = samples.completion_mask  # [N, T_c] the tokens that get a gradient
    if params.mask_truncated:  # a completion cut without EOS neither trains nor counts in the normaliser
        trained = trained & ~samples.truncated.reshape(-1, 1)
    lengths = trained.sum(dim=1)  # [N] counted tokens of each sequence
    if tis and samples.sampler_logprobs is None:
        raise AapoError(f"algorithm.tis={params.tis} needs the sampler's log-prob of each sampled token, which this "
                        f"sampler did not report (rollout.sampler=hf does not; vLLM does from 0.10.2, and a vllm "
                        f"serve server only with --logprobs-mode processed_logprobs); use rollout.sampler=aapo, "
                        f"upgrade vLLM, or set algorithm.tis=off")
    group_ids = torch.arange(n) // G  # [N]
    ref_logprobs = scored.rollout.ref_logprobs
    dev = device()
    world = dist.get_world_size() if dist.is_initialized() else 1
    mini_batches, iterations = algorithm.rollout_passes
    if micro_batch_tokens > 0:
        widths = samples.attention_mask[:, :samples.prompt_width].sum(dim=1) + samples.completion_mask.sum(dim=1)
        plan = split_by_tokens(widths, mini_batches, micro_batch_tokens)
        # every rank runs as many micro-batches as the rank with the most; the extra ones weigh 0
        most = all_reduce_max([float(len(step)) for step in plan])
        filler = [int(m) - len(step) for step, m in zip(plan, most)]
    else:
        plan = [[list(range(rows.start, rows.stop)) for rows in step]
                for step in split_rows(n, mini_batches, micro_batch_size)]
        filler = [0] * len(plan)
        accumulation = policy.engine.gradient_accumulation_steps()
        if any(len(step) != accumulation for step in plan):
            raise ValueError(f"DeepSpeed accumulates {accumulation} micro-batches per optimizer step, the update has "
                             f"{len(plan[0])}: fill the DeepSpeed config from the same run config")

    def micro_batch(rows: list[int], empty: bool = False) -> MicroBatch:
        index = torch.tensor(rows)
        seq, attn, tokens, width = _trim(samples.sequences[index], samples.attention_mask[index],
                                         samples.completion_mask[index], samples.prompt_width)
        seq, attn, width = pack_left(seq, attn, width)  # no prompt-side padding: completions start per row
        cmask = trained[index, : tokens.shape[1]] & (not empty)
        ref = ref_logprobs[index, : cmask.shape[1]].to(dev) if ref_logprobs is not None else None
        sampler = samples.sampler_logprobs[index, : cmask.shape[1]].to(dev) if tis else None
        return MicroBatch(rows, seq.to(dev), attn.to(dev), cmask.to(dev), tokens.to(dev), width,
                          advantages[index].to(dev), ref, empty=empty, sampler_logprobs=sampler)

    steps = [[micro_batch(rows) for rows in step] + [micro_batch(step[0][:1], empty=True)] * extra
             for step, extra in zip(plan, filler)]
    if algorithm.uses_old_logprobs and mini_batches * iterations > 1:
        with torch.no_grad():  # π_old: the policy that sampled the batch, before any step of this update
            for mb in (mb for step in steps for mb in step):
                mb.old_logprobs = policy.completion_logprobs(mb.sequences, mb.attention_mask, mb.prompt_width,
                                                             temperature)
    mode, constant = algorithm.aggregation(max_new_tokens)
    # the normaliser of each mini-batch's optimizer step: the same in every pass
    weights = []
    for step in steps:
        real = [mb for mb in step if not mb.empty]
        rows = torch.tensor([r for mb in real for r in mb.rows])
        micro_ids = torch.cat([torch.full((len(mb.rows),), i) for i, mb in enumerate(real)])
        local = step_counts(lengths[rows], group_ids[rows], micro_ids)
        totals = StepCounts(*all_reduce_sum(local.as_list()))
        w = sequence_weights(mode, lengths[rows], group_ids[rows], micro_ids, totals, constant)
        weights.append(list(torch.split(w, [len(mb.rows) for mb in real])) + [torch.zeros(1, dtype=w.dtype)] * (
            len(step) - len(real)))

    stats_sum: dict[str, float] = {}
    tis_sum = {"ratio_sum": 0.0, "units": 0.0, "cut": 0.0, "abs_diff_sum": 0.0, "tokens": 0.0}
    tis_extremes = [float("-inf"), float("-inf")]  # max ratio, -min ratio
    entropy_sum = entropy_tokens = 0.0
    lrs, grad_norms = [], []
    skipped_before = policy.engine.skipped_steps
    for it in range(iterations):
        for step, step_weights in zip(steps, weights):
            lrs.append(policy.engine.get_lr()[0] if policy.engine.get_lr() else float("nan"))
            for i, (mb, w) in enumerate(zip(step, step_weights)):
                if micro_batch_tokens > 0:  # the number of micro-batches varies: the last one ends the step
                    policy.engine.set_gradient_accumulation_boundary(i == len(step) - 1)
                # the token entropy comes from the same chunked pass over the output layer (no extra forward),
                # needed for the metric (first pass) and the bonus only
                if it == 0 or params.entropy_coef:
                    logp, entropy = policy.completion_logprobs(mb.sequences, mb.attention_mask, mb.prompt_width,
                                                               temperature, entropy=True)
                else:
                    logp = policy.completion_logprobs(mb.sequences, mb.attention_mask, mb.prompt_width, temperature)
                w = w.to(dev)
                if tis:
                    if mb.tis_factors is None:  # at π_old: the old log-probs, or this first forward's own
                        old = mb.old_logprobs if mb.old_logprobs is not None else logp.detach()
                        mb.tis_factors, st = tis_weights(old, mb.sampler_logprobs, mb.completion_mask, tis,
                                                         params.tis_cap, params.tis_mode)
                        if not mb.empty:
                            for k in tis_sum:
                                tis_sum[k] += st[k]
                            tis_extremes = [max(tis_extremes[0], st["ratio_max"]),
                                            max(tis_extremes[1], -st["ratio_min"])]
                    w = w.to(mb.tis_factors.dtype)[:, None] * mb.tis_factors  # [n, T_c]
                out = algorithm.loss(logp, mb.completion_mask, mb.advantages.to(logp.dtype), w,
                                     mb.old_logprobs, mb.ref_logprobs)
                loss = out.loss
                if params.entropy_coef:
                    loss = loss - params.entropy_coef * weighted_token_sum(entropy, mb.completion_mask, w)
                if it == 0 and not mb.empty:  # the policy that sampled the batch (before its first step)
                    entropy_sum += float(entropy.detach()[mb.tokens].sum())
                    entropy_tokens += float(mb.tokens.sum())
                # DeepSpeed averages gradients over ranks: × world gives the sum the weights were made for
                policy.engine.backward(loss * world, scale_wrt_gas=False)
                policy.engine.step()  # DeepSpeed steps the optimizer on the last micro-batch of the step
                if not mb.empty:
                    for k, v in out.stats.items():
                        stats_sum[k] = stats_sum.get(k, 0.0) + float(v)
            norm = policy.engine.get_global_grad_norm()
            grad_norms.append(float(norm) if norm is not None else float("nan"))
    keys = sorted(stats_sum)
    *sums, entropy_sum, entropy_tokens = all_reduce_sum([stats_sum[k] for k in keys] + [entropy_sum, entropy_tokens])
    totals = dict(zip(keys, sums))
    algo_metrics = step_metrics(totals, mini_batches * iterations)
    seconds = time.perf_counter() - start
    metrics = {
        "loss": algo_metrics["loss"],
        "grad_norm": sum(grad_norms) / len(grad_norms),
        "lr": lrs[0],
        "update_seconds": seconds,
        "update_tokens": float(samples.attention_mask.sum()) * iterations,
        "optimizer_steps": float(mini_batches * iterations),
        "entropy": entropy_sum / max(entropy_tokens, 1.0),
        # DeepSpeed ZeRO-2/3 skip an optimizer step whose gradient norm is inf or NaN (a non-finite
        # loss gives one); the weights and optimizer states stay as they were
        "skipped_nonfinite": float(policy.engine.skipped_steps - skipped_before),
    }
    metrics.update({f"algo/{k}": v for k, v in algo_metrics.items()})
    if tis:
        keys = list(tis_sum)
        totals = dict(zip(keys, all_reduce_sum([tis_sum[k] for k in keys])))
        ratio_max, neg_ratio_min = all_reduce_max(tis_extremes)
        metrics.update({
            "tis/ratio_mean": totals["ratio_sum"] / max(totals["units"], 1.0),
            "tis/ratio_min": -neg_ratio_min,
            "tis/ratio_max": ratio_max,
            "tis/cut_frac": totals["cut"] / max(totals["units"], 1.0),
            "tis/logprob_abs_diff": totals["abs_diff_sum"] / max(totals["tokens"], 1.0),
        })
    return metrics
