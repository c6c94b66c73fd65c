"""Stage 3, update: the algorithm's loss over micro-batches, backward, one optimizer step.

DeepSpeed divides each micro-batch loss by ``gradient_accumulation_steps`` and steps the optimizer
on the last micro-batch; across data-parallel ranks it averages the gradients. How that combines
with each loss normaliser is documented in :func:`aapo_app.algorithms.aggregate_loss`.
"""

from __future__ import annotations

import time

from aapo_app.batches import ScoredBatch


def _trim(sequences, attention_mask, completion_mask, prompt_width):
    """Drop prompt columns that are padding in every row and completion columns past the longest."""
    lead = int((~attention_mask[:, :prompt_width]).all(dim=0).long().cumprod(0).sum())
    tail = int(completion_mask.any(dim=0).nonzero().max()) + 1 if completion_mask.any() else 1
    end = prompt_width + tail
    return (sequences[:, lead:end], attention_mask[:, lead:end], completion_mask[:, :tail], prompt_width - lead)


def update(policy, scored: ScoredBatch, algorithm, *, micro_batch_size: int, temperature: float,
           max_new_tokens: int) -> dict[str, float]:
    """``algorithm.updates_per_rollout`` optimizer steps on the scored batch (one for all but GRPO
    with μ > 1); returns loss, grad norm and throughput figures."""
    import torch

    from aapo_app.engine import device

    start = time.perf_counter()
    samples = scored.rollout.policy
    advantages = scored.advantages.reshape(-1)  # [N], prompt-major like the samples
    ref_logprobs = scored.rollout.ref_logprobs
    dev = device()
    micro_batches = []
    for start_row in range(0, samples.sequences.shape[0], micro_batch_size):
        rows = slice(start_row, start_row + micro_batch_size)
        seq, attn, cmask, width = _trim(samples.sequences[rows], samples.attention_mask[rows],
                                        samples.completion_mask[rows], samples.prompt_width)
        ref = ref_logprobs[rows, : cmask.shape[1]].to(dev) if ref_logprobs is not None else None
        micro_batches.append((seq.to(dev), attn.to(dev), cmask.to(dev), width, advantages[rows].to(dev), ref))
    iterations = algorithm.updates_per_rollout
    old = [None] * len(micro_batches)
    if iterations > 1 and algorithm.uses_old_logprobs:
        with torch.no_grad():  # pi_old: the policy that sampled the batch
            old = [policy.completion_logprobs(seq, attn, width, temperature) for seq, attn, _, width, _, _ in micro_batches]
    losses, stats_sum = [], {}
    skipped_before = policy.engine.skipped_steps
    for _ in range(iterations):
        for (seq, attn, cmask, width, adv, ref), old_logp in zip(micro_batches, old):
            logp = policy.completion_logprobs(seq, attn, width, temperature)  # [n, T_c]
            out = algorithm.loss(logp, cmask, adv.to(logp.dtype), old_logp, ref, max_new_tokens)
            policy.engine.backward(out.loss)
            policy.engine.step()  # DeepSpeed steps the optimizer on the last micro-batch of each pass
            losses.append(float(out.loss.detach()))
            for k, v in out.stats.items():
                stats_sum[k] = stats_sum.get(k, 0.0) + float(v)
    grad_norm = policy.engine.get_global_grad_norm()
    lr = policy.engine.get_lr()[0] if policy.engine.get_lr() else float("nan")
    seconds = time.perf_counter() - start
    metrics = {
        "loss": sum(losses) / len(losses),
        "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
        "lr": float(lr),
        "update_seconds": seconds,
        "update_tokens": float(samples.attention_mask.sum()) * iterations,
        # DeepSpeed ZeRO-2/3 skip an optimizer step whose gradient norm is inf or NaN (a non-finite
        # loss gives one); the weights and optimizer states stay as they were
        "skipped_nonfinite": float(policy.engine.skipped_steps - skipped_before),
    }
    metrics.update({f"algo/{k}": v / len(losses) for k, v in stats_sum.items()})
    return metrics
