"""The typed batches that flow rollout -> scoring -> update.

Layout: P prompts x G samples, prompt-major: row ``i * G + j`` is sample ``j`` of prompt ``i``.
Sequences are ``[prompt (left-padded) | completion (right-padded)]`` of width ``T = T_p + T_c``.
Masks follow one convention everywhere: True means "this token counts".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from aapo_app.data import PromptExample


@dataclass
class Samples:
    """G completions per prompt from one model (the policy or the reference).

    Fields:
        sequences: ``[N, T]`` prompt + completion token ids, N = P * G.
        attention_mask: ``[N, T]`` bool, True on real (non-pad) prompt and completion tokens.
        completion_mask: ``[N, T_c]`` bool, True on completion tokens up to and including the first
            EOS; everything after EOS (or padding) is False.
        prompt_width: T_p, the column where completions start.
        texts: N decoded completions (special tokens removed, cut at EOS).
        lengths: ``[N]`` completion length in tokens (EOS included).
        truncated: ``[N]`` bool, True when the completion hit max_new_tokens without EOS.
        sampler_logprobs: ``[N, T_c]`` log-prob of each sampled token under the distribution the
            sampler drew it from (temperature-scaled, top-k/top-p truncated and renormalised; 0 after
            the completion), or None when the sampler does not report them. Truncated importance
            sampling compares them with the trainer's.
    """

    sequences: torch.Tensor
    attention_mask: torch.Tensor
    completion_mask: torch.Tensor
    prompt_width: int
    texts: list[str]
    lengths: torch.Tensor
    truncated: torch.Tensor
    sampler_logprobs: Optional[torch.Tensor] = None

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())


@dataclass
class Grades:
    """Rewards of N completions, graded once (by the scoring or resampling stage, or stored in a
    reference cache).

    Fields:
        total: ``[N]`` weighted reward sum_k w_k R_k.
        parts: reward name -> ``[N]`` unweighted values (accuracy always among them).
        counts: grading counts of the batch ("verify_timeout", "verify_error", "no_answer").
    """

    total: torch.Tensor
    parts: dict[str, torch.Tensor]
    counts: dict[str, int] = field(default_factory=dict)

    @classmethod
    def of(cls, reward_output) -> "Grades":
        """From a :class:`~aapo_app.rewards.RewardOutput`."""
        return cls(reward_output.total, dict(reward_output.per_reward), dict(reward_output.counts))

    def rows(self, rows: torch.Tensor) -> "Grades":
        """The grades of ``rows`` (counts stay with the batch that was graded, not its rows)."""
        return Grades(self.total[rows], {k: v[rows] for k, v in self.parts.items()})

    @staticmethod
    def concat(parts: list["Grades"], counts: dict[str, int] | None = None) -> "Grades":
        return Grades(torch.cat([g.total for g in parts]),
                      {k: torch.cat([g.parts[k] for g in parts]) for k in parts[0].parts}, dict(counts or {}))


@dataclass
class RolloutBatch:
    """What the rollout stage hands to scoring.

    Fields:
        examples: the P prompts of this rank (problem, gold answer).
        group_size: G.
        policy: the policy's samples, N = P * G rows.
        reference: the reference's samples for the same prompts and sampling settings, or None
            when the algorithm does not use them.
        ref_logprobs: ``[N, T_c]`` reference log-probs of the policy's completion tokens (for KL
            baselines), or None.
        seconds: wall-clock of generation (policy + reference).
        policy_grades: the policy samples' rewards if they were graded already (dynamic sampling
            grades each round once); scoring grades them otherwise.
        reference_grades: the reference samples' rewards if known already (``rollout.reference=
            cached:DIR`` stores them with the samples); scoring grades them otherwise.
    """

    examples: list[PromptExample]
    group_size: int
    policy: Samples
    reference: Optional[Samples] = None
    ref_logprobs: Optional[torch.Tensor] = None
    seconds: float = 0.0
    policy_grades: Optional[Grades] = None
    reference_grades: Optional[Grades] = None


@dataclass
class ScoredBatch:
    """What the scoring stage hands to the update.

    Fields:
        rollout: the rollout it scored.
        rewards: ``[P, G]`` weighted reward of each policy sample.
        ref_rewards: ``[P, G]`` weighted reward of each reference sample, or None.
        reward_parts: reward name -> ``[P, G]`` unweighted values (policy samples).
        advantages: ``[P, G]`` per-sample advantage from the algorithm.
        diagnostics: algorithm and reward diagnostics (floats), already named as metrics.
        advantage_parts: the terms the advantage is the sum of, by name (AAPO: group_term, momentum).
    """

    rollout: RolloutBatch
    rewards: torch.Tensor
    ref_rewards: Optional[torch.Tensor]
    reward_parts: dict[str, torch.Tensor]
    advantages: torch.Tensor
    diagnostics: dict[str, float] = field(default_factory=dict)
    advantage_parts: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [P, G] (AAPO's two terms)


def _pad_samples(s: Samples, prompt_width: int, completion_width: int, pad_id: int) -> Samples:
    """``s`` with its prompt block left-padded to ``prompt_width`` and completions right-padded."""
    left, right = prompt_width - s.prompt_width, completion_width - s.completion_mask.shape[1]
    n = s.sequences.shape[0]

    def widen(t, fill):
        return torch.cat([torch.full((n, left), fill, dtype=t.dtype), t, torch.full((n, right), fill, dtype=t.dtype)], 1)

    return Samples(
        sequences=widen(s.sequences, pad_id), attention_mask=widen(s.attention_mask, False),
        completion_mask=torch.cat([s.completion_mask, torch.zeros(n, right, dtype=torch.bool)], 1),
        prompt_width=prompt_width, texts=s.texts, lengths=s.lengths, truncated=s.truncated,
        sampler_logprobs=(torch.nn.functional.pad(s.sampler_logprobs, (0, right)) if s.sampler_logprobs is not None
                          else None),
    )


def _concat_samples(parts: list[Samples], pad_id: int) -> Samples:
    width_p = max(p.prompt_width for p in parts)
    width_c = max(p.completion_mask.shape[1] for p in parts)
    parts = [_pad_samples(p, width_p, width_c, pad_id) for p in parts]
    return Samples(
        sequences=torch.cat([p.sequences for p in parts]), attention_mask=torch.cat([p.attention_mask for p in parts]),
        completion_mask=torch.cat([p.completion_mask for p in parts]), prompt_width=width_p,
        texts=[t for p in parts for t in p.texts], lengths=torch.cat([p.lengths for p in parts]),
        truncated=torch.cat([p.truncated for p in parts]),
        sampler_logprobs=(torch.cat([p.sampler_logprobs for p in parts])
                          if all(p.sampler_logprobs is not None for p in parts) else None),
    )


def _rows(s: Samples, rows: torch.Tensor) -> Samples:
    return Samples(sequences=s.sequences[rows], attention_mask=s.attention_mask[rows],
                   completion_mask=s.completion_mask[rows], prompt_width=s.prompt_width,
                   texts=[s.texts[i] for i in rows.tolist()], lengths=s.lengths[rows], truncated=s.truncated[rows],
                   sampler_logprobs=s.sampler_logprobs[rows] if s.sampler_logprobs is not None else None)


def select_groups(picks: list[tuple[RolloutBatch, int]], pad_id: int,
                  counts: dict[str, int] | None = None) -> RolloutBatch:
    """A new batch made of whole groups ``(batch, group index)``, padded to common widths, with their
    grades where the batches have them (``counts``: the grading counts of the policy samples of every
    round that was graded for it)."""
    G = picks[0][0].group_size
    first = picks[0][0]
    rows = [(batch, torch.arange(i * G, (i + 1) * G)) for batch, i in picks]
    policy = _concat_samples([_rows(b.policy, r) for b, r in rows], pad_id)
    reference = _concat_samples([_rows(b.reference, r) for b, r in rows], pad_id) if first.reference is not None else None
    ref_logprobs = None
    if first.ref_logprobs is not None:
        width = policy.completion_mask.shape[1]
        ref_logprobs = torch.cat([torch.nn.functional.pad(b.ref_logprobs[r], (0, width - b.ref_logprobs.shape[1]))
                                  for b, r in rows])

    def grades(name: str, counts: dict[str, int] | None = None) -> Grades | None:
        if getattr(first, name) is None:
            return None
        return Grades.concat([getattr(b, name).rows(r) for b, r in rows], counts)

    return RolloutBatch(examples=[b.examples[i] for b, i in picks], group_size=G, policy=policy, reference=reference,
                        ref_logprobs=ref_logprobs, policy_grades=grades("policy_grades", counts),
                        reference_grades=grades("reference_grades"))
