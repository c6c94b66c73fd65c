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
    """

    sequences: torch.Tensor
    attention_mask: torch.Tensor
    completion_mask: torch.Tensor
    prompt_width: int
    texts: list[str]
    lengths: torch.Tensor
    truncated: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())


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
    """

    examples: list[PromptExample]
    group_size: int
    policy: Samples
    reference: Optional[Samples] = None
    ref_logprobs: Optional[torch.Tensor] = None
    seconds: float = 0.0


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
    """

    rollout: RolloutBatch
    rewards: torch.Tensor
    ref_rewards: Optional[torch.Tensor]
    reward_parts: dict[str, torch.Tensor]
    advantages: torch.Tensor
    diagnostics: dict[str, float] = field(default_factory=dict)
