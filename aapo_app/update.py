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
    """One optimizer step on the scored batch; returns loss, grad norm and throughput figures."""
    from aapo_app.engine import device

    start = time.perf_counter()
    samples = scored.rollout.policy
    advantages = scored.advantages.reshape(-1)  # [N], prompt-major like the samples
    ref_logprobs = scored.rollout.ref_logprobs
    dev = device()
    losses, stats_sum = [], {}
    n = samples.sequences.shape[0]
    for start_row in range(0, n, micro_batch_size):
        rows = slice(start_row, start_row + micro_batch_size)
        seq, attn, cmask, width = _trim(samples.sequences[rows], samples.attention_mask[rows],
                                        samples.completion_mask[rows], samples.prompt_width)
        logp = policy.completion_logprobs(seq.to(dev), attn.to(dev), width, temperature)  # [n, T_c]
        ref = ref_logprobs[rows, : cmask.shape[1]].to(dev) if ref_logprobs is not None else None
        out = algorithm.loss(logp, cmask.to(dev), advantages[rows].to(dev, logp.dtype), None, ref, max_new_tokens)
        policy.engine.backward(out.loss)
        policy.engine.step()
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
        "update_tokens": float(samples.attention_mask.sum()),
    }
    metrics.update({f"algo/{k}": v / len(losses) for k, v in stats_sum.items()})
    return metrics
