"""Rollout post-processing: cut at EOS, masks, lengths, truncation (hand-made token rows)."""

import torch

from aapo_app.generation import finish_samples
from aapo_app.rollout import stream_seed


class _Tok:
    """Just what finish_samples needs from a tokenizer: a pad id and batch_decode."""

    pad_token_id = 0

    def batch_decode(self, rows, skip_special_tokens=True):
        return [" ".join(str(t) for t in row if not (skip_special_tokens and t == 2)) for row in rows]


def test_cut_at_first_eos_masks_and_truncation():
    EOS, PAD = 2, 0
    prompt = torch.tensor([[PAD, 5, 6], [7, 8, 9], [PAD, PAD, 4]])
    prompt_mask = prompt != PAD
    completion = torch.tensor([
        [11, 12, EOS, 13],   # EOS at index 2 -> length 3 (EOS counted), token 13 after it is dropped
        [14, 15, 16, 17],    # no EOS in max_new_tokens=4 -> length 4, truncated
        [EOS, EOS, EOS, EOS],  # EOS first -> length 1 (the EOS alone), not truncated
    ])
    s = finish_samples(_Tok(), prompt, prompt_mask, completion, eos_ids=[EOS], max_new_tokens=4)
    assert s.lengths.tolist() == [3, 4, 1]
    assert s.truncated.tolist() == [False, True, False]
    assert s.completion_mask.tolist() == [[True, True, True, False], [True] * 4, [True, False, False, False]]
    assert s.sequences[0, 3:].tolist() == [11, 12, EOS, PAD]  # after EOS: padding
    assert s.attention_mask[0].tolist() == [False, True, True, True, True, True, False]
    assert s.prompt_width == 3 and s.num_tokens == 8
    assert s.texts == ["11 12", "14 15 16 17", ""]


def test_a_completion_that_stops_early_is_not_truncated():
    # generation ended for the whole batch before max_new_tokens: a row without EOS that is shorter
    # than the limit cannot happen in generate, but if the width is below the limit it is not truncated
    s = finish_samples(_Tok(), torch.tensor([[5]]), torch.tensor([[True]]), torch.tensor([[11, 12]]),
                       eos_ids=[2], max_new_tokens=8)
    assert s.lengths.tolist() == [2] and s.truncated.tolist() == [False]


def test_stream_seeds_differ_by_every_part():
    seeds = {stream_seed(0, step, rank, stream) for step in (1, 2) for rank in (0, 1) for stream in ("policy", "reference")}
    assert len(seeds) == 8 and all(0 <= s < 2**31 for s in seeds)
    assert stream_seed(0, 1, 0, "policy") == stream_seed(0, 1, 0, "policy")
