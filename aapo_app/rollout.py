"""Stage 1, rollout: G policy samples and G reference samples per prompt, same sampling settings.

Completions are cut at the first EOS (kept, counted in the mask), everything after it is padding,
and a completion that reaches ``max_new_tokens`` without EOS is marked truncated.
"""

from __future__ import annotations

import contextlib
import time
import zlib

import torch

from aapo_app.batches import Grades, RolloutBatch, Samples
from aapo_app.data import PromptExample


def stream_seed(*parts) -> int:
    """A deterministic 31-bit seed from (run seed, step, rank, stream name, ...)."""
    return zlib.crc32(repr(parts).encode()) & 0x7FFFFFFF


def eos_token_ids(tokenizer, model=None) -> list[int]:
    """Every token that ends a completion: the tokenizer's EOS and the model's generation-config EOS."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(gen_eos, int):
        ids.add(gen_eos)
    elif gen_eos:
        ids.update(int(i) for i in gen_eos)
    return sorted(ids)


def checkpoint_eos_ids(tokenizer, model_path: str) -> list[int]:
    """:func:`eos_token_ids` with the generation config read from the checkpoint directory (for
    samplers that hold no transformers model, such as vLLM)."""
    from types import SimpleNamespace

    from transformers import GenerationConfig

    try:
        config = GenerationConfig.from_pretrained(model_path)
    except (OSError, ValueError):
        config = None
    return eos_token_ids(tokenizer, SimpleNamespace(generation_config=config))


def encode_prompts(tokenizer, prompts: list[str], add_special_tokens: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``[P, T_p]`` ids and bool mask. Chat-templated text already has its specials."""
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, padding=True, return_tensors="pt", add_special_tokens=add_special_tokens)
    return enc["input_ids"], enc["attention_mask"].bool()


def finish_samples(tokenizer, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                   completion_ids: torch.Tensor, eos_ids: list[int], max_new_tokens: int) -> Samples:
    """Cut completions ``[N, T_c]`` at the first EOS and build masks, lengths and texts."""
    n, width = completion_ids.shape
    is_eos = torch.isin(completion_ids, torch.tensor(eos_ids, dtype=completion_ids.dtype))
    has_eos = is_eos.any(dim=1)
    first_eos = torch.where(has_eos, is_eos.int().argmax(dim=1), torch.full((n,), width))
    lengths = torch.where(has_eos, first_eos + 1, torch.full((n,), width))  # EOS counts as a token
    completion_mask = torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)  # [N, T_c]
    pad = tokenizer.pad_token_id
    completion_ids = completion_ids.masked_fill(~completion_mask, pad)
    truncated = ~has_eos & (lengths >= max_new_tokens)
    text_ids = completion_ids.masked_fill(~completion_mask, pad)
    texts = tokenizer.batch_decode(
        [row[:length].tolist() for row, length in zip(text_ids, lengths.tolist())], skip_special_tokens=True
    )
    return Samples(
        sequences=torch.cat([prompt_ids, completion_ids], dim=1),
        attention_mask=torch.cat([prompt_mask, completion_mask], dim=1),
        completion_mask=completion_mask,
        prompt_width=prompt_ids.shape[1],
        texts=texts,
        lengths=lengths,
        truncated=truncated,
    )


# Every ``GenerationConfig`` field that changes which token ``generate`` picks (or how many rows it
# returns), at its neutral value: None where None means "off". Nothing else may reach ``generate``:
# the model's own generation_config.json (an instruct model's repetition_penalty, top_k=50,
# no_repeat_ngram_size, min_new_tokens, ...) would otherwise be merged into our sampling settings,
# and the samples would no longer follow softmax(logits / T), the distribution the loss scores.
# (min_new_tokens stays None: set beside min_length=0 it logs a warning at every call.)
NEUTRAL_GENERATION = dict(
    num_beams=1, num_beam_groups=1, diversity_penalty=0.0, length_penalty=1.0, early_stopping=False,
    penalty_alpha=None, dola_layers=None, low_memory=None, constraints=None, force_words_ids=None,
    min_length=0, min_new_tokens=None, max_length=None, max_time=None, stop_strings=None,
    typical_p=1.0, min_p=None, top_h=None, epsilon_cutoff=0.0, eta_cutoff=0.0,
    repetition_penalty=1.0, encoder_repetition_penalty=1.0, no_repeat_ngram_size=0, encoder_no_repeat_ngram_size=0,
    bad_words_ids=None, sequence_bias=None, suppress_tokens=None, begin_suppress_tokens=None,
    forced_bos_token_id=None, forced_eos_token_id=None, exponential_decay_length_penalty=None,
    guidance_scale=None, watermarking_config=None, renormalize_logits=False, remove_invalid_values=False,
    token_healing=False, prompt_lookup_num_tokens=None, num_return_sequences=1,
    output_scores=False, output_logits=False, return_dict_in_generate=False,
)


