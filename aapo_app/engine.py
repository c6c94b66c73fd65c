"""The DeepSpeed side: distributed set-up, the policy's hybrid engine and the frozen reference.

The policy is one DeepSpeed engine (ZeRO-3 by default) that switches between two modes:

* **generation mode** (:meth:`ZeroModel.generation_mode`): all ranks gather the partitioned
  parameters together (``deepspeed.zero.GatheredParameters``), and each rank samples on a plain
  module that *shares* the gathered storage (no copy, no ZeRO hooks on the hot path, KV cache on).
  On exit the plain module lets go of the tensors and ZeRO-3 re-partitions them, so the full
  weights live only while sampling. With ``rollout.gather=layerwise`` the partitioned model itself
  generates with ``synced_gpus=True``: ZeRO-3 gathers one layer at a time (slow, but the whole
  model never has to fit on one rank).
* **training mode**: ``train()``, optional gradient checkpointing, forward/backward/step.

The reference is a second ZeRO-3 engine with no optimizer and ``requires_grad=False`` weights; it
samples (AAPO's reference group) and scores log-probs (KL baselines) through the same code.
"""

from __future__ import annotations

import contextlib
import os
import socket
from datetime import timedelta

import torch
import torch.nn as nn

from aapo_app.errors import AapoError

os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")

