"""One generation interface for every backend: the DeepSpeed engine's generation mode, a vLLM
engine colocated with the training rank, and a ``vllm serve`` process.

A :class:`Generator` samples completions of left-padded prompts (:meth:`Generator.sample`) and
returns :class:`~aapo_app.batches.Samples`; training rollouts (policy and reference groups), the
held-out evaluation, ``aapo eval`` and ``aapo reference-rollouts`` all go through it. Three more
methods make the backends interchangeable:

* :meth:`Generator.session`: a context in which several ``sample`` calls share one set-up: the
  DeepSpeed generator gathers the ZeRO-3 partitions once; a vLLM policy engine wakes up, takes the
  trainer's current weights if they changed, and goes back to sleep on exit. Collective.
* :meth:`Generator.weights_changed`: the trainer's weights changed (an optimizer step was applied,
  a checkpoint restored); a generator that holds its own copy (vLLM) takes them at its next session.
* ``source``: where the samples come from (a reference cache records it).

Sampling settings are one :class:`Sampling`; ``temperature=None`` is greedy. Every backend cuts
completions at the first EOS (kept and counted), pads after it and marks a completion that reached
``max_new_tokens`` without EOS as truncated (:func:`finish_samples`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from aapo_app.batches import Samples


@dataclass(frozen=True)
class Sampling:
    """How completions are drawn: at ``temperature`` with top-p and top-k (0 = off), or greedy when
    ``temperature`` is None; at most ``max_new_tokens`` tokens."""

    max_new_tokens: int
    temperature: float | None = None
    top_p: float = 1.0
    top_k: int = 0
    ignore_eos: bool = False  # EOS never drawn: exactly max_new_tokens tokens (benchmarks; rollout.ignore_eos)

    @classmethod
    def of_rollout(cls, rollout) -> "Sampling":
        """The training rollouts' settings (``rollout.*``)."""
        return cls(rollout.max_new_tokens, rollout.temperature, rollout.top_p, rollout.top_k, rollout.ignore_eos)


class Generator:
    """What every backend implements. ``tokenizer`` decodes, ``eos_ids`` end a completion,
    ``max_model_len`` is the longest prompt + completion it takes (None: unknown)."""

    tokenizer = None
    eos_ids: list[int] = []
    max_model_len: int | None = None
    source = "unknown"

    @contextlib.contextmanager
    def session(self):
        """Several :meth:`sample` calls sharing one set-up (see the module docstring). Collective."""
        yield self

    def sample(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, *, num_samples: int, sampling: Sampling,
               seed: int) -> Samples:
        """``num_samples`` completions of each prompt row (prompt-major), reproducible from ``seed``.
        Collective for backends whose generation is (ZeRO-3 gathers)."""
        raise NotImplementedError

    def weights_changed(self) -> None:
        """The trainer's weights changed; nothing to do for a generator that shares them."""


# ---------------------------------------------------------------------------------------------
# prompts in, samples out


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
                   completion_ids: torch.Tensor, eos_ids: list[int], max_new_tokens: int,
                   sampler_logprobs: torch.Tensor | None = None) -> Samples:
    """Cut completions ``[N, T_c]`` at the first EOS and build masks, lengths and texts (and keep the
    sampler's log-prob of each kept token, ``[N, T_c]``, when given)."""
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
        sampler_logprobs=(sampler_logprobs[:, :width].float().masked_fill(~completion_mask, 0.0)
                          if sampler_logprobs is not None else None),
    )


def pad_rows(rows, pad_id: int, dtype=torch.long) -> torch.Tensor:
    """Rows of token ids (lists, or ``[n_i, T_i]`` tensors stacked in order) as one right-padded
    ``[N, max(1, longest)]`` tensor."""
    pieces = [r if isinstance(r, torch.Tensor) else torch.tensor(r, dtype=dtype).view(1, -1) for r in rows]
    width = max([p.shape[-1] for p in pieces] + [1])
    out = torch.full((sum(p.shape[0] for p in pieces), width), pad_id, dtype=dtype)
    row = 0
    for p in pieces:
        out[row:row + p.shape[0], :p.shape[-1]] = p
        row += p.shape[0]
    return out


def prompt_token_lists(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> list[list[int]]:
    """The real (unpadded) tokens of each left-padded prompt row."""
    return [row[m].tolist() for row, m in zip(prompt_ids, prompt_mask)]


def samples_from_rows(tokenizer, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, rows, num_samples: int,
                      eos_ids: list[int], max_new_tokens: int, logprob_rows=None) -> Samples:
    """Completion rows (prompt-major, ``num_samples`` per prompt; lists or tensors) as :class:`Samples`,
    with the sampler's log-probs of their tokens (rows of the same shapes) when given."""
    completion = pad_rows(rows, tokenizer.pad_token_id, prompt_ids.dtype)
    logprobs = None
    if logprob_rows is not None:
        logprobs = pad_rows(logprob_rows, 0, torch.float32)
        logprobs = torch.nn.functional.pad(logprobs, (0, completion.shape[1] - logprobs.shape[1]))
    return finish_samples(tokenizer, prompt_ids.repeat_interleave(num_samples, dim=0),
                          prompt_mask.repeat_interleave(num_samples, dim=0), completion, eos_ids, max_new_tokens,
                          sampler_logprobs=logprobs)


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
                      top_k: int = 0, eos_ids: list[int], ignore_eos: bool = False):
    """The ``GenerationConfig`` of every ``generate`` call (``rollout.sampler=hf``, layer-wise and
    hybrid-engine generation, ``aapo eval --sampler hf``): sampling at ``temperature`` with our
    top-p and top-k (0 = off), or greedy when ``temperature`` is None, and every other setting
    that changes the distribution explicitly neutral (:data:`NEUTRAL_GENERATION`).
    :meth:`DeepSpeedGenerator._generate` also keeps the model's own generation config out of the call."""
    from transformers import GenerationConfig

    if temperature is None:  # greedy: no warper runs (top_k left unset: any value but 50 logs a warning)
        sampling = dict(do_sample=False, temperature=1.0, top_p=1.0, top_k=None)
    else:  # top_k=0 is off; None would let generate fill in its global default of 50
        sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k)
    neutral = dict(NEUTRAL_GENERATION, min_new_tokens=max_new_tokens) if ignore_eos else NEUTRAL_GENERATION
    return GenerationConfig(**neutral, **sampling, max_new_tokens=max_new_tokens, pad_token_id=pad_id,
                            eos_token_id=list(eos_ids), use_cache=True)


