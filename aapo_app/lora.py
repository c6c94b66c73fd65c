"""LoRA (``model.lora``): adapters trained on a frozen base, and the base itself as AAPO's reference.

With ``model.lora.rank`` > 0 the policy is the model at ``model.path`` with low-rank adapters injected
by ``peft`` into its linear layers (``model.lora.target_modules``); only the adapters are trainable,
so DeepSpeed keeps optimizer state (and gradients) for them alone. The reference model is the
frozen starting model, which is exactly the policy with its adapters switched off. So, by default
(``model.lora.reference=base``):

* AAPO's reference group is sampled by the policy's own generator with the adapters disabled
  (:class:`BaseGenerator`): same engine, same gathered weights, same sampling settings and seeds;
* the KL baselines' reference log-probs come from the policy engine with the adapters disabled
  (:class:`BaseScorer`).

No second copy of the weights, no second engine. ``model.lora.reference=engine`` builds the separate
frozen reference engine as without LoRA.

A LoRA checkpoint holds the adapter (``adapter_config.json`` + ``adapter_model.safetensors``, loadable
by ``peft``) and the DeepSpeed state of the adapter parameters (their fp32 master weights and
optimizer moments) only; the base weights are read from ``model.path`` again on resume.
``aapo export`` writes either the merged model or the adapter (:func:`export_lora`).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from aapo_app.errors import AapoError

#: the linear layers of Llama/Qwen/Mistral-style decoders: attention and MLP projections
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
#: the key prefix of a PeftModel's saved adapter weights (PeftModel -> LoraModel -> the transformers model)
PEFT_PREFIX = "base_model.model."
ADAPTER_NAME = "default"


def _f(default, help: str):
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class LoraSettings:
    """``model.lora``: low-rank adapters on a frozen base (rank 0: off, the whole model is trained)."""

    rank: int = _f(0, "LoRA rank r (0 = off: full fine-tune); with r > 0 only the adapters are trained and the "
                      "base is the reference (docs/lora.md)")
    alpha: float = _f(0.0, "LoRA alpha; the adapter's output is scaled by alpha / rank (0 = 2 x rank)")
    dropout: float = _f(0.0, "dropout on the adapters' input in the update (0 keeps the update's log-probs those of "
                             "the sampler)")
    target_modules: list = _f([], "names of the linear layers that get adapters (empty = "
                                  + ", ".join(DEFAULT_TARGET_MODULES) + ", the Llama/Qwen projections)")
    reference: Literal["base", "engine"] = _f(
        "base", "with LoRA: 'base' = the reference is the policy with its adapters disabled (no second copy); "
                "'engine' = a separate frozen reference engine, as without LoRA")

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def targets(self) -> list[str]:
        return list(self.target_modules) or list(DEFAULT_TARGET_MODULES)

    @property
    def lora_alpha(self) -> float:
        return self.alpha or 2.0 * self.rank

    @property
    def base_is_reference(self) -> bool:
        return self.enabled and self.reference == "base"

    def validate(self) -> None:
        if self.rank < 0:
            raise AapoError(f"model.lora.rank must be >= 1 to train adapters, or 0 for a full fine-tune "
                            f"(got {self.rank})")
        if self.alpha < 0:
            raise AapoError(f"model.lora.alpha must be > 0 (or 0 for 2 x rank; got {self.alpha})")
        if not 0.0 <= self.dropout < 1.0:
            raise AapoError(f"model.lora.dropout must be in [0, 1) (got {self.dropout})")
        if not isinstance(self.target_modules, list) or not all(isinstance(t, str) and t for t in self.target_modules):
            raise AapoError(f"model.lora.target_modules must be a list of module names, e.g. [q_proj, v_proj] "
                            f"(got {self.target_modules!r})")
        if self.rank == 0:
            given = [k for k in ("alpha", "dropout", "target_modules")
                     if getattr(self, k) != getattr(LoraSettings(), k)]
            if given:
                raise AapoError(f"model.lora.rank=0 turns LoRA off but model.lora.{given[0]} is set; give "
                                f"model.lora.rank >= 1 (e.g. 16) to train adapters, or remove model.lora.{given[0]}")
        bad = [t for t in self.targets if t in OUTPUT_LAYERS]
        if bad:
            raise AapoError(f"model.lora.target_modules: '{bad[0]}' cannot take an adapter (aapo computes log-probs "
                            f"from the output layer's weight directly, and the embeddings are not linear layers); "
                            f"remove it")

    def peft_config(self, base_model: str | None = None):
        from peft import LoraConfig

        return LoraConfig(r=self.rank, lora_alpha=self.lora_alpha, lora_dropout=self.dropout,
                          target_modules=self.targets, bias="none", task_type="CAUSAL_LM",
                          base_model_name_or_path=base_model)

    def to_record(self) -> dict:
        """What a checkpoint records of the adapters (compared on resume)."""
        return {"rank": self.rank, "alpha": self.lora_alpha, "dropout": self.dropout, "target_modules": self.targets}


OUTPUT_LAYERS = ("lm_head", "embed_tokens", "wte", "embed_out")


# ---------------------------------------------------------------------------------------------
# building


def linear_names(model: torch.nn.Module) -> list[str]:
    """The last name component of every linear layer of ``model`` (what peft's target names match)."""
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D":
            names.add(name.rpartition(".")[2])
    return sorted(names)


def check_targets(model: torch.nn.Module, settings: LoraSettings) -> None:
    """One line naming a target module the model does not have, and the ones it has."""
    have = linear_names(model)
    missing = [t for t in settings.targets if t not in have]
    if missing:
        model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        choices = ", ".join(n for n in have if n not in OUTPUT_LAYERS)
        raise AapoError(f"model.lora.target_modules: '{missing[0]}' is not a linear layer of this {model_type} "
                        f"model; choose from {choices}")


def check_model_targets(model_dir: str, settings: LoraSettings) -> None:
    """:func:`check_targets` on the model's structure alone (built on the meta device from its
    config.json, no weights read); nothing to check when the directory has no config.json yet (a
    GGUF not converted: the check runs again when the engine is built)."""
    if not settings.enabled or not (Path(model_dir) / "config.json").is_file():
        return
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    check_targets(model, settings)


def apply_lora(model: torch.nn.Module, settings: LoraSettings, base_model: str | None = None) -> torch.nn.Module:
    """Inject the adapters into ``model`` in place (peft), freezing everything else; returns ``model``.
    The adapters start as peft initialises them: A random (the same on every rank, seeded by the
    caller), B zero, so the policy starts as the base model. Works on a ZeRO-3 partitioned model (the
    new adapter parameters are partitioned when DeepSpeed's engine is built) and on the meta device."""
    from peft import inject_adapter_in_model

    check_targets(model, settings)
    inject_adapter_in_model(settings.peft_config(base_model), model, adapter_name=ADAPTER_NAME)
    return model


def is_lora(module: torch.nn.Module) -> bool:
    return bool(getattr(module, "peft_config", None))


def _lora_layers(module: torch.nn.Module) -> list:
    from peft.tuners.lora import LoraLayer

    return [m for m in module.modules() if isinstance(m, LoraLayer)]


@contextlib.contextmanager
def adapters_disabled(module: torch.nn.Module):
    """Inside, every adapter of ``module`` is switched off: each adapted layer computes its base
    layer alone, exactly the base model. The adapter parameters' ``requires_grad`` is put back as it
    was on exit (peft's switch clears it)."""
    layers = _lora_layers(module)
    flags = [(p, p.requires_grad) for layer in layers for p in layer.parameters() if p is not None]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield module
    finally:
        for layer in layers:
            layer.enable_adapters(True)
        for p, flag in flags:
            p.requires_grad_(flag)


def adapter_parameters(module: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """The adapter parameters of ``module`` by name (``...lora_A.default.weight``)."""
    return [(n, p) for n, p in module.named_parameters() if ".lora_" in n]


def peft_key(name: str) -> str:
    """A module's adapter parameter name as peft saves it (``base_model.model.<name>`` without the
    adapter's name)."""
    return PEFT_PREFIX + name.replace(f".{ADAPTER_NAME}.", ".")


def gather_adapter_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full copies (CPU, their own dtype) of every adapter parameter, keyed as peft saves them,
    gathered from their ZeRO-3 partitions. Collective: every rank gets them."""
    import deepspeed

    named = adapter_parameters(module)
    params = [p for _, p in named]
    with deepspeed.zero.GatheredParameters(params, enabled=bool(params) and hasattr(params[0], "ds_id")):
        return {peft_key(n): p.data.detach().cpu().clone() for n, p in named}


def write_adapter(path: Path, state: dict[str, torch.Tensor], settings: LoraSettings, base_model: str | None) -> Path:
    """``path`` as a peft adapter directory: ``adapter_config.json`` and ``adapter_model.safetensors``
    (``PeftModel.from_pretrained(base, path)`` loads it)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    settings.peft_config(base_model).save_pretrained(str(path))
    save_file({k: v.contiguous() for k, v in state.items()}, str(path / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return path


def read_adapter(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """An adapter directory's config (as a dict) and weights."""
    from safetensors.torch import load_file

    path = Path(path)
    try:
        config = json.loads((path / ADAPTER_CONFIG).read_text())
        return config, load_file(str(path / ADAPTER_WEIGHTS))
    except (OSError, ValueError) as exc:
        raise AapoError(f"'{path}' holds no readable adapter ({ADAPTER_CONFIG}, {ADAPTER_WEIGHTS}: {exc}); "
                        f"export another step") from exc


def is_adapter_dir(path: Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def save_adapter_checkpoint(policy, path: Path, tokenizer, settings: LoraSettings, base_model: str) -> None:
    """The Hugging Face side of a LoRA checkpoint: the adapter (peft format) and the tokenizer,
    written by rank 0. Collective (the adapter parameters are gathered)."""
    import torch.distributed as dist

    from aapo_app.engine import barrier

    state = gather_adapter_state(policy.module)
    if not dist.is_initialized() or dist.get_rank() == 0:
        write_adapter(path, state, settings, base_model)
        if tokenizer is not None:
            tokenizer.save_pretrained(path)
    barrier()


def merged_model(base_dir: str, adapter_dir: Path, dtype=torch.float32):
    """The base model with the adapter at ``adapter_dir`` merged into its weights: a plain
    transformers model (peft's ``merge_and_unload``)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
    try:
        model = PeftModel.from_pretrained(base, str(adapter_dir))
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise AapoError(f"the adapter in '{adapter_dir}' does not fit the base model '{base_dir}' "
                        f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from exc
    return model.merge_and_unload()


def base_model_of(adapter_dir: Path) -> str:
    """The base model an adapter was trained on (its ``base_model_name_or_path``), resolved."""
    from aapo_app.models import resolve_model_path

    config, _ = read_adapter(adapter_dir)
    base = config.get("base_model_name_or_path")
    if not base:
        raise AapoError(f"'{adapter_dir}/{ADAPTER_CONFIG}' names no base model (base_model_name_or_path); "
                        f"merge it with peft yourself")
    return resolve_model_path(base)


# ---------------------------------------------------------------------------------------------
# the base as the reference


class BaseScorer:
    """The KL baselines' reference log-probs from the policy engine with its adapters disabled, in
    eval mode (no dropout), without gradients: exactly the frozen base model's."""

    def __init__(self, policy):
        self.policy = policy

    @torch.no_grad()
    def completion_logprobs(self, sequences, attention_mask, prompt_width, temperature, *, entropy=False):
        from aapo_app.engine import completion_logprobs

        engine = self.policy.engine
        was_training = engine.training
        engine.eval()
        try:
            with adapters_disabled(self.policy.module):
                return completion_logprobs(engine, sequences, attention_mask, prompt_width, temperature,
                                           entropy=entropy)
        finally:
            if was_training:
                engine.train()


class BaseGenerator:
    """AAPO's reference group from the policy's own generator with the adapters disabled: the same
    engine (and, inside the policy's session, the same gathered weights), the same sampling code;
    only the adapters are off. For a vLLM policy engine with LoRA, the request goes without its
    adapter (:class:`aapo_app.vllm_engine.ColocatedVLLM` with ``lora``)."""

    def __init__(self, policy):
        self.policy = policy
        self.tokenizer = policy.tokenizer
        self.eos_ids = policy.eos_ids
        self.max_model_len = policy.max_model_len

    @property
    def source(self) -> str:
        return f"{self.policy.source}-adapters-off"

    @contextlib.contextmanager
    def session(self):
        with self.policy.session():
            yield self

    def weights_changed(self) -> None:
        """The base never changes."""

    def sample(self, prompt_ids, prompt_mask, *, num_samples, sampling, seed):
        from aapo_app.generation import DeepSpeedGenerator

        with self.policy.session():
            if isinstance(self.policy, DeepSpeedGenerator):
                with adapters_disabled(self.policy._module):
                    return self.policy.sample(prompt_ids, prompt_mask, num_samples=num_samples, sampling=sampling,
                                              seed=seed)
            return self.policy.sample(prompt_ids, prompt_mask, num_samples=num_samples, sampling=sampling, seed=seed,
                                      adapter=False)


# ---------------------------------------------------------------------------------------------
# vLLM: adapter-only sync


#: the LoRA ranks vLLM's kernels are built for (its ``max_lora_rank`` must be one of them)
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


def vllm_max_lora_rank(rank: int) -> int:
    """The smallest rank vLLM accepts as ``max_lora_rank`` that holds ``rank``."""
    for r in VLLM_LORA_RANKS:
        if r >= rank:
            return r
    raise AapoError(f"model.lora.rank={rank}: vLLM serves LoRA ranks up to {VLLM_LORA_RANKS[-1]}; lower it or use "
                    f"rollout.backend=deepspeed")


class AdapterPublisher:
    """Writes the trainer's current adapter for an inference engine after each change: version ``v``
    goes to ``<root>/v<v>`` (peft format) and is named ``(aapo-policy-v<v>, v, path)``, the
    ``LoRARequest`` a vLLM engine loads it by (a new id per version: vLLM caches adapters by id). The
    previous versions' directories are deleted once a newer one is written. Collective (the adapter
    parameters are gathered on every rank; every rank writes its own copy for its own engine)."""

    def __init__(self, root: Path, settings: LoraSettings, base_model: str | None):
        self.root, self.settings, self.base_model = Path(root), settings, base_model
        self.version = 0
        self.published: tuple[str, int, str] | None = None

    def publish(self, module) -> tuple[str, int, str]:
        import shutil

        state = gather_adapter_state(module)
        self.version += 1
        path = write_adapter(self.root / f"v{self.version}", state, self.settings, self.base_model)
        for old in self.root.glob("v*"):
            if old != path and old.name[1:].isdigit() and int(old.name[1:]) < self.version:
                shutil.rmtree(old, ignore_errors=True)
        self.published = (f"aapo-policy-v{self.version}", self.version, str(path))
        return self.published


# ---------------------------------------------------------------------------------------------
# checkpoints and export


def check_checkpoint_matches(state: dict, settings: LoraSettings, where: str) -> None:
    """A LoRA checkpoint resumes only into a run with the same adapters (and a full one only without)."""
    saved = state.get("lora")
    if saved and not settings.enabled:
        raise AapoError(f"{where}: the checkpoint holds LoRA adapters (rank {saved.get('rank')}) and no full weights; "
                        f"resume with the run's model.lora settings (model.lora.rank={saved.get('rank')})")
    if settings.enabled and not saved:
        raise AapoError(f"{where}: the checkpoint holds full weights, not LoRA adapters; resume without "
                        f"model.lora.rank (a LoRA run must start from step 0)")
    if saved and saved != settings.to_record():
        raise AapoError(f"{where}: the checkpoint's adapters ({saved}) differ from model.lora "
                        f"({settings.to_record()}); resume with the run's own model.lora settings")


def export_lora(ckpt: Path, out_dir: Path, what: str, target_dtype, base_model: str) -> tuple[object, str]:
    """A LoRA checkpoint's model for ``aapo export``: the adapter from the DeepSpeed state (fp32
    master weights merged from the ZeRO partitions) and either merged into the base (``what='merged'``:
    a transformers model) or alone (``'adapter'``: a PeftModel whose ``save_pretrained`` writes the
    adapter). Returns the model to save and a description of its source."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from peft import PeftModel, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    from aapo_app.models import resolve_model_path

    config, _ = read_adapter(ckpt)
    try:
        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt / "deepspeed"), tag="state",
                                                         exclude_frozen_parameters=True)
    except Exception as exc:  # a damaged or partial checkpoint
        raise AapoError(f"cannot merge the ZeRO partitions in '{ckpt / 'deepspeed'}' ({type(exc).__name__}: {exc}); "
                        f"export another step") from exc
    adapter = {peft_key(k): v for k, v in state.items() if ".lora_" in k}
    if not adapter:
        raise AapoError(f"the DeepSpeed state in '{ckpt / 'deepspeed'}' holds no adapter parameters; export another step")
    base_dir = resolve_model_path(base_model)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    from peft import LoraConfig

    peft_config = LoraConfig.from_pretrained(str(ckpt))
    peft_config.base_model_name_or_path = config.get("base_model_name_or_path") or base_model
    model = PeftModel(base, peft_config)
    result = set_peft_model_state_dict(model, adapter)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise AapoError(f"the adapter in '{ckpt}' does not fit the base model '{base_model}' "
                        f"(unexpected {unexpected[:3]})")
    source = "deepspeed (fp32 adapter master weights merged from the ZeRO partitions)"
    if what == "merged":
        merged = model.merge_and_unload().to(target_dtype)
        return merged, source + f", merged into {base_model}"
    return model.to(target_dtype), source


def check_lora_run(cfg) -> None:
    """Settings that cannot go with LoRA (one line each)."""
    if not cfg.model.lora.enabled:
        return
    if cfg.rollout.deepspeed_hybrid_engine:
        raise AapoError("model.lora: DeepSpeed's hybrid engine kernels do not run peft's adapters; set "
                        "rollout.deepspeed_hybrid_engine=false")
    if cfg.rollout.backend == "vllm" and cfg.vllm.mode == "server":
        raise AapoError("model.lora with vllm.mode=server is not implemented (adapters are pushed to a colocated "
                        "engine only); use vllm.mode=colocate or rollout.backend=deepspeed")


def lora_base_model(step_dir: Path) -> str:
    """The ``model.path`` a LoRA checkpoint's adapter belongs on ('' for a full checkpoint)."""
    if not is_adapter_dir(step_dir):
        return ""
    from aapo_app.checkpoint import read_state

    try:
        return str(read_state(Path(step_dir))["config"]["model"]["path"])
    except (KeyError, TypeError):
        config, _ = read_adapter(step_dir)
        return str(config.get("base_model_name_or_path") or "")


def merge_for_eval(spec, root: Path, rank: int) -> str:
    """A LoRA checkpoint as a plain model directory for ``aapo eval --run``: rank 0 merges the adapter
    into the base model (the checkpoint's own adapter files, fp32) and writes it under ``root``, with
    the checkpoint's tokenizer. Collective; the caller deletes the directory after the evaluation."""
    from aapo_app.engine import barrier, on_rank0
    from aapo_app.models import resolve_model_path

    out = Path(root) / spec.label.replace("/", "_")

    def write() -> str:
        from transformers import AutoTokenizer

        base_dir = resolve_model_path(spec.base_model)
        model = merged_model(base_dir, Path(spec.path))
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out)
        AutoTokenizer.from_pretrained(spec.path).save_pretrained(out)
        with contextlib.suppress(OSError):
            from transformers import GenerationConfig

            GenerationConfig.from_pretrained(base_dir).save_pretrained(out)
        return str(out)

    path = on_rank0(write)
    barrier()
    return path
