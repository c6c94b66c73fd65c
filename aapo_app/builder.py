"""Setting up a run, in one place for every command (``aapo train``, ``aapo eval``,
``aapo check-config``, ``aapo reference-rollouts``).

The order is always the same:

1. :func:`plan_run`: everything user input can get wrong, checked before the process group starts
   and before any (slow) engine exists: the DeepSpeed configs filled for the world size, the
   algorithm, the model path, the backends this machine must offer, the data and its prompt count.
   ``aapo check-config`` stops here (for any world size, without a GPU).
2. :func:`open_model`: the model resolved rank 0 first (a GGUF is converted once), its tokenizer,
   context length and EOS tokens. :func:`check_prompt_lengths` then measures the rendered prompts.
3. The engines and generators: :func:`build_training` (policy, reference, the rollout generators
   and the reference cache), :func:`eval_generator`, :func:`reference_rollout_generator`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from aapo_app.errors import AapoError


@dataclass
class Plan:
    """A checked run configuration, ready to build (see :func:`plan_run`)."""

    cfg: object  # RunConfig
    algorithm: object
    ds_policy: dict
    ds_ref: dict
    train_examples: list
    eval_examples: list
    world: int
    precision: object = None  # PrecisionChoice: what the engines compute in, and why
    tis: str | None = None  # truncated importance sampling: "token", "sequence" or None (tis_level)
    notes: list[str] = field(default_factory=list)  # checks that could not run here (check-config)


def plan_run(cfg, ds_config: str | None = None, ref_ds_config: str | None = None, *, world: int | None = None,
             here: bool = True) -> Plan:
    """Check a run configuration for ``world`` ranks (default: the launcher's). ``here=False``
    (check-config for a cluster): checks that depend on this machine (CUDA, vLLM installed) become
    notes instead of errors."""
    from aapo_app.algorithms import build_algorithm
    from aapo_app.data import load_examples
    from aapo_app.ds_config import DEFAULT_POLICY_CONFIG, DEFAULT_REFERENCE_CONFIG, fill_ds_config, read_ds_config
    from aapo_app.engine import launched_world_size
    from aapo_app.models import resolve_model_path
    from aapo_app.precision import leaves_precision_to_the_run, resolve_precision

    world = launched_world_size() if world is None else world
    if world < 1:
        raise AapoError(f"--world-size must be >= 1 (got {world})")
    raw_policy = read_ds_config(ds_config, DEFAULT_POLICY_CONFIG)
    precision = resolve_precision(cfg.precision, raw_policy, probe=here)
    ds_policy = fill_ds_config(raw_policy, cfg, world, precision=precision)
    ds_ref = fill_ds_config(read_ds_config(ref_ds_config, DEFAULT_REFERENCE_CONFIG, option="--ref-ds-config"), cfg,
                            world, training=False, precision=precision)
    algorithm = build_algorithm(cfg.algorithm.name, cfg.algorithm.params)
    model_dir = resolve_model_path(cfg.model.path, convert=False)
    if cfg.model.lora.enabled:
        from aapo_app.lora import check_model_targets

        check_model_targets(model_dir, cfg.model.lora)
    tis = tis_level(cfg, algorithm, precision)
    notes = _check_machine(cfg, algorithm, here, tis)
    if not here and cfg.precision == "auto" and leaves_precision_to_the_run(raw_policy):
        notes.append("precision=auto is decided on the machine that runs: bf16 on a GPU or a CPU with AMX / "
                     "AVX512-BF16, fp32 elsewhere")
    train, held_out = load_examples(cfg.data, cfg.train.seed)
    per_step = cfg.rollout.prompts_per_rank * world
    if len(train) < per_step:
        raise AapoError(f"data: {len(train)} training prompts but a step takes {per_step} "
                        f"(rollout.prompts_per_rank x {world} ranks); add data or lower rollout.prompts_per_rank")
    notes += conflicting_duplicates(list(train) + list(held_out))
    return Plan(cfg, algorithm, ds_policy, ds_ref, train, held_out, world, precision,
                tis, notes)


def tis_level(cfg, algorithm, precision) -> str | None:
    """Truncated importance sampling for this run: ``"token"``/``"sequence"``, or None.

    ``algorithm.tis=auto`` turns it on where the sampler's log-probs differ from the trainer's forward
    and the sampler reports them: vLLM, and bf16 rollouts on aapo's decoding loop (an incremental
    decode with a key/value cache rounds differently in bf16 from the full forward that scores the same
    tokens). An explicit ``token``/``sequence`` needs a sampler that reports its log-probs."""
    r = cfg.rollout
    vllm = r.backend == "vllm"
    reports = vllm or (r.sampler == "aapo" and r.gather == "full" and not r.deepspeed_hybrid_engine)
    if algorithm.params.tis == "auto":
        low_precision = precision is not None and precision.name in ("bf16", "fp16")
        return algorithm.tis_level(off_trainer_sampler=vllm or (low_precision and reports))
    level = algorithm.tis_level(off_trainer_sampler=True)
    if level and not reports:
        why = ("rollout.sampler=hf" if r.sampler == "hf" else
               "rollout.gather=layerwise" if r.gather != "full" else "rollout.deepspeed_hybrid_engine")
        raise AapoError(f"algorithm.tis={level} needs the sampler's log-probs, which transformers' generate "
                        f"({why}) does not report; use rollout.sampler=aapo with rollout.gather=full, or set "
                        f"algorithm.tis=off")
    return level


def conflicting_duplicates(examples) -> list[str]:
    """A note when one problem text appears with different gold answers (kept as they are: which
    answer is right is the data's owner's call, and rewards then disagree for that problem)."""
    answers: dict[str, set] = {}
    for ex in examples:
        answers.setdefault(ex.problem.strip(), set()).add(str(ex.answer).strip())
    conflicts = [p for p, a in answers.items() if len(a) > 1]
    if not conflicts:
        return []
    return [f"data: {len(conflicts)} problem(s) appear more than once with different answers (e.g. "
            f"{conflicts[0][:40]!r}... with {sorted(answers[conflicts[0]])[:3]}); they are kept as they are, so the "
            f"same completion is graded differently: deduplicate the data to avoid it"]


def _check_machine(cfg, algorithm, here: bool, tis: str | None = None) -> list[str]:
    """The backends' needs: the configuration's own checks always, this machine's only ``here``."""
    from aapo_app.engine import check_hybrid_engine
    from aapo_app.vllm_engine import check_vllm_config, check_vllm_machine

    machine = []
    if cfg.rollout.deepspeed_hybrid_engine:
        machine.append(check_hybrid_engine)
    if cfg.rollout.backend == "vllm":
        check_vllm_config(cfg, algorithm)
        machine.append(lambda: check_vllm_machine(cfg.vllm))
    notes = []
    if tis and cfg.rollout.backend == "vllm" and cfg.vllm.mode == "server":
        notes.append(f"algorithm.tis={tis}: the policy's `vllm serve` must run with --logprobs-mode processed_logprobs "
                     f"(vLLM >= 0.10.2) so that it reports the log-probs of the distribution it samples from; the "
                     f"metric tis/logprob_abs_diff shows a mismatch")
    for check in machine:
        try:
            check()
        except AapoError as exc:
            if here:
                raise
            notes.append(f"not on this machine (needed where it runs): {exc}")
    return notes