def generation_kwargs(tokenizer, *, max_new_tokens: int, temperature: float | None, top_p: float = 1.0,
                      top_k: int = 0, eos_ids: list[int], synced_gpus: bool = False) -> dict:
    """``generate`` keyword arguments: our :func:`generation_config` and ``synced_gpus`` (for calling
    ``generate`` directly, e.g. in the speed benchmarks)."""
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



# ---------------------------------------------------------------------------------------------
# the DeepSpeed engine's generation mode


class DeepSpeedGenerator(Generator):
    """Sampling on a :class:`~aapo_app.engine.ZeroModel`'s generation mode (the policy's, sharing the
    trained weights, or the frozen reference's).

    ``sampler='aapo'``: aapo's decoding loop (:func:`aapo_app.sampler.decode`); ``'hf'``:
    transformers' ``generate`` with :func:`generation_config`. Layer-wise ZeRO-3 generation and
    DeepSpeed's hybrid engine (its kernels patch ``generate``) always use ``generate``: ranks
    generating through per-layer gathers must keep stepping together (``synced_gpus``).
    ``chunk``: sequences per call (0 = all; the decoding loop rounds it down to whole prompt groups).
    """

    def __init__(self, model, tokenizer, eos_ids: list[int], *, sampler: str = "aapo", chunk: int = 0,
                 role: str = "policy"):
        self.model = model
        self.tokenizer = tokenizer
        self.eos_ids = list(eos_ids)
        self.sampler = sampler
        self.chunk = chunk
        self.source = f"deepspeed-{role}"
        self.max_model_len = getattr(model.module.config, "max_position_embeddings", None)
        self._module = None

    @contextlib.contextmanager
    def session(self):
        if self._module is not None:  # nested: the weights are gathered already
            yield self
            return
        with self.model.generation_mode() as module:
            self._module = module
            try:
                yield self
            finally:
                self._module = None

    def sample(self, prompt_ids, prompt_mask, *, num_samples, sampling, seed):
        with self.session():
            per_layer = self.model.synced_gpus or self.model.hybrid_engine
            if self.sampler == "aapo" and not per_layer:
                return self._decode(prompt_ids, prompt_mask, num_samples, sampling, seed)
            return self._generate(prompt_ids.repeat_interleave(num_samples, dim=0),
                                  prompt_mask.repeat_interleave(num_samples, dim=0), sampling, seed)

    @torch.no_grad()
    def _decode(self, prompt_ids, prompt_mask, num_samples: int, s: Sampling, seed: int) -> Samples:
        from aapo_app.engine import device
        from aapo_app.sampler import NonFiniteLogits, decode

        generator = torch.Generator(device=device()).manual_seed(seed)
        per_call = max(1, self.chunk // num_samples) if self.chunk else prompt_ids.shape[0]
        pieces, logprobs = [], []
        for start in range(0, prompt_ids.shape[0], per_call):
            rows = slice(start, start + per_call)
            try:
                tokens, lps = decode(self._module, prompt_ids[rows], prompt_mask[rows], num_samples=num_samples,
                                     max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_k=s.top_k,
                                     top_p=s.top_p, eos_ids=self.eos_ids, pad_id=self.tokenizer.pad_token_id,
                                     generator=generator, logprobs=True,
                                     suppress_ids=self.eos_ids if s.ignore_eos else None)
            except NonFiniteLogits as exc:
                raise _non_finite() from exc
            pieces.append(tokens.cpu())
            logprobs.append(lps.cpu())
        return samples_from_rows(self.tokenizer, prompt_ids, prompt_mask, pieces, num_samples, self.eos_ids,
                                 s.max_new_tokens, logprob_rows=logprobs)

    @torch.no_grad()
    def _generate(self, ids, mask, s: Sampling, seed: int) -> Samples:
        """HF ``generate`` on rows ``[N, T_p]``, ``chunk`` rows per call, with :func:`generation_config`
        and nothing from the model's own generation config."""
        from aapo_app.engine import device

        dev = device()
        config = generation_config(pad_id=self.tokenizer.pad_token_id, max_new_tokens=s.max_new_tokens,
                                   temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, eos_ids=self.eos_ids,
                                   ignore_eos=s.ignore_eos)
        chunk = self.chunk or ids.shape[0]
        pieces = []
        torch.manual_seed(seed)
        gen = self._module
        with only_these_settings(gen, config):
            for start in range(0, ids.shape[0], chunk):
                try:
                    out = gen.generate(input_ids=ids[start:start + chunk].to(dev),
                                       attention_mask=mask[start:start + chunk].long().to(dev),
                                       generation_config=config, synced_gpus=self.model.synced_gpus)
                except RuntimeError as exc:
                    if "probability tensor contains" not in str(exc):
                        raise
                    raise _non_finite() from exc
                pieces.append(out[:, ids.shape[1]:].cpu())
        return samples_from_rows(self.tokenizer, ids, mask, pieces, 1, self.eos_ids, s.max_new_tokens)