# ---------------------------------------------------------------------------------------------
# distributed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launched_world_size() -> int:
    """The world :func:`init_distributed` joins: the launcher's WORLD_SIZE, else 1 (known before it runs)."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 1
    return int(os.environ["WORLD_SIZE"])


def _skip_cpu_shm_comm_op() -> None:
    """Tell DeepSpeed not to build its shared-memory communication op on the CPU accelerator.

    DeepSpeed's ``TorchBackend`` builds it at every start (``deepspeed.comm.torch.build_shm_op``):
    a C++ extension compiled on the machine's first run (about 45 s on 2 cores, and a C++
    compiler needed), then a "DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built
    successfully" line printed to stdout on every run. Its only user is DeepSpeed's
    tensor-parallel inference all-reduce (``inference_all_reduce``, AutoTP); aapo's ZeRO-3
    engines communicate through ``torch.distributed`` only, so nothing aapo runs uses it at any
    world size. DeepSpeed has no setting for it: it builds the op when its table of compatible
    ops says it can, so the op is marked incompatible there."""
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu":
        return
    import deepspeed.ops

    builder = get_accelerator().get_op_builder("ShareMemCommBuilder")
    compatible = getattr(deepspeed.ops, "__compatible_ops__", None)
    if builder is not None and isinstance(compatible, dict):
        compatible[builder.NAME] = False


def init_distributed() -> tuple[int, int]:
    """Join the process group the launcher (deepspeed/torchrun) set up, or make a 1-rank one."""
    import deepspeed
    import torch.distributed as dist

    from aapo_app.third_party import ignore_third_party_warnings

    ignore_third_party_warnings()  # DeepSpeed's ZeRO-3 collectives call torch APIs deprecated in 2.13
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        _skip_cpu_shm_comm_op()
        deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(minutes=30))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return dist.get_rank(), dist.get_world_size()


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(values: list[float]) -> list[float]:
    return _all_reduce(values, "SUM")


def all_reduce_max(values: list[float]) -> list[float]:
    """The largest of each value over the ranks (``-all_reduce_max([-x])`` is the smallest)."""
    return _all_reduce(values, "MAX")


def _all_reduce(values: list[float], op: str) -> list[float]:
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device())
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=getattr(dist.ReduceOp, op))
    return t.tolist()


def broadcast_object(obj):
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_rank0(fn):
    """Run ``fn()`` on rank 0 only and give every rank its result. An :class:`AapoError` raised there
    is raised on every rank, so that no rank is left waiting in a later collective."""
    import torch.distributed as dist

    result = None
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            result = fn()
        except AapoError as exc:
            result = exc
    result = broadcast_object(result)
    if isinstance(result, AapoError):
        raise result
    return result


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


# ---------------------------------------------------------------------------------------------
# a plain module sharing the gathered weights


def _set_tensor(root: nn.Module, name: str, tensor: torch.Tensor, is_param: bool) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = root.get_submodule(owner_name) if owner_name else root
    if is_param:
        owner._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
    else:
        owner._buffers[leaf] = tensor


class SharedView:
    """A plain copy of a model's *structure* whose tensors are pointed at another module's storage.

    Built once on the meta device (no memory), then :meth:`attach` points every parameter and
    buffer at the source module's current ``.data`` (the gathered ZeRO-3 tensors) and
    :meth:`detach` drops those references again so ZeRO-3 can free them.
    """

    def __init__(self, source: nn.Module):
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            self.module = AutoModelForCausalLM.from_config(source.config)
            if getattr(source, "peft_config", None):  # LoRA: the same adapters, so that the names match
                from peft import inject_adapter_in_model

                for name, config in source.peft_config.items():
                    inject_adapter_in_model(config, self.module, adapter_name=name)
        self.module.eval()
        # kept so that save_pretrained writes the model's generation_config.json into checkpoints;
        # generate never reads it (aapo_app.rollout.generate_in_mode passes our settings only)
        self.module.generation_config = source.generation_config
        self._source = source

    def attach(self) -> nn.Module:
        src = self._source
        for name, p in src.named_parameters(remove_duplicate=False):
            _set_tensor(self.module, name, p.data, is_param=True)
        for name, b in src.named_buffers(remove_duplicate=False):
            _set_tensor(self.module, name, b, is_param=False)
        # plain tensor attributes (e.g. rotary `original_inv_freq`) are neither params nor buffers
        for name, sub in src.named_modules():
            view_sub = self.module.get_submodule(name) if name else self.module
            for attr, value in vars(sub).items():
                if isinstance(value, torch.Tensor) and not attr.startswith("_"):
                    setattr(view_sub, attr, value)
        return self.module

    def detach(self) -> None:
        for name, p in self.module.named_parameters(remove_duplicate=False):
            _set_tensor(self.module, name, torch.empty_like(p, device="meta"), is_param=True)


# ---------------------------------------------------------------------------------------------
# the engines


# architectures for which DeepSpeed's hybrid engine has inference containers: OPT, BLOOM, GPT-J,
# GPT-Neo, GPT-NeoX, LLaMA and InternLM (Qwen2 is not among them)
HYBRID_ENGINE_MODEL_TYPES = ("opt", "bloom", "gptj", "gpt_neo", "gpt_neox", "llama", "internlm")


def check_hybrid_engine(config=None) -> None:
    """DeepSpeed's own hybrid engine: CUDA inference kernels for a few architectures only. Seen on
    an H100 with DeepSpeed 0.19.8: its LLaMA container cannot hold grouped-query attention (the
    fused QKV weight assumes as many key/value heads as query heads), and with transformers 5 its
    transformer layer receives the hidden states as a tuple and fails. ``config=None`` checks only
    CUDA and the transformers version."""
    if not torch.cuda.is_available():
        raise AapoError("rollout.deepspeed_hybrid_engine=true needs CUDA (DeepSpeed's inference kernels); "
                        "set it to false to use aapo's own generation mode")
    import transformers

    if int(transformers.__version__.split(".")[0]) >= 5:
        raise AapoError("rollout.deepspeed_hybrid_engine: DeepSpeed's hybrid-engine containers do not fit "
                        f"transformers {transformers.__version__}'s decoder layers (seen failing on an H100); "
                        "set it to false (aapo's own generation mode) or use transformers 4.x")
    if config is None:
        return
    if config.model_type not in HYBRID_ENGINE_MODEL_TYPES:
        raise AapoError(f"rollout.deepspeed_hybrid_engine: DeepSpeed has no hybrid-engine kernels for "
                        f"'{config.model_type}' (only {', '.join(HYBRID_ENGINE_MODEL_TYPES)}); set it to false")
    heads, kv_heads = config.num_attention_heads, getattr(config, "num_key_value_heads", None)
    if kv_heads is not None and kv_heads != heads:
        raise AapoError(f"rollout.deepspeed_hybrid_engine: DeepSpeed's hybrid-engine kernels do not support "
                        f"grouped-query attention (num_key_value_heads={kv_heads} != num_attention_heads={heads}); "
                        f"set it to false")


@contextlib.contextmanager
def _no_hf_progress_bars():
    """transformers' progress bars off while inside (and back on after, if they were on)."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