# ---------------------------------------------------------------------------------------------
# the model


@dataclass
class ModelFiles:
    """A resolved model: the directory ``from_pretrained`` reads, its tokenizer, its context length
    and the tokens that end a completion (the tokenizer's EOS and the generation config's)."""

    path: str
    tokenizer: object
    max_positions: int | None
    eos_ids: list[int]


def open_model(spec: str, rank: int) -> ModelFiles:
    """Resolve ``spec`` on every rank, rank 0 first, and read what every command needs. Collective."""
    from transformers import AutoConfig

    from aapo_app.generation import checkpoint_eos_ids
    from aapo_app.models import load_tokenizer, resolve_model_path_rank0_first

    path = resolve_model_path_rank0_first(spec, rank)
    tokenizer = load_tokenizer(path)
    max_positions = getattr(AutoConfig.from_pretrained(path), "max_position_embeddings", None)
    return ModelFiles(path, tokenizer, max_positions, checkpoint_eos_ids(tokenizer, path))


def check_prompt_lengths(tokenizer, max_positions: int | None, cfg, train, held_out) -> int:
    """The longest rendered prompt in tokens, measured over every training and held-out prompt; one
    line naming the longest prompt (which set, which position) if it plus ``rollout.max_new_tokens``
    (or ``train.eval_max_new_tokens``) exceeds the model's context."""
    from aapo_app.data import PromptStyle

    style = PromptStyle(tokenizer, cfg.data)
    sets = {"training": list(train), "held-out": list(held_out)}
    measured = {name: style.lengths([style.render(ex.problem) for ex in examples]) for name, examples in sets.items()}
    if not any(measured.values()):
        return 0
    longest = max(max(lengths, default=0) for lengths in measured.values())
    if max_positions:
        keys = {"training": ("rollout.max_new_tokens", cfg.rollout.max_new_tokens),
                "held-out": ("train.eval_max_new_tokens", cfg.train.eval_max_new_tokens)}
        for name, lengths in measured.items():
            key, new = keys[name]
            over = [i for i, n in enumerate(lengths) if n + new > max_positions]
            if not over:
                continue
            worst = max(over, key=lambda i: lengths[i])
            raise AapoError(f"{key}={new}: with it {len(over)} {name} prompt(s) exceed the model's context of "
                            f"{max_positions} positions (the longest, id {sets[name][worst].id!r}, has "
                            f"{lengths[worst]} tokens); "
                            f"remove prompts longer than {max(max_positions - new, 0)} tokens or lower {key} to at most "
                            f"{max(max_positions - lengths[worst], 0)}")
    return longest


