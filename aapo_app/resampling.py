"""Stage 1b, resampling: grade each rollout once and, for algorithms that resample (DAPO's dynamic
sampling, GPG's regeneration), keep drawing rounds until the batch holds enough groups that carry
a learning signal.

Every round is graded here, once; the grades travel with the batch, so scoring (stage 2) grades
nothing again. All ranks take the same number of rounds (ZeRO-3 generation is collective, and the
prompt samplers stay in step). If the rounds run out, the batch is topped up with groups without
signal, so every rank trains the same number of sequences.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

from aapo_app.batches import RolloutBatch, select_groups
from aapo_app.engine import all_reduce_sum
from aapo_app.scoring import grade, signal_groups


@dataclass
class Resampled:
    """A graded batch, the extra rounds it took, and the fraction of its groups that carry signal
    (None when the algorithm does not resample)."""

    batch: RolloutBatch
    rounds: int = 0
    kept_frac: float | None = None


def resample(draw: Callable[[int], RolloutBatch], plan, reward_model, pad_id: int) -> Resampled:
    """``draw(round)`` samples a new rollout (round 0 first); ``plan`` is the algorithm's
    :class:`~aapo_app.algorithms.base.Resampling` or None. Collective."""
    batch = grade(draw(0), reward_model)
    if plan is None:
        return Resampled(batch)
    start = time.perf_counter() - batch.seconds
    P, G = len(batch.examples), batch.group_size
    kept, dropped, rounds, counts = [], [], 0, {}
    while True:
        for key, value in batch.policy_grades.counts.items():
            counts[key] = counts.get(key, 0) + value
        signal = signal_groups(batch.policy_grades, G, plan.signal)
        kept += [(batch, i) for i in range(P) if signal[i]]
        dropped += [(batch, i) for i in range(P) if not signal[i]]
        short = float(len(kept) < math.ceil(plan.min_kept_fraction * P))
        if rounds >= plan.max_extra_rounds or all_reduce_sum([short])[0] == 0:
            break
        rounds += 1
        batch = grade(draw(rounds), reward_model)
    kept_frac = min(len(kept), P) / P
    if rounds == 0 and len(kept) == P:
        return Resampled(batch, 0, kept_frac)
    merged = select_groups((kept + dropped)[:P], pad_id, counts)
    merged.seconds = time.perf_counter() - start  # every round's sampling and grading
    return Resampled(merged, rounds, kept_frac)