class ZeroModel:
    """A causal LM inside a DeepSpeed engine, with a generation mode and log-prob scoring.

    ``trainable=True`` gives the policy (optimizer, scheduler, backward/step); ``False`` gives the
    frozen reference (a ZeRO inference engine: no optimizer, no gradients).
    """

    def __init__(self, model: nn.Module, ds_config: dict, trainable: bool, gather: str = "full",
                 gradient_checkpointing: bool = False, learning_rate: float = 1e-6, weight_decay: float = 0.0,
                 hybrid_engine: bool = False, max_out_tokens: int = 512, lr_schedule=None):
        """``lr_schedule``: the learning-rate factor of each optimizer step (0-based), e.g. a
        :class:`~aapo_app.ds_config.LRSchedule`, given to DeepSpeed as a client ``LambdaLR`` (a
        ``scheduler`` section in ``ds_config`` is not allowed with it); None: DeepSpeed's config decides."""
        import deepspeed

        self.hybrid_engine = hybrid_engine and trainable
        if self.hybrid_engine:
            check_hybrid_engine(model.config)
            ds_config = {**ds_config, "hybrid_engine": {
                "enabled": True, "max_out_tokens": max_out_tokens, "inference_tp_size": 1,
                "release_inference_cache": False, "pin_parameters": True, "tp_gather_partition_size": 8}}
        self.trainable = trainable
        self.gather = gather
        self.gradient_checkpointing = gradient_checkpointing
        self.stage = ds_config.get("zero_optimization", {}).get("stage", 0)
        if not trainable:
            model.requires_grad_(False)
            model.eval()
        elif gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        params = [p for p in model.parameters() if p.requires_grad] if trainable else None
        optimizer = None
        if trainable and "optimizer" not in ds_config:
            # torch's fused AdamW: no per-step temporaries the size of the model (DeepSpeed's
            # "torch_adam" builds the unfused one, 2-4x slower on CPU). A DeepSpeed "optimizer"
            # section (e.g. DeepSpeedCPUAdam for ZeRO-Offload) takes precedence.
            optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay,
                                          betas=(0.9, 0.999), eps=1e-8, fused=True)
        scheduler = None
        if trainable and lr_schedule is not None:
            if "scheduler" in ds_config:
                raise ValueError("lr_schedule and a DeepSpeed 'scheduler' section are exclusive")

            def lambda_lr(opt):  # DeepSpeed calls it with the optimizer it built (or ours)
                return torch.optim.lr_scheduler.LambdaLR(opt, lr_schedule)
            scheduler = lambda_lr
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, config=ds_config, model_parameters=None if optimizer else params, optimizer=optimizer,
            lr_scheduler=scheduler,
        )
        self.module = self.engine.module
        self._view = None
        if trainable:
            self.engine.train()
        else:
            self.engine.eval()

    # -- generation mode ----------------------------------------------------------------------
    @contextlib.contextmanager
    def generation_mode(self):
        """Yield a module to call ``generate`` on; returns to training mode afterwards."""
        import deepspeed

        self.engine.eval()
        try:
            if self.hybrid_engine:  # DeepSpeed's engine.eval() swapped in its kernels and patched generate
                yield self.module
            elif self.gather == "layerwise":
                use_cache = self.module.config.use_cache
                self.module.config.use_cache = True
                try:
                    yield self.module
                finally:
                    self.module.config.use_cache = use_cache
            else:
                if self._view is None:
                    self._view = SharedView(self.module)
                params = list(self.module.parameters())
                with deepspeed.zero.GatheredParameters(params, enabled=self.stage == 3):
                    try:
                        yield self._view.attach()
                    finally:
                        self._view.detach()
        finally:
            if self.trainable:  # the policy always goes back to training mode
                self.engine.train()

    def save_pretrained(self, path, tokenizer=None) -> None:
        """Write the full weights as a Hugging Face directory (rank 0 writes; every rank must call:
        gathering ZeRO-3 partitions is collective)."""
        import torch.distributed as dist

        rank = dist.get_rank() if dist.is_initialized() else 0
        with self.generation_mode() as module:
            if rank == 0:
                with _no_hf_progress_bars():  # its "Writing model shards" bar breaks into the step bar
                    module.save_pretrained(path)
                if tokenizer is not None:
                    tokenizer.save_pretrained(path)
        barrier()

    @property
    def synced_gpus(self) -> bool:
        """Layer-wise ZeRO-3 generation needs every rank to keep stepping until all are done."""
        import torch.distributed as dist

        per_layer = self.gather == "layerwise" or self.hybrid_engine
        return per_layer and self.stage == 3 and dist.is_initialized() and dist.get_world_size() > 1

    # -- scoring -----------------------------------------------------------------------------
    def completion_logprobs(self, sequences: torch.Tensor, attention_mask: torch.Tensor,
                            prompt_width: int, temperature: float, *, entropy: bool = False):
        """Log-probs ``[n, T_c]`` of the completion tokens under this model at ``temperature`` (and
        with ``entropy`` the token entropies, as a pair): :func:`completion_logprobs`.

        Runs through the engine (ZeRO-3 gathers per layer), so every rank must call it the same
        number of times. Gradients flow when the engine is trainable and grad mode is on.
        """
        return completion_logprobs(self.engine, sequences, attention_mask, prompt_width, temperature, entropy=entropy)