def generation_config(*, pad_id: int, max_new_tokens: int, temperature: float | None, top_p: float = 1.0,
                      top_k: int = 0, eos_ids: list[int]):
    """The ``GenerationConfig`` of every ``generate`` call (``rollout.sampler=hf``, layer-wise and
    hybrid-engine generation, ``aapo eval --sampler hf``): sampling at ``temperature`` with our
    top-p and top-k (0 = off), or greedy when ``temperature`` is None, and every other setting
    that changes the distribution explicitly neutral (:data:`NEUTRAL_GENERATION`).
    :func:`generate_in_mode` also keeps the model's own generation config out of the call."""
    from transformers import GenerationConfig

    if temperature is None:  # greedy: no warper runs (top_k left unset: any value but 50 logs a warning)
        sampling = dict(do_sample=False, temperature=1.0, top_p=1.0, top_k=None)
    else:  # top_k=0 is off; None would let generate fill in its global default of 50
        sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k)
    return GenerationConfig(**NEUTRAL_GENERATION, **sampling, max_new_tokens=max_new_tokens, pad_token_id=pad_id,
                            eos_token_id=list(eos_ids), use_cache=True)


def generation_kwargs(tokenizer, *, max_new_tokens: int, temperature: float | None, top_p: float = 1.0,
                      top_k: int = 0, eos_ids: list[int], synced_gpus: bool = False) -> dict:
    """``generate`` keyword arguments: our :func:`generation_config` and ``synced_gpus``."""
    return dict(generation_config=generation_config(pad_id=tokenizer.pad_token_id, max_new_tokens=max_new_tokens,
                                                    temperature=temperature, top_p=top_p, top_k=top_k,
                                                    eos_ids=eos_ids),
                synced_gpus=synced_gpus)


@contextlib.contextmanager
def only_these_settings(gen, config):
    """``gen.generation_config`` is ``config`` while inside: ``generate`` fills every setting a passed
    config leaves unset (None) from the model's own generation config (and transformers 4.50+
    also overrides values equal to its global defaults with it), so the model's file must not be
    there to be read."""
    own = gen.generation_config
    gen.generation_config = config
    try:
        yield
    finally:
        gen.generation_config = own


def _non_finite():
    from aapo_app.errors import AapoError

    return AapoError("sampling met NaN/inf probabilities: the model's weights are no longer finite; resume "
                     "from an earlier checkpoint (--resume DIR) with a lower train.learning_rate")


def pad_rows(rows: list[list[int]], pad_id: int, dtype=torch.long) -> torch.Tensor:
    """Token-id lists as one right-padded ``[len(rows), max(1, longest)]`` tensor."""
    out = torch.full((len(rows), max(1, max((len(r) for r in rows), default=1))), pad_id, dtype=dtype)
    for i, r in enumerate(rows):
        if r:
            out[i, :len(r)] = torch.tensor(r, dtype=dtype)
    return out


def _pad_together(pieces: list[torch.Tensor], pad_id: int, dtype) -> torch.Tensor:
    width = max(p.shape[1] for p in pieces)
    out = torch.full((sum(p.shape[0] for p in pieces), width), pad_id, dtype=dtype)
    row = 0
    for p in pieces:
        out[row:row + p.shape[0], :p.shape[1]] = p
        row += p.shape[0]
    return out