# ---------------------------------------------------------------------------------------------
# engines and generators


def deepspeed_generator(model, files: ModelFiles, rollout, role: str = "policy"):
    from aapo_app.generation import DeepSpeedGenerator

    return DeepSpeedGenerator(model, files.tokenizer, files.eos_ids, sampler=rollout.sampler,
                              chunk=rollout.generation_batch_size, role=role)


def reference_model(files: ModelFiles, ds: dict, gather: str = "full"):
    """The frozen reference: a ZeRO inference engine of the base weights (no optimizer)."""
    from aapo_app.engine import ZeroModel
    from aapo_app.models import load_causal_lm

    return ZeroModel(load_causal_lm(files.path, ds_config=ds), ds, trainable=False, gather=gather)


@dataclass
class TrainingParts:
    """What ``aapo train`` runs on: the engines, the generators of the two groups and the cache."""

    policy: object  # ZeroModel (trainable)
    reference: object | None  # ZeroModel of the frozen reference (KL log-probs), or with LoRA the base scorer
    generator: object  # Generator of the policy group and the held-out evaluation
    reference_generator: object | None  # Generator of the reference group (None: cached or unused)
    reference_cache: object | None


def build_training(plan: Plan, files: ModelFiles, rank: int, max_model_len: int) -> TrainingParts:
    """The policy engine, the frozen reference where the algorithm needs one (reference samples not
    read from a cache, or KL log-probs), and the generators: the DeepSpeed engines' generation
    mode, or vLLM engines (``rollout.backend=vllm``) that follow the policy's weights. Collective."""
    from aapo_app.ds_config import lr_schedule
    from aapo_app.engine import ZeroModel, on_rank0
    from aapo_app.models import load_causal_lm

    cfg, algorithm = plan.cfg, plan.algorithm
    cache = None
    if cfg.rollout.reference_cache and algorithm.uses_reference_samples:
        from aapo_app.reference_cache import ReferenceCache, fingerprint_components

        # rank 0 hashes the weights for the fingerprint; the other ranks need not read them again
        components = on_rank0(lambda: fingerprint_components(cfg, files.path, files.tokenizer))
        cache = ReferenceCache(cfg.rollout.reference_cache, components, files.tokenizer.pad_token_id)
    elif cfg.rollout.reference_cache:
        plan.notes.append(f"rollout.reference_cache is ignored: {cfg.algorithm.name} samples no reference group")

    ds = plan.ds_policy
    model = load_causal_lm(files.path, ds_config=ds)
    lora = cfg.model.lora
    if lora.enabled:  # adapters on the frozen base (aapo_app/lora.py); the same initial adapters on every rank
        from aapo_app.lora import apply_lora

        torch.manual_seed(cfg.train.seed)
        apply_lora(model, lora, cfg.model.path)
    policy = ZeroModel(model, ds, trainable=True, gather=cfg.rollout.gather,
                       gradient_checkpointing=cfg.model.gradient_checkpointing,
                       learning_rate=cfg.train.learning_rate, weight_decay=cfg.train.weight_decay,
                       hybrid_engine=cfg.rollout.deepspeed_hybrid_engine,
                       max_out_tokens=cfg.rollout.max_new_tokens + 1024,
                       lr_schedule=None if "scheduler" in ds else lr_schedule(cfg))
    samples_online = algorithm.uses_reference_samples and cache is None
    vllm = cfg.rollout.backend == "vllm"
    reference = None
    base_is_reference = lora.base_is_reference  # the policy with its adapters disabled is the reference
    if base_is_reference:
        from aapo_app.lora import BaseGenerator, BaseScorer

        reference = BaseScorer(policy) if algorithm.uses_reference_logprobs else None
    elif algorithm.uses_reference_logprobs or (samples_online and not vllm):
        reference = reference_model(files, plan.ds_ref, cfg.rollout.gather)
    if not vllm:
        generator = deepspeed_generator(policy, files, cfg.rollout)
        ref_generator = None
        if samples_online:
            ref_generator = (BaseGenerator(generator) if base_is_reference
                             else deepspeed_generator(reference, files, cfg.rollout, "reference"))
        return TrainingParts(policy, reference, generator, ref_generator, cache)

    from aapo_app.rollout import stream_seed
    from aapo_app.vllm_engine import build_engines

    r = cfg.rollout
    generator, ref_generator = build_engines(
        cfg.vllm, files.path, files.tokenizer, files.eos_ids, rank=rank,
        seed=stream_seed(cfg.train.seed, "vllm", rank), reference=samples_online and not base_is_reference,
        max_num_seqs=cfg.vllm.max_num_seqs or r.prompts_per_rank * r.group_size, max_model_len=max_model_len,
        lora=lora if lora.enabled else None)
    if samples_online and base_is_reference:  # the same vLLM engine, requests without the adapter
        ref_generator = BaseGenerator(generator)
    # building an engine reseeds python, numpy and torch: put the run's seeds back
    random.seed(cfg.train.seed)
    torch.manual_seed(cfg.train.seed)
    generator.follow(policy.module, ref_generator)
    return TrainingParts(policy, reference, generator, ref_generator, cache)


