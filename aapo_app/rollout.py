"""Stage 1, rollout: G policy samples and G reference samples per prompt, same sampling settings.

Completions are cut at the first EOS (kept, counted in the mask), everything after it is padding,
and a completion that reaches ``max_new_tokens`` without EOS is marked truncated
(:func:`aapo_app.generation.finish_samples`).
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass

import torch

from aapo_app.batches import RolloutBatch
from aapo_app.data import PromptExample
from aapo_app.generation import Generator, Sampling, encode_prompts, finish_samples


def stream_seed(*parts) -> int:
    """A deterministic 31-bit seed from (run seed, step, rank, stream name, ...)."""
    return zlib.crc32(repr(parts).encode()) & 0x7FFFFFFF


@torch.no_grad()
def reference_logprobs(reference, samples, temperature: float, micro_batch_size: int) -> torch.Tensor:
    """Reference log-probs ``[N, T_c]`` of the policy's completion tokens (for KL baselines)."""
    from aapo_app.engine import device

    dev = device()
    parts = []
    for start in range(0, samples.sequences.shape[0], micro_batch_size):
        sl = slice(start, start + micro_batch_size)
        parts.append(reference.completion_logprobs(samples.sequences[sl].to(dev), samples.attention_mask[sl].to(dev),
                                                   samples.prompt_width, temperature).float().cpu())
    return torch.cat(parts, dim=0)


@dataclass
class Rollout:
    """The rollout stage of a run: who samples and scores, and with which settings.

    ``policy`` samples the policy group; ``reference`` samples the reference group for algorithms
    that use one (AAPO), unless ``cache`` (a :class:`~aapo_app.reference_cache.ReferenceCache`)
    holds it: then the group is read from the cache (the same tokens, masks and lengths an online
    sample would have) with its stored grades. ``scorer`` (the frozen reference
    :class:`~aapo_app.engine.ZeroModel`) scores the KL baselines' reference log-probs."""

    policy: Generator
    tokenizer: object
    rollout: object  # RolloutConfig
    algorithm: object
    seed: int
    rank: int
    micro_batch_size: int
    add_special_tokens: bool
    reference: Generator | None = None
    cache: object = None
    scorer: object = None

    def __call__(self, examples: list[PromptExample], prompts: list[str], step: int, round: int = 0) -> RolloutBatch:
        """One rollout of ``examples`` (rendered as ``prompts``). ``round`` > 0 marks an extra rollout of
        the same step (dynamic sampling) with its own seeds. Collective. Call it inside the policy
        generator's session."""
        start = time.perf_counter()
        cfg, G = self.rollout, self.rollout.group_size
        extra = (round,) if round else ()
        ids, mask = encode_prompts(self.tokenizer, prompts, self.add_special_tokens)
        sampling = Sampling.of_rollout(cfg)
        policy = self.policy.sample(ids, mask, num_samples=G, sampling=sampling,
                                    seed=stream_seed(self.seed, step, self.rank, "policy", *extra))
        ref_samples = ref_logp = ref_grades = None
        if self.algorithm.uses_reference_samples and self.cache is not None:
            groups = self.cache.groups(prompts)
            ref_samples = finish_samples(self.tokenizer, ids.repeat_interleave(G, dim=0),
                                         mask.repeat_interleave(G, dim=0), groups.completion_ids,
                                         self.policy.eos_ids, cfg.max_new_tokens)
            ref_grades = groups.grades
        elif self.algorithm.uses_reference_samples:
            ref_samples = self.reference.sample(ids, mask, num_samples=G, sampling=sampling,
                                                seed=stream_seed(self.seed, step, self.rank, "reference", *extra))
        if self.algorithm.uses_reference_logprobs:
            ref_logp = reference_logprobs(self.scorer, policy, cfg.temperature, self.micro_batch_size)
        return RolloutBatch(examples=examples, group_size=G, policy=policy, reference=ref_samples,
                            ref_logprobs=ref_logp, seconds=time.perf_counter() - start, reference_grades=ref_grades)