def _layer_groups(module: nn.Module) -> list[list[tuple[str, nn.Parameter]]]:
    """Parameters grouped by the top-level block they belong to: each ``...layers.<i>`` is one group,
    everything else (embeddings, final norm, lm_head) one group per parameter."""
    import re

    groups: dict[str, list] = {}
    for name, p in module.named_parameters():
        m = re.match(r"(.*?\.layers\.\d+)\.", name)
        groups.setdefault(m.group(1) if m else name, []).append((name, p))
    return list(groups.values())


def stream_full_parameter_groups(module: nn.Module, per: str = "layer"):
    """Yield lists of ``(name, full tensor)`` for every parameter of a (ZeRO-3 partitioned) module:
    one decoder layer's parameters per list (``per='layer'``) or one parameter (``per='param'``),
    gathered only while the list is in use, so the whole model is never unpartitioned at once; for
    pushing weights to an inference engine.

    Collective: every rank must iterate to the end in the same order (the gathers are
    all-gathers). A list's tensors are only valid until the next list is requested (their
    partitions are released then): copy or load them right away. Tied weights are yielded once."""
    import deepspeed

    if per not in ("layer", "param"):
        raise ValueError(f"per must be 'layer' or 'param' (got {per!r})")
    groups = _layer_groups(module) if per == "layer" else [[item] for item in module.named_parameters()]
    for group in groups:
        params = [p for _, p in group]
        with deepspeed.zero.GatheredParameters(params, enabled=hasattr(params[0], "ds_id")):
            yield [(name, p.data) for name, p in group]


def stream_full_parameters(module: nn.Module, per: str = "layer"):
    """:func:`stream_full_parameter_groups` one ``(name, full tensor)`` at a time; each tensor is
    only valid until the next group starts."""
    for group in stream_full_parameter_groups(module, per):
        yield from group


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that follow the attention mask (as ``generate`` does), so left padding does
    not shift the positions of real tokens."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


#: completion tokens whose logits exist at once in :func:`completion_logprobs` (fp32: tokens x vocabulary
#: x 4 bytes, e.g. 256 x 151,936 x 4 = 156 MB in the forward; the backward works on vocabulary blocks)
LOGITS_CHUNK_TOKENS = 256


#: vocabulary rows of the output layer's weight the backward works on at once
VOCAB_BLOCK = 8192