@torch.no_grad()
def generate_in_mode(gen, tokenizer, ids: torch.Tensor, mask: torch.Tensor, *, seed: int, chunk: int,
                     kwargs: dict, eos_ids: list[int]) -> Samples:
    """Generate from rows ``[N, T_p]`` with HF ``generate`` on a module already in generation mode,
    ``chunk`` rows per call, with :func:`generation_kwargs` (``kwargs``) and nothing from the model's
    own generation config."""
    from aapo_app.engine import device

    dev = device()
    pieces = []
    config = kwargs["generation_config"]
    torch.manual_seed(seed)
    with only_these_settings(gen, config):
        for start in range(0, ids.shape[0], chunk or ids.shape[0]):
            stop = start + (chunk or ids.shape[0])
            try:
                out = gen.generate(input_ids=ids[start:stop].to(dev), attention_mask=mask[start:stop].long().to(dev),
                                   **kwargs)
            except RuntimeError as exc:
                if "probability tensor contains" not in str(exc):
                    raise
                raise _non_finite() from exc
            pieces.append(out[:, ids.shape[1]:].cpu())
    completion = _pad_together(pieces, tokenizer.pad_token_id, ids.dtype)
    return finish_samples(tokenizer, ids, mask, completion, eos_ids, config.max_new_tokens)


