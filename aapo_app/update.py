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

from aapo_app.algorithms import StepCounts, sequence_weights, step_counts, step_metrics
from aapo_app.batches import ScoredBatch
from aapo_app.engine import all_reduce_sum, device


def _trim(sequences, attention_mask, completion_mask, prompt_width):
    """Drop prompt columns that are padding in every row and completion columns past the longest."""
    lead = int((~attention_mask[:, :prompt_width]).all(dim=0).long().cumprod(0).sum())
    tail = int(completion_mask.any(dim=0).nonzero().max()) + 1 if completion_mask.any() else 1
    end = prompt_width + tail
    return (sequences[:, lead:end], attention_mask[:, lead:end], completion_mask[:, :tail], prompt_width - lead)


@dataclass
class MicroBatch:
    """One forward/backward: rows ``rows`` of the rank's batch, trimmed to their own widths."""

    rows: slice
    sequences: torch.Tensor
    attention_mask: torch.Tensor
    completion_mask: torch.Tensor
    prompt_width: int
    advantages: torch.Tensor
    ref_logprobs: torch.Tensor | None
    old_logprobs: torch.Tensor | None = None


def split_rows(n: int, mini_batches: int, micro_batch_size: int) -> list[list[slice]]:
    """Rows ``0..n-1`` as ``mini_batches`` equal consecutive mini-batches, each a list of consecutive
    micro-batch slices of at most ``micro_batch_size`` rows (the last one may be shorter)."""
    if mini_batches < 1 or n % mini_batches:
        raise ValueError(f"{mini_batches} mini-batches do not divide {n} sequences")
    size = n // mini_batches
    return [[slice(s, min(s + micro_batch_size, start + size)) for s in range(start, start + size, micro_batch_size)]
            for start in range(0, n, size)]


def update(policy, scored: ScoredBatch, algorithm, *, micro_batch_size: int, temperature: float,
           max_new_tokens: int) -> dict[str, float]:
    """``algorithm.optimizer_steps_per_rollout`` optimizer steps on the scored batch; returns the loss,
    gradient norm, learning rate and the algorithm's update metrics (the same on every rank)."""
    import torch.distributed as dist

    start = time.perf_counter()
    samples = scored.rollout.policy
    n, G = samples.sequences.shape[0], scored.rollout.group_size
    advantages = scored.advantages.reshape(-1)  # [N], prompt-major like the samples
    lengths = samples.completion_mask.sum(dim=1)  # [N] counted tokens of each sequence
    group_ids = torch.arange(n) // G  # [N]
    ref_logprobs = scored.rollout.ref_logprobs
    dev = device()
    world = dist.get_world_size() if dist.is_initialized() else 1
    mini_batches, iterations = algorithm.rollout_passes
    plan = split_rows(n, mini_batches, micro_batch_size)
    accumulation = policy.engine.gradient_accumulation_steps()
    if any(len(step) != accumulation for step in plan):
        raise ValueError(f"DeepSpeed accumulates {accumulation} micro-batches per optimizer step, the update has "
                         f"{len(plan[0])}: fill the DeepSpeed config from the same run config")
    steps = []
    for step in plan:
        micro = []
        for rows in step:
            seq, attn, cmask, width = _trim(samples.sequences[rows], samples.attention_mask[rows],
                                            samples.completion_mask[rows], samples.prompt_width)
            ref = ref_logprobs[rows, : cmask.shape[1]].to(dev) if ref_logprobs is not None else None
            micro.append(MicroBatch(rows, seq.to(dev), attn.to(dev), cmask.to(dev), width, advantages[rows].to(dev), ref))
        steps.append(micro)
    if algorithm.uses_old_logprobs and mini_batches * iterations > 1:
        with torch.no_grad():  # π_old: the policy that sampled the batch, before any step of this update
            for mb in (mb for step in steps for mb in step):
                mb.old_logprobs = policy.completion_logprobs(mb.sequences, mb.attention_mask, mb.prompt_width,
                                                             temperature)
    mode, constant = algorithm.aggregation(max_new_tokens)
    # the normaliser of each mini-batch's optimizer step: the same in every pass
    weights = []
    for step in steps:
        rows = torch.cat([torch.arange(n)[mb.rows] for mb in step])
        micro_ids = torch.cat([torch.full((mb.rows.stop - mb.rows.start,), i) for i, mb in enumerate(step)])
        local = step_counts(lengths[rows], group_ids[rows], micro_ids)
        totals = StepCounts(*all_reduce_sum(local.as_list()))
        w = sequence_weights(mode, lengths[rows], group_ids[rows], micro_ids, totals, constant)
        weights.append(list(torch.split(w, [mb.rows.stop - mb.rows.start for mb in step])))

    stats_sum: dict[str, float] = {}
    lrs, grad_norms = [], []
    skipped_before = policy.engine.skipped_steps
    for _ in range(iterations):
        for step, step_weights in zip(steps, weights):
            lrs.append(policy.engine.get_lr()[0] if policy.engine.get_lr() else float("nan"))
            for mb, w in zip(step, step_weights):
                logp = policy.completion_logprobs(mb.sequences, mb.attention_mask, mb.prompt_width, temperature)
                out = algorithm.loss(logp, mb.completion_mask, mb.advantages.to(logp.dtype), w.to(dev),
                                     mb.old_logprobs, mb.ref_logprobs)
                # DeepSpeed averages gradients over ranks: × world gives the sum the weights were made for
                policy.engine.backward(out.loss * world, scale_wrt_gas=False)
                policy.engine.step()  # DeepSpeed steps the optimizer on the last micro-batch of the step
                for k, v in out.stats.items():
                    stats_sum[k] = stats_sum.get(k, 0.0) + float(v)
            norm = policy.engine.get_global_grad_norm()
            grad_norms.append(float(norm) if norm is not None else float("nan"))
    keys = sorted(stats_sum)
    totals = dict(zip(keys, all_reduce_sum([stats_sum[k] for k in keys])))
    algo_metrics = step_metrics(totals, mini_batches * iterations)
    seconds = time.perf_counter() - start
    metrics = {
        "loss": algo_metrics["loss"],
        "grad_norm": sum(grad_norms) / len(grad_norms),
        "lr": lrs[0],
        "update_seconds": seconds,
        "update_tokens": float(samples.attention_mask.sum()) * iterations,
        "optimizer_steps": float(mini_batches * iterations),
        # DeepSpeed ZeRO-2/3 skip an optimizer step whose gradient norm is inf or NaN (a non-finite
        # loss gives one); the weights and optimizer states stay as they were
        "skipped_nonfinite": float(policy.engine.skipped_steps - skipped_before),
    }
    metrics.update({f"algo/{k}": v for k, v in algo_metrics.items()})
    return metrics
