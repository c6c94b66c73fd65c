"""aapo's own decoding loop: the same sampling distribution as Hugging Face ``generate``, less work.

What it does differently from ``model.generate`` (``rollout.sampler=hf``), and why it is faster:

* **One prefill per prompt.** The G samples of a prompt share their prompt, so the prompt is run
  through the model once and its key/value cache is repeated G times (``generate`` on the
  repeated batch prefills every copy).
* **A preallocated key/value cache.** Each layer's keys and values are written into buffers
  reserved ahead (doubling when full) instead of being re-concatenated at every token
  (``DynamicCache`` copies the whole cache per layer per token).
* **Finished sequences leave the batch.** Once at most ``compact_below`` of the rows are still
  running, the finished ones are dropped from the batch and the cache (``generate`` keeps
  computing every row until the last one ends).
* **Small-batch matrix products as ``W @ xᵀ``** (CPU only). At decode time a linear layer
  multiplies a handful of rows by a large weight; on CPU BLAS the product in that orientation is
  about 1.4x faster than ``x @ Wᵀ`` for SmolLM2's shapes (``bench/rollout_speed.py`` measures it).
  It is the same product summed in another order: greedy tokens are unchanged.
* **Sampling by inverse CDF.** One uniform number per row and a search in the cumulative
  probabilities draws exactly from the categorical distribution; ``torch.multinomial`` draws one
  exponential variate per vocabulary entry (49,152 of them per row for SmolLM2).

What it keeps: the distribution. Logits are processed exactly as ``generate`` does with the same
settings (temperature, then top-k, then top-p with HF's tie and minimum-one-token rules), greedy
decoding is an argmax, completions stop at the first EOS. Sampled tokens differ from ``generate``'s
for the same seed (different random numbers), not in distribution; greedy tokens are the same.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import types

import torch
import torch.nn as nn
import torch.nn.functional as F

from transformers.cache_utils import DynamicCache, DynamicLayer

from aapo_app.engine import position_ids


class NonFiniteLogits(FloatingPointError):
    """The model produced NaN/inf logits (its weights are no longer finite)."""


class PreallocatedLayer(DynamicLayer):
    """A ``DynamicLayer`` whose keys/values live in preallocated buffers (no per-token concat).

    The buffers start at ``capacity`` positions and double when full (so a long completion limit
    does not reserve memory it may never use). ``keys``/``values`` are views of the filled part,
    so attention only sees real positions."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.length = 0
        self._k = self._v = None

    @classmethod
    def from_tensors(cls, keys: torch.Tensor, values: torch.Tensor, capacity: int) -> PreallocatedLayer:
        layer = cls(max(capacity, keys.shape[-2]))
        layer.update(keys, values)
        return layer

    def _alloc(self, like: torch.Tensor, capacity: int) -> torch.Tensor:
        return like.new_empty(like.shape[0], like.shape[1], capacity, like.shape[-1])

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self._k, self._v = self._alloc(key_states, self.capacity), self._alloc(value_states, self.capacity)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start, stop = self.length, self.length + key_states.shape[-2]
        if stop > self.capacity:  # grow geometrically: amortised O(1) copies per position
            self.capacity = max(stop, 2 * self.capacity)
            k, v = self._alloc(self._k, self.capacity), self._alloc(self._v, self.capacity)
            k[:, :, :start], v[:, :, :start] = self._k[:, :, :start], self._v[:, :, :start]
            self._k, self._v = k, v
        self._k[:, :, start:stop] = key_states
        self._v[:, :, start:stop] = value_states
        self.length = stop
        self.keys, self.values = self._k[:, :, :stop], self._v[:, :, :stop]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def _reindex(self, fn) -> None:
        if self.is_initialized:
            self._k, self._v = fn(self._k), fn(self._v)
            self.keys, self.values = self._k[:, :, :self.length], self._v[:, :, :self.length]

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._reindex(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._reindex(lambda t: t.index_select(0, indices))


def cache_keyword(model: nn.Module) -> str:
    """The keyword under which ``model``'s forward takes a key/value :class:`Cache`: ``cache`` where
    transformers has renamed it (5.x; ``past_key_values`` is still accepted there but warns that it is
    deprecated on every call), else ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def preallocate(cache: DynamicCache, capacity: int) -> DynamicCache:
    """Move a prefilled cache's plain layers into :class:`PreallocatedLayer` buffers of ``capacity``
    positions (sliding-window and other special layers are kept as they are)."""
    cache.layers = [PreallocatedLayer.from_tensors(layer.keys, layer.values, capacity)
                    if type(layer) is DynamicLayer and layer.is_initialized else layer
                    for layer in cache.layers]
    return cache


# ---------------------------------------------------------------------------------------------
# small-batch linear layers

SMALL_BATCH_ROWS = 64  # at most this many rows -> W @ x^T
INITIAL_CACHE_TOKENS = 512  # completion positions reserved up front; the cache doubles beyond


def _matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, small_batch: bool) -> torch.Tensor:
    """``x @ weightᵀ (+ bias)``, as ``W @ xᵀ`` when few rows go through (``small_batch``).

    The rows are always flattened to one 2-D matrix first. Given a 3-D input that is not contiguous
    (the prefill's last position, ``hidden[:, -1:]``) and a weight that does not require a gradient
    (the gathered copy we decode with), ``F.linear`` goes through ``torch.matmul``, which does not
    fold the batch then: it expands the weight to one copy per row and runs a batched product. For
    the output layer of SmolLM2 and 100 prompts that is a 5.7 GB temporary (measured: the held-out
    evaluation's prefill took the whole run's memory from 5 to 10.5 GB)."""
    rows = x.numel() // x.shape[-1]
    flat = x.reshape(rows, x.shape[-1])
    if not small_batch or rows > SMALL_BATCH_ROWS:
        out = F.linear(flat, weight, bias)
    else:
        out = (weight @ flat.t()).t().contiguous()
        if bias is not None:
            out = out + bias
    return out.reshape(*x.shape[:-1], out.shape[-1])


def _small_batch_linear(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return _matmul(x, self.weight, self.bias, True)


class _FusedGroup:
    """Linear layers that read the same input (q/k/v, gate/up) computed as one product.

    The first layer's call computes the product of the stacked weights and keeps the other layers'
    slices for the same input tensor; each of the other layers then returns its slice when called with
    that very tensor (and computes its own product otherwise, so a different call order is still
    exact). One larger matrix product instead of two or three small ones: fewer dispatches per token
    and better use of the matrix units at decode time's few rows."""

    def __init__(self, layers: list[nn.Linear], small_batch: bool):
        self.layers, self.small_batch = layers, small_batch
        self.weight = torch.cat([m.weight for m in layers])
        biases = [m.bias for m in layers]
        self.bias = None if all(b is None for b in biases) else torch.cat(
            [b if b is not None else m.weight.new_zeros(m.out_features) for b, m in zip(biases, layers)])
        self.sizes = [m.out_features for m in layers]
        self._input, self._parts = None, {}

    def first(self, x: torch.Tensor) -> torch.Tensor:
        parts = _matmul(x, self.weight, self.bias, self.small_batch).split(self.sizes, dim=-1)
        self._input, self._parts = x, dict(enumerate(parts[1:], start=1))
        return parts[0]

    def other(self, index: int, x: torch.Tensor) -> torch.Tensor:
        if x is self._input and index in self._parts:
            return self._parts.pop(index)
        layer = self.layers[index]
        return _matmul(x, layer.weight, layer.bias, self.small_batch)


FUSED_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


@contextlib.contextmanager
def fast_linears(model: nn.Module, small_batch: bool = True, fuse: bool = True):
    """While inside, the model's ``nn.Linear`` layers compute ``W @ xᵀ`` when few rows go through
    (``small_batch``), and attention's q/k/v and the MLP's gate/up projections are each one product of
    stacked weights (``fuse``; the stacked copy lives until the block exits). Outputs are the same
    products summed in another order."""
    patched = []
    if fuse:
        for module in model.modules():
            for names in FUSED_GROUPS:
                layers = [getattr(module, n, None) for n in names]
                if not all(type(m) is nn.Linear for m in layers):
                    continue
                if any(hasattr(m.weight, "ds_id") for m in layers):  # ZeRO-3 partitions, gathered by its hooks
                    continue
                if len({(m.in_features, m.weight.dtype, m.weight.device) for m in layers}) != 1:
                    continue
                group = _FusedGroup(layers, small_batch)
                layers[0].forward = group.first
                for i, m in enumerate(layers[1:], start=1):
                    m.forward = functools.partial(group.other, i)
                patched += layers
    if small_batch:
        done = {id(m) for m in patched}
        for m in model.modules():
            if type(m) is nn.Linear and id(m) not in done:
                m.forward = types.MethodType(_small_batch_linear, m)
                patched.append(m)
    try:
        yield model
    finally:
        for m in patched:
            del m.forward


# ---------------------------------------------------------------------------------------------
# attention of one new token

#: the name :func:`one_token_attention` registers :func:`_one_token_attention` under with transformers
ONE_TOKEN_ATTENTION = "aapo_one_token"


def _one_token_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                         is_causal=None, **kwargs):
    """transformers' ``sdpa`` attention, with the decoding step's case (one query token per row) as
    two small batched matrix products and a softmax in fp32, on the key/value heads directly (the
    query heads of a key/value head stacked as rows). torch's fused CPU kernel costs several times
    more for a single query; every other call (prefill, dropout, position bias, soft-capping) goes to
    ``sdpa`` unchanged."""
    if (query.shape[2] != 1 or dropout or kwargs.get("position_bias") is not None or kwargs.get("softcap")
            or kwargs.get("output_attentions") or kwargs.get("sinks") is not None or key.shape[-1] != value.shape[-1]):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    b, heads, _, d = query.shape
    kv_heads = key.shape[1]
    scale = d ** -0.5 if scaling is None else scaling
    q = query.reshape(b, kv_heads, heads // kv_heads, d)
    scores = torch.matmul(q, key.transpose(-1, -2)).float() * scale  # [b, kv_heads, rep, L]
    if attention_mask is not None:
        mask = attention_mask[..., -1:, :scores.shape[-1]].reshape(b, 1, 1, -1)  # the last query's row
        scores = (scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.float())
    probs = scores.softmax(dim=-1).to(value.dtype)
    out = torch.matmul(probs, value)  # [b, kv_heads, rep, d]
    return out.reshape(b, heads, 1, d).transpose(1, 2).contiguous(), None


def _register_one_token_attention() -> None:
    """Register :func:`_one_token_attention` with transformers under :data:`ONE_TOKEN_ATTENTION`,
    with ``sdpa``'s attention masks (once; the ``sdpa`` entry itself is never touched)."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    if ONE_TOKEN_ATTENTION not in AttentionInterface._global_mapping:
        AttentionInterface.register(ONE_TOKEN_ATTENTION, _one_token_attention)
    if ONE_TOKEN_ATTENTION not in AttentionMaskInterface._global_mapping:
        AttentionMaskInterface.register(ONE_TOKEN_ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


@contextlib.contextmanager
def one_token_attention(model: nn.Module, enabled: bool = True):
    """While inside, ``model`` (if it is on ``sdpa`` attention) computes decoding steps with
    :func:`_one_token_attention`: its config's attention implementation is switched to
    :data:`ONE_TOKEN_ATTENTION` and put back. Only this model changes; other models, and
    transformers' ``sdpa`` entry, are left alone."""
    config = getattr(model, "config", None)
    if not enabled or getattr(config, "_attn_implementation", None) != "sdpa":
        yield model
        return
    _register_one_token_attention()
    config._attn_implementation = ONE_TOKEN_ATTENTION
    try:
        yield model
    finally:
        config._attn_implementation = "sdpa"


# ---------------------------------------------------------------------------------------------
# token selection


def process_logits(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Logits ``[B, V]`` (fp32) -> processed scores, exactly as ``generate``'s warpers with these
    settings: divide by temperature, keep the top-k (ties at the k-th value kept), then top-p."""
    scores = logits / temperature
    if top_k and top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, -float("inf"))
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= (1 - top_p)
        remove[..., -1:] = False  # keep at least the most likely token
        scores = scores.masked_fill(remove.scatter(-1, order, remove), -float("inf"))
    return scores


def draw(scores: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row from softmax(scores) by inverse CDF: ``[B, V]`` -> ``[B]``.

    The cumulative sum is taken in float64, so each token's interval has the width of its
    probability; a token of probability 0 has an empty interval and is never drawn."""
    cdf = scores.softmax(dim=-1, dtype=torch.float64).cumsum(dim=-1)
    u = torch.rand((scores.shape[0], 1), generator=generator, dtype=torch.float64, device=scores.device)
    idx = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)
    return idx.squeeze(-1).clamp_(max=scores.shape[-1] - 1)


# ---------------------------------------------------------------------------------------------
# the loop


@torch.no_grad()
def decode(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, *, num_samples: int, max_new_tokens: int,
           temperature: float | None, top_k: int = 0, top_p: float = 1.0, eos_ids: list[int], pad_id: int,
           generator: torch.Generator | None = None, compact_below: float = 0.5,
           small_batch_matmul: bool = True, fuse_projections: bool = True, fast_attention: bool = True,
           logprobs: bool = False, suppress_ids: list[int] | None = None):
    """``num_samples`` completions of each left-padded prompt ``[P, T_p]``: ``[P * G, T_c]`` token ids,
    prompt-major (the G samples of prompt p are rows p*G .. p*G+G-1), ``pad_id`` after each EOS and
    after the last row ends. ``temperature=None`` decodes greedily. With ``logprobs``, also
    ``[P * G, T_c]`` fp32: each drawn token's log-prob under the distribution it was drawn from
    (:func:`process_logits`: temperature, top-k, top-p; 0 for greedy tokens and after the end).

    ``suppress_ids``: tokens never drawn (their logits set to -inf first, as ``generate``'s
    ``min_new_tokens`` does for EOS). The speed-ups (all on by default; on CPU only where marked):
    ``small_batch_matmul`` (CPU), ``fuse_projections`` (CPU: :func:`fast_linears`) and
    ``fast_attention`` (:func:`one_token_attention`)."""
    dev = next(model.parameters()).device
    cpu = dev.type == "cpu"
    with fast_linears(model, small_batch=small_batch_matmul and cpu, fuse=fuse_projections and cpu), \
            one_token_attention(model, enabled=fast_attention):
        tokens, lps = _decode(model, prompt_ids, prompt_mask, num_samples=num_samples, max_new_tokens=max_new_tokens,
                              temperature=temperature, top_k=top_k, top_p=top_p, eos_ids=eos_ids, pad_id=pad_id,
                              generator=generator, compact_below=compact_below, dev=dev, logprobs=logprobs,
                              suppress_ids=suppress_ids)
    return (tokens, lps) if logprobs else tokens


def _decode(model, prompt_ids, prompt_mask, *, num_samples, max_new_tokens, temperature, top_k, top_p, eos_ids,
            pad_id, generator, compact_below, dev, logprobs=False, suppress_ids=None):
    ids, mask = prompt_ids.to(dev), prompt_mask.to(dev).long()
    n_prompts, width = ids.shape
    rows = n_prompts * num_samples
    out = torch.full((rows, max_new_tokens), pad_id, dtype=ids.dtype, device=dev)
    out_lp = torch.zeros((rows, max_new_tokens), dtype=torch.float32, device=dev) if logprobs else None
    eos = torch.tensor(eos_ids, dtype=ids.dtype, device=dev)

    cache = DynamicCache(config=model.config)
    cache_kw = cache_keyword(model)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), **{cache_kw: cache},
                   use_cache=True, logits_to_keep=1).logits[:, -1].float()
    cache = preallocate(cache, width + min(max_new_tokens, INITIAL_CACHE_TOKENS))
    cache.batch_repeat_interleave(num_samples)
    logits = logits.repeat_interleave(num_samples, dim=0)
    full_mask = torch.cat([mask.repeat_interleave(num_samples, dim=0),
                           torch.ones((rows, max_new_tokens), dtype=mask.dtype, device=dev)], dim=1)
    next_pos = mask.sum(-1).repeat_interleave(num_samples)  # position of the first completion token
    live = torch.arange(rows, device=dev)  # the output row each batch row writes
    done = torch.zeros(rows, dtype=torch.bool, device=dev)
    for t in range(max_new_tokens):
        if not bool(torch.isfinite(logits).all()):
            raise NonFiniteLogits(f"non-finite logits at completion token {t}")
        if suppress_ids:
            logits[:, suppress_ids] = float("-inf")
        if temperature is None:
            tokens = logits.argmax(dim=-1)
        else:
            scores = process_logits(logits, temperature, top_k, top_p)
            tokens = draw(scores, generator)
            if logprobs:
                lp = scores.gather(-1, tokens[:, None]).squeeze(-1) - torch.logsumexp(scores, dim=-1)
                out_lp[live, t] = lp.masked_fill(done, 0.0)
        tokens = tokens.masked_fill(done, pad_id)  # rows that ended write padding
        out[live, t] = tokens
        done = done | torch.isin(tokens, eos)
        n_running = int((~done).sum())
        if n_running == 0 or t == max_new_tokens - 1:
            break
        if n_running <= compact_below * live.numel():  # drop the finished rows from the batch and the cache
            keep = (~done).nonzero().squeeze(-1)
            cache.batch_select_indices(keep)
            live, tokens, done = live[keep], tokens[keep], done[keep]
            full_mask, next_pos = full_mask[keep], next_pos[keep]
        logits = model(input_ids=tokens[:, None], attention_mask=full_mask[:, :width + t + 1],
                       position_ids=(next_pos + t)[:, None], **{cache_kw: cache},
                       use_cache=True).logits[:, -1].float()
    return out.cpu(), (out_lp.cpu() if logprobs else None)