class _ChunkedHeadLogprobs(torch.autograd.Function):
    """log softmax(h W^T / T)[target] and the entropy of softmax(h W^T / T), for N rows of hidden
    states, computed ``chunk`` rows at a time so that no ``[N, V]`` logits tensor ever exists.

    The forward keeps only each row's log-sum-exp (and entropy). The backward goes over the
    vocabulary in blocks of :data:`VOCAB_BLOCK` rows of W and, inside each, over the chunks of
    rows, recomputing that block of logits (fp32) and applying the exact gradients
    d log p_y / dz = onehot(y) - p and d H / dz = -p (log p + H), with z = logits / T: the largest
    temporaries are ``chunk x VOCAB_BLOCK`` and ``VOCAB_BLOCK x H``, never ``V x H`` besides the
    weight's own gradient. Logits are computed in the weights' dtype and cast to fp32, as
    ``lm_head(h).float()`` would; gradients are accumulated in fp32."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, chunk, entropy):
        n = hidden.shape[0]
        logp = hidden.new_empty(n, dtype=torch.float32)
        ent = hidden.new_zeros(n, dtype=torch.float32)
        lse = hidden.new_empty(n, dtype=torch.float32)
        for s in range(0, n, chunk):
            z = _chunk_logits(hidden[s:s + chunk], weight, bias, temperature)  # [c, V] fp32
            lse[s:s + chunk] = torch.logsumexp(z, dim=-1)
            logp[s:s + chunk] = z.gather(-1, targets[s:s + chunk, None]).squeeze(-1) - lse[s:s + chunk]
            if entropy:  # -sum p log p over log p = z - lse (not lse - sum p z, which cancels in fp32)
                z -= lse[s:s + chunk, None]
                ent[s:s + chunk] = -(z.exp() * z).sum(-1)
            del z
        ctx.save_for_backward(hidden, weight, bias, targets, lse, ent)
        ctx.temperature, ctx.chunk, ctx.entropy = temperature, chunk, entropy
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        hidden, weight, bias, targets, lse, ent = ctx.saved_tensors
        T, chunk = ctx.temperature, ctx.chunk
        with_entropy = ctx.entropy and g_ent is not None and bool(g_ent.any())
        n, V = hidden.shape[0], weight.shape[0]
        d_hidden = hidden.new_zeros(hidden.shape, dtype=torch.float32) if ctx.needs_input_grad[0] else None
        d_weight = torch.empty_like(weight) if ctx.needs_input_grad[1] else None
        d_bias = torch.empty_like(bias) if bias is not None and ctx.needs_input_grad[2] else None
        for v0 in range(0, V, VOCAB_BLOCK):
            w = weight[v0:v0 + VOCAB_BLOCK]
            b = bias[v0:v0 + VOCAB_BLOCK] if bias is not None else None
            dw = w.new_zeros(w.shape, dtype=torch.float32) if d_weight is not None else None
            db = w.new_zeros(w.shape[0], dtype=torch.float32) if d_bias is not None else None
            for s in range(0, n, chunk):
                h = hidden[s:s + chunk]
                logp_b = _chunk_logits(h, w, b, T).sub_(lse[s:s + chunk, None])  # [c, block] log p
                p = logp_b.exp()
                dz = p * (-g_logp[s:s + chunk, None])
                t = targets[s:s + chunk] - v0
                hit = ((t >= 0) & (t < w.shape[0])).nonzero().squeeze(-1)  # rows whose target is in the block
                dz[hit, t[hit]] += g_logp[s:s + chunk][hit]
                if with_entropy:
                    dz -= g_ent[s:s + chunk, None] * p * (logp_b + ent[s:s + chunk, None])
                del logp_b, p
                d_raw = (dz / T).to(weight.dtype)  # the gradient of lm_head's output in its own dtype
                if d_hidden is not None:
                    d_hidden[s:s + chunk] += (d_raw @ w).float()
                if dw is not None:
                    dw += (d_raw.t() @ h).float()
                if db is not None:
                    db += d_raw.float().sum(0)
            if d_weight is not None:
                d_weight[v0:v0 + VOCAB_BLOCK] = dw.to(weight.dtype)
            if d_bias is not None:
                d_bias[v0:v0 + VOCAB_BLOCK] = db.to(bias.dtype)
        if d_hidden is not None:
            d_hidden = d_hidden.to(hidden.dtype)
        return d_hidden, d_weight, d_bias, None, None, None, None


def _chunk_logits(h, weight, bias, temperature):
    z = h @ weight.t()
    if bias is not None:
        z = z + bias
    return z.float() / temperature


@contextlib.contextmanager
def _head_computes_logprobs(model, rows: torch.Tensor, cols: torch.Tensor, targets: torch.Tensor,
                            out_shape: tuple[int, int], out_cols: torch.Tensor, temperature: float, chunk: int,
                            entropy: bool):
    """While the model runs, its output layer (``lm_head``) returns ``[n, T_c, 2]`` (log-prob of the
    target, entropy) for the completion tokens instead of logits: completion token ``out_cols[k]``
    of row ``rows[k]`` is ``targets[k]``, predicted by the hidden state at ``[rows[k], cols[k]]`` of
    the layer's input. The layer is still called once, as a module, so ZeRO-3 gathers its weight for
    the forward and again for the backward as it does for any layer."""
    head = getattr(model, "module", model).get_output_embeddings()

    def forward(hidden):
        out = hidden.new_zeros(*out_shape, 2, dtype=torch.float32)
        logp, ent = _ChunkedHeadLogprobs.apply(hidden[rows, cols], head.weight, head.bias, targets,
                                               float(temperature), chunk, entropy)
        return out.index_put((rows, out_cols), torch.stack([logp, ent], dim=-1))

    head.forward = forward  # an instance attribute: shadows the class's forward for this call only
    try:
        yield
    finally:
        del head.forward


def pack_left(sequences: torch.Tensor, attention_mask: torch.Tensor, prompt_width: int):
    """Left-padded prompt + completion rows ``[n, T]`` as rows that start at column 0 (prompt, then
    completion, then padding): ``(sequences, attention_mask, starts)`` with ``starts [n]`` each row's
    completion column, for :func:`completion_logprobs`. Saves the prompt-side padding of rows whose
    prompts differ in length."""
    n = sequences.shape[0]
    prompt_lengths = attention_mask[:, :prompt_width].sum(dim=1)
    lengths = attention_mask.sum(dim=1)
    width = int(lengths.max()) if n else 0
    packed = sequences.new_full((n, width), 0)
    packed_mask = torch.zeros((n, width), dtype=attention_mask.dtype, device=attention_mask.device)
    for i in range(n):
        row = sequences[i][attention_mask[i].bool()]
        packed[i, :row.numel()] = row
        packed_mask[i, :row.numel()] = True
    return packed, packed_mask, prompt_lengths


def completion_logprobs(model, sequences: torch.Tensor, attention_mask: torch.Tensor, prompt_width,
                        temperature: float, *, entropy: bool = False, chunk: int = LOGITS_CHUNK_TOKENS):
    """Per-token log pi(o_t | q, o_<t) ``[n, T_c]`` of the completion part of ``sequences`` (0 where the
    completion is padding), from logits / T; with ``entropy``, also the entropy of pi(. | q, o_<t)
    ``[n, T_c]``, returned as a pair.

    ``sequences`` is ``[n, T]`` = left-padded prompt (width ``prompt_width``) + completion, or, with
    ``prompt_width`` a ``[n]`` tensor (:func:`pack_left`), each row's prompt and completion side by
    side from column 0 and padded on the right, the row's completion starting at its
    ``prompt_width``: no prompt-side padding. Position ids follow the attention mask, as in
    ``generate``, so padding does not shift positions. The output layer works on ``chunk``
    completion tokens at a time (fp32), so the memory of the logits is ``chunk x V`` instead of
    ``n x T_c x V``; gradients are exact (see :class:`_ChunkedHeadLogprobs`)."""
    mask = attention_mask.long()
    if isinstance(prompt_width, torch.Tensor):  # packed rows: completions start at different columns
        starts = prompt_width.to(sequences.device).long()
        lengths = mask.sum(dim=1) - starts  # [n]
        width_c = int(lengths.max()) if lengths.numel() else 0
        valid = torch.arange(width_c, device=sequences.device)[None] < lengths[:, None]  # [n, T_c]
        rows, out_cols = valid.nonzero(as_tuple=True)
        cols = starts[rows] + out_cols - 1  # the position that predicts the token
        keep = 0  # every position reaches the output layer (it reads only the ones it needs)
    else:
        width_c = sequences.shape[1] - prompt_width
        valid = attention_mask[:, prompt_width:].bool()
        rows, out_cols = valid.nonzero(as_tuple=True)
        cols = out_cols  # the layer sees the last T_c + 1 positions: position t predicts completion token t
        keep = width_c + 1
    first = sequences.shape[1] - keep if keep else 0  # the sequence column of the layer's first input position
    targets = sequences[rows, first + cols + 1]
    with _head_computes_logprobs(model, rows, cols, targets, (sequences.shape[0], width_c), out_cols, temperature,
                                 max(int(chunk), 1), entropy):
        out = model(input_ids=sequences, attention_mask=mask, position_ids=position_ids(mask), use_cache=False,
                    logits_to_keep=keep)
    result = out.logits  # [n, T_c, 2]
    return (result[..., 0], result[..., 1]) if entropy else result[..., 0]