def eval_generator(backend: str, files: ModelFiles, ds_config: dict, *, seed: int, sampler: str = "aapo"):
    """``aapo eval``'s generator: a ZeRO-3 inference engine's generation mode (``hf``, the training
    rollouts' code path) or a vLLM engine on this rank's GPU (``vllm``; one seeded request per
    completion, so samples do not depend on batching)."""
    from types import SimpleNamespace

    if backend == "vllm":
        from aapo_app.vllm_engine import ColocatedVLLM

        return ColocatedVLLM(files.path, files.tokenizer, files.eos_ids, seed=seed, sleep_level=0,
                             gpu_memory_utilization=0.85, max_model_len=None, max_num_seqs=256, role="evaluation")
    model = reference_model(files, ds_config)
    return deepspeed_generator(model, files, SimpleNamespace(sampler=sampler, generation_batch_size=0), "evaluation")


def reference_rollout_generator(cfg, files: ModelFiles, ds: dict, rank: int, per_batch: int):
    """The generator ``aapo reference-rollouts`` samples a cache with: the DeepSpeed reference
    engine, one colocated vLLM engine per rank, or the reference server (never the policy's:
    :func:`aapo_app.reference_cache.check_server_source`)."""
    from aapo_app.rollout import stream_seed
    from aapo_app.vllm_engine import ColocatedVLLM, ServerVLLM

    r, v = cfg.rollout, cfg.vllm
    if r.backend != "vllm":
        return deepspeed_generator(reference_model(files, ds, r.gather), files, r, "reference")
    if v.mode == "server":
        return ServerVLLM(v.reference_url, files.tokenizer, files.eos_ids, push=False, rank=rank,
                          timeout_s=v.timeout_s, role="reference")
    return ColocatedVLLM(files.path, files.tokenizer, files.eos_ids,
                         seed=stream_seed(cfg.train.seed, "vllm-reference", rank), sleep_level=0,
                         gpu_memory_utilization=v.gpu_memory_utilization, max_model_len=None,
                         max_num_seqs=v.max_num_seqs or per_batch * r.group_size, dtype=v.dtype, role="reference")