@torch.no_grad()
def decode_in_mode(gen, tokenizer, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, *, num_samples: int,
                   max_new_tokens: int, temperature: float | None, top_p: float, top_k: int, seed: int, chunk: int,
                   eos_ids: list[int]) -> Samples:
    """``num_samples`` completions per prompt with aapo's decoding loop (:mod:`aapo_app.sampler`) on a
    module already in generation mode; ``chunk`` sequences (whole prompt groups) per call."""
    from aapo_app.engine import device
    from aapo_app.sampler import NonFiniteLogits, decode

    dev = device()
    generator = torch.Generator(device=dev).manual_seed(seed)
    per_call = max(1, chunk // num_samples) if chunk else prompt_ids.shape[0]
    pieces = []
    for start in range(0, prompt_ids.shape[0], per_call):
        rows = slice(start, start + per_call)
        try:
            pieces.append(decode(gen, prompt_ids[rows], prompt_mask[rows], num_samples=num_samples,
                                 max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                 eos_ids=eos_ids, pad_id=tokenizer.pad_token_id, generator=generator))
        except NonFiniteLogits as exc:
            raise _non_finite() from exc
    completion = _pad_together(pieces, tokenizer.pad_token_id, prompt_ids.dtype)
    return finish_samples(tokenizer, prompt_ids.repeat_interleave(num_samples, dim=0),
                          prompt_mask.repeat_interleave(num_samples, dim=0), completion, eos_ids, max_new_tokens)


def sample_in_mode(gen, tokenizer, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, *, sampler: str,
                   num_samples: int, max_new_tokens: int, temperature: float | None, top_p: float, top_k: int,
                   seed: int, chunk: int, eos_ids: list[int], synced_gpus: bool = False) -> Samples:
    """``num_samples`` completions per prompt on a module already in generation mode: aapo's decoding
    loop (``sampler='aapo'``) or ``generate`` (``'hf'``, and always when ``synced_gpus``: ranks
    generating through ZeRO-3's per-layer gathers must keep stepping together)."""
    if sampler == "aapo" and not synced_gpus:
        return decode_in_mode(gen, tokenizer, prompt_ids, prompt_mask, num_samples=num_samples,
                              max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                              seed=seed, chunk=chunk, eos_ids=eos_ids)
    kwargs = generation_kwargs(tokenizer, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                               top_k=top_k, eos_ids=eos_ids, synced_gpus=synced_gpus)
    return generate_in_mode(gen, tokenizer, prompt_ids.repeat_interleave(num_samples, dim=0),
                            prompt_mask.repeat_interleave(num_samples, dim=0), seed=seed, chunk=chunk,
                            kwargs=kwargs, eos_ids=eos_ids)


@torch.no_grad()
def sample(model, tokenizer, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, *, num_samples: int,
           max_new_tokens: int, temperature: float | None, top_p: float = 1.0, top_k: int = 0,
           seed: int, generation_batch_size: int = 0, eos_ids: list[int], sampler: str = "aapo") -> Samples:
    """``num_samples`` completions per prompt from a :class:`ZeroModel` or a vLLM engine
    (:mod:`aapo_app.vllm_engine`), greedy when temperature is None.

    Layer-wise ZeRO-3 generation and DeepSpeed's hybrid engine (its kernels patch ``generate``)
    always use ``generate``; otherwise ``sampler`` chooses (:func:`sample_in_mode`)."""
    if getattr(model, "is_vllm", False):
        return model.sample(tokenizer, prompt_ids, prompt_mask, num_samples=num_samples,
                            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                            seed=seed, eos_ids=eos_ids)
    with model.generation_mode() as gen:
        return sample_in_mode(gen, tokenizer, prompt_ids, prompt_mask,
                              sampler="hf" if model.hybrid_engine else sampler, num_samples=num_samples,
                              max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                              seed=seed, chunk=generation_batch_size, eos_ids=eos_ids, synced_gpus=model.synced_gpus)


@torch.no_grad()
def reference_logprobs(reference, samples: Samples, temperature: float, micro_batch_size: int) -> torch.Tensor:
    """Reference log-probs ``[N, T_c]`` of the policy's completion tokens (for KL baselines)."""
    from aapo_app.engine import device

    dev = device()
    parts = []
    for start in range(0, samples.sequences.shape[0], micro_batch_size):
        sl = slice(start, start + micro_batch_size)
        parts.append(reference.completion_logprobs(samples.sequences[sl].to(dev), samples.attention_mask[sl].to(dev),
                                                   samples.prompt_width, temperature).float().cpu())
    return torch.cat(parts, dim=0)


def rollout(policy, reference, tokenizer, examples: list[PromptExample], prompts: list[str], *, cfg, algorithm,
            seed: int, step: int, rank: int, micro_batch_size: int, add_special_tokens: bool,
            eos_ids: list[int], round: int = 0, reference_cache=None, reference_sampler=None) -> RolloutBatch:
    """Sample the policy group (and the reference group / reference log-probs the algorithm needs).

    ``policy`` samples the policy group (a :class:`ZeroModel` or a vLLM engine);
    ``reference_sampler`` (a vLLM reference engine), when given, samples the reference group,
    otherwise ``reference`` (a :class:`ZeroModel`) does; ``reference`` also scores KL log-probs.

    ``round`` > 0 marks an extra rollout of the same step (dynamic sampling) with its own seeds.
    With a :class:`~aapo_app.reference_cache.ReferenceCache` the reference group is read from it
    (the same tokens, masks and lengths an online sample would have) with its stored rewards."""
    start = time.perf_counter()
    extra = (round,) if round else ()
    prompt_ids, prompt_mask = encode_prompts(tokenizer, prompts, add_special_tokens)
    common = dict(num_samples=cfg.group_size, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                  top_p=cfg.top_p, top_k=cfg.top_k, generation_batch_size=cfg.generation_batch_size,
                  eos_ids=eos_ids, sampler=cfg.sampler)
    policy_samples = sample(policy, tokenizer, prompt_ids, prompt_mask,
                            seed=stream_seed(seed, step, rank, "policy", *extra), **common)
    ref_samples = ref_logp = ref_grades = None
    if algorithm.uses_reference_samples and reference_cache is not None:
        groups = reference_cache.groups(prompts)
        G = cfg.group_size
        ref_samples = finish_samples(tokenizer, prompt_ids.repeat_interleave(G, dim=0),
                                     prompt_mask.repeat_interleave(G, dim=0), groups.completion_ids, eos_ids,
                                     cfg.max_new_tokens)
        ref_grades = Grades(groups.rewards, groups.per_reward)
    elif algorithm.uses_reference_samples:
        ref_samples = sample(reference_sampler or reference, tokenizer, prompt_ids, prompt_mask,
                             seed=stream_seed(seed, step, rank, "reference", *extra), **common)
    if algorithm.uses_reference_logprobs:
        ref_logp = reference_logprobs(reference, policy_samples, cfg.temperature, micro_batch_size)
    return RolloutBatch(examples=examples, group_size=cfg.group_size, policy=policy_samples,
                        reference=ref_samples, ref_logprobs=ref_logp, seconds=time.perf_counter() - start,
                        reference_grades=ref_grades)
