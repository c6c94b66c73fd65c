"""The run configuration: typed dataclasses, loaded from YAML/JSON plus ``key=value`` overrides.

Every field has a docstring-like ``help`` in its metadata (shown by ``aapo train --help-config``).
Loading is strict: an unknown key, a wrong type or an invalid value is an :class:`AapoError` that
names the field (``rollout.group_size``) and says how to fix it.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from aapo_app.algorithms import ALGORITHMS, DEFAULT_ALGORITHM, algorithm_params_class
from aapo_app.data import DataConfig, apply_data_preset
from aapo_app.errors import AapoError
from aapo_app.lora import LoraSettings, check_lora_run
from aapo_app.models import EMBEDDED_DEFAULT


def _f(default, help: str, **kw):
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class ModelConfig:
    """Which model to train; the frozen reference is a second copy of the same weights (with LoRA:
    the policy with its adapters disabled, docs/lora.md)."""

    path: str = _f(EMBEDDED_DEFAULT, "HF hub id, local HF directory, .gguf file, or the embedded SmolLM2-135M-Instruct")
    gradient_checkpointing: bool = _f(False, "recompute activations in the backward pass (training mode only)")
    lora: LoraSettings = field(default_factory=LoraSettings)

    def validate(self) -> None:
        if not self.path:
            raise AapoError(f"model.path is empty; give a model or '{EMBEDDED_DEFAULT}'")
        self.lora.validate()


@dataclass
class RolloutConfig:
    """Sampling settings, shared by the policy group and the reference group."""

    group_size: int = _f(8, "G: completions sampled per prompt from the policy (and G from the reference)")
    prompts_per_rank: int = _f(4, "prompts per optimizer step on each data-parallel rank; groups never span ranks")
    max_new_tokens: int = _f(32, "completion length limit; a completion that reaches it without EOS is truncated")
    temperature: float = _f(0.7, "sampling temperature; log-probs in the loss use logits / temperature too")
    top_p: float = _f(1.0, "nucleus sampling mass (1.0 = off)")
    top_k: int = _f(0, "top-k sampling (0 = off)")
    ignore_eos: bool = _f(
        False, "for speed benchmarks only: EOS is never drawn (its logit masked, as generate's min_new_tokens), so "
               "every completion has exactly max_new_tokens tokens; the samples then do not follow the policy")
    generation_batch_size: int = _f(0, "sequences per generation call (0 = all of a rank's prompts x G at once; "
                                       "sampler=aapo rounds it down to whole prompt groups)")
    sampler: Literal["aapo", "hf"] = _f(
        "aapo",
        "'aapo': aapo's decoding loop (one prefill per prompt, preallocated KV cache, finished sequences "
        "dropped; the same distribution as generate, faster); 'hf': transformers' generate. "
        "gather=layerwise and the DeepSpeed hybrid engine always use generate",
    )
    reference_cache: str = _f(
        "",
        "AAPO's reference group read from this directory, built once by `aapo reference-rollouts` and checked "
        "against this run's fingerprint; empty: sampled from the frozen reference every step, as in the paper",
    )
    gather: Literal["full", "layerwise"] = _f(
        "full",
        "'full': gather all ZeRO-3 partitions once and generate on a plain copy sharing them (fast); "
        "'layerwise': generate on the partitioned model, gathering one layer at a time (synced_gpus) "
        "for models too large to gather whole",
    )
    deepspeed_hybrid_engine: bool = _f(
        False, "use DeepSpeed's own hybrid engine kernels (only OPT/BLOOM/GPT-J/GPT-Neo(X)/LLaMA/InternLM)"
    )
    backend: Literal["deepspeed", "vllm"] = _f(
        "deepspeed",
        "who generates the rollouts: 'deepspeed' (the engine's generation mode, CPU or GPU) or 'vllm' "
        "(GPU; the vllm section); the held-out evaluation uses the same backend",
    )

    def validate(self) -> None:
        if self.group_size < 2:
            raise AapoError(
                f"rollout.group_size must be > 1 for group-relative advantages (got {self.group_size})"
            )
        _positive("rollout.prompts_per_rank", self.prompts_per_rank)
        _positive("rollout.max_new_tokens", self.max_new_tokens)
        if not self.temperature > 0:
            raise AapoError(f"rollout.temperature must be > 0 (got {self.temperature}); use a small value for near-greedy")
        if not 0 < self.top_p <= 1:
            raise AapoError(f"rollout.top_p must be in (0, 1] (got {self.top_p})")
        if self.top_k < 0 or self.generation_batch_size < 0:
            raise AapoError("rollout.top_k and rollout.generation_batch_size must be >= 0")
        if self.backend == "vllm" and (self.gather != "full" or self.deepspeed_hybrid_engine):
            raise AapoError("rollout.backend=vllm generates outside DeepSpeed: rollout.gather=layerwise and "
                            "rollout.deepspeed_hybrid_engine do not apply; remove them")


@dataclass
class VLLMConfig:
    """vLLM rollouts (``rollout.backend=vllm``, GPU): where the engines run and how much they take."""

    mode: Literal["colocate", "server"] = _f(
        "colocate",
        "'colocate' (a vLLM engine inside each training rank on its GPU, asleep during the update) or "
        "'server' (a separate `vllm serve`, vllm.server_url)",
    )
    gpu_memory_utilization: float = _f(
        0.3, "colocate: fraction of the GPU's memory each vLLM engine takes (weights + KV cache) while awake")
    sleep_level: Literal[0, 1, 2] = _f(
        1, "colocate: how the policy engine sleeps during the update: 1 (weights to CPU memory, KV cache "
           "freed), 2 (both freed; every weight is pushed again on waking), 0 (never sleeps)")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = _f(
        "auto", "vLLM weight dtype: auto (the checkpoint's), bfloat16, float16 or float32")
    max_num_seqs: int = _f(0, "colocate: sequences vLLM runs at once (0 = a rank's prompts x G)")
    server_url: str = _f("", "server: the policy's `vllm serve` URL, e.g. http://10.0.0.5:8000")
    reference_url: str = _f(
        "", "server: a second `vllm serve` holding the reference weights, for AAPO's reference group "
            "(not needed with rollout.reference_cache)")
    timeout_s: float = _f(240.0, "server: seconds to wait for the servers to answer at start-up")

    def validate(self) -> None:
        if not 0 < self.gpu_memory_utilization < 1:
            raise AapoError(f"vllm.gpu_memory_utilization must be in (0, 1) (got {self.gpu_memory_utilization})")
        if self.max_num_seqs < 0 or not self.timeout_s > 0:
            raise AapoError("vllm.max_num_seqs must be >= 0 and vllm.timeout_s > 0")
        if self.mode != "server":
            return
        from aapo_app.vllm_engine import server_endpoint

        endpoints = {}
        for name in ("server_url", "reference_url"):
            url = getattr(self, name)
            if url and not url.startswith(("http://", "https://")):
                raise AapoError(f"vllm.{name} must be an http(s):// URL (got '{url}')")
            try:
                endpoints[name] = server_endpoint(url) if url else None
            except ValueError:
                raise AapoError(f"vllm.{name} must be http(s)://HOST:PORT with a port number from 1 to 65535 "
                                f"(got '{url}')") from None
        # by host, port and path, every spelling of this machine as one (localhost, 127.0.0.1, ::1, ...); the
        # addresses they resolve to and what the servers compute are compared when they are reached
        if endpoints["reference_url"] is not None and endpoints["reference_url"] == endpoints["server_url"]:
            raise AapoError("vllm.reference_url is the policy's server (same host and port as vllm.server_url): the "
                            "reference group would be sampled from the trained weights; start a second server with "
                            "the reference model and give its URL")

    def validate_for(self, rollout: RolloutConfig) -> None:
        """What only matters when vLLM generates the rollouts."""
        if rollout.backend == "vllm" and self.mode == "server" and not self.server_url:
            raise AapoError("vllm.mode=server needs vllm.server_url=http://HOST:PORT of a running `vllm serve` "
                            "(docs/vllm.md)")


@dataclass
class RewardsConfig:
    """Reward functions by name and their weights: a completion o scores r = sum_k w_k R_k(o)."""

    weights: dict = _f({"accuracy": 1.0}, "reward name -> weight")
    params: dict = _f({}, "reward name -> its settings, e.g. {cosine: {max_len: 1000}} (see --help-config)")
    verify_timeout_s: float = _f(5.0, "wall-clock bound per answer verification; an overrun scores 0 and is counted")
    num_workers: int = _f(2, "grader worker processes per rank")
    plugins: list = _f([], "Python modules imported first; each registers its own rewards with "
                           "@aapo_app.rewards.register_reward (must be importable on every rank)")

    def validate(self) -> None:
        import importlib

        if not isinstance(self.plugins, list) or not all(isinstance(m, str) and m for m in self.plugins):
            raise AapoError("rewards.plugins must be a list of Python module names, e.g. [my_rewards]")
        for module in self.plugins:
            try:
                importlib.import_module(module)
            except Exception as exc:
                raise AapoError(f"rewards.plugins: cannot import '{module}' ({type(exc).__name__}: "
                                f"{str(exc).splitlines()[0] if str(exc) else ''}); check PYTHONPATH on every rank") from exc
        if not isinstance(self.weights, dict) or not self.weights:
            raise AapoError("rewards.weights must be a non-empty mapping of reward name -> weight")
        from aapo_app.rewards import REWARDS

        for name, weight in self.weights.items():
            if name not in REWARDS:
                raise AapoError(f"rewards.weights: unknown reward '{name}'; choose from {', '.join(sorted(REWARDS))}")
            if isinstance(weight, bool) or not isinstance(weight, (int, float)):
                raise AapoError(f"rewards.weights.{name} must be a number (got {weight!r})")
        from aapo_app.rewards import build_reward_params

        if not isinstance(self.params, dict):
            raise AapoError("rewards.params must be a mapping of reward name -> settings")
        for name, settings in self.params.items():
            build_reward_params(name, settings)
        if not self.verify_timeout_s > 0:
            raise AapoError(f"rewards.verify_timeout_s must be > 0 (got {self.verify_timeout_s})")
        _positive("rewards.num_workers", self.num_workers)


@dataclass
class AlgorithmConfig:
    """The algorithm by registry name and its parameters (see ``aapo_app.algorithms``)."""

    name: str = _f(DEFAULT_ALGORITHM, "registry name of the algorithm: " + " | ".join(sorted(ALGORITHMS)))
    params: Any = None  # the algorithm's Params dataclass, filled by the loader


@dataclass
class TrainConfig:
    """Optimisation settings of the update stage."""

    max_steps: int = _f(12, "training steps (one rollout and its update each: one optimizer step, or algorithm.mini_batches"
                            " x num_iterations for the ratio-based algorithms)")
    learning_rate: float = _f(5e-5, "AdamW learning rate (torch fused AdamW unless the DeepSpeed config has an optimizer section)")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    warmup_steps: int = _f(0, "linear learning-rate warm-up, in training steps (x the algorithm's optimizer steps per "
                              "rollout); optimizer step k of W warm-up steps takes k/W of the peak, so none is at lr 0")
    lr_scheduler: Literal["constant", "cosine"] = _f("constant", "learning-rate schedule after warm-up: constant, or cosine (decays to min_lr_ratio x lr at max_steps)")
    min_lr_ratio: float = _f(0.0, "cosine schedule: final learning rate as a fraction of train.learning_rate (the 1.5B recipe: 0.1)")
    max_grad_norm: float = _f(1.0, "gradient clipping by global norm (0 = off)")
    micro_batch_size: int = _f(32, "most sequences per forward/backward (gradient accumulation splits each optimizer step "
                                  "into micro-batches of at most this many); memory only: the update computed is the same "
                                  "for every value")
    micro_batch_tokens: int = _f(0, "when > 0, micro-batches hold as many sequences as fit this many padded tokens "
                                    "(prompt + completion, shortest first) instead of train.micro_batch_size rows, so one "
                                    "long completion does not set the memory of a whole micro-batch; the update is the same")
    seed: int = _f(0, "seed of data order, sampling and initialisation")
    eval_every: int = _f(0, "held-out evaluation every N steps (0 = only before and after training)")
    eval_max_new_tokens: int = _f(32, "completion length limit of the greedy held-out evaluation")
    log_every: int = _f(1, "print a metrics line every N steps (metrics.jsonl always gets every step)")
    log_rollouts: bool = _f(True, "append every group (prompt, completions, rewards, advantages) to rollouts/rank<r>.jsonl")
    save_every: int = _f(0, "save the policy as a Hugging Face checkpoint (checkpoints/step-N) every N steps (0 = off)")
    report_to: list = _f([], "experiment trackers: wandb and/or tensorboard (metrics.jsonl is always written)")
    run_name: str = _f("", "name of the run in wandb / TensorBoard (default: the run directory's name)")
    tags: list = _f([], "wandb tags")
    wandb_project: str = _f("aapo", "wandb project")
    log_samples_every: int = _f(10, "every N steps, log the first prompt's group (completions, rewards, advantage terms) as a table (0 = off)")
    keep_checkpoints: int = _f(2, "keep only the newest N checkpoints (0 = keep all)")
    max_nonfinite_steps: int = _f(3, "stop after this many steps in a row whose update was skipped for a non-finite loss or gradient (0 = never)")
    save_final: bool = _f(True, "save the policy after the last step (checkpoints/step-<max_steps>); `aapo eval --run` reads these")

    def validate(self) -> None:
        _positive("train.max_steps", self.max_steps)
        _positive("train.micro_batch_size", self.micro_batch_size)
        _positive("train.eval_max_new_tokens", self.eval_max_new_tokens)
        _positive("train.log_every", self.log_every)
        if not self.learning_rate > 0:
            raise AapoError(f"train.learning_rate must be > 0 (got {self.learning_rate})")
        if self.micro_batch_tokens < 0:
            raise AapoError(f"train.micro_batch_tokens must be >= 0 (0 = micro-batches of train.micro_batch_size rows; "
                            f"got {self.micro_batch_tokens})")
        if self.warmup_steps < 0 or self.eval_every < 0 or self.max_grad_norm < 0 or self.weight_decay < 0:
            raise AapoError("train.warmup_steps, eval_every, max_grad_norm and weight_decay must be >= 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise AapoError(f"train.min_lr_ratio must be in [0, 1] (got {self.min_lr_ratio})")
        if self.warmup_steps > self.max_steps:
            raise AapoError(f"train.warmup_steps={self.warmup_steps} exceeds train.max_steps={self.max_steps}; lower it")
        from aapo_app.reporting import REPORTERS

        if not isinstance(self.report_to, list) or any(t not in REPORTERS for t in self.report_to):
            raise AapoError(f"train.report_to must be a list from {', '.join(REPORTERS)} (got {self.report_to!r})")
        if not isinstance(self.tags, list) or not all(isinstance(t, str) for t in self.tags):
            raise AapoError(f"train.tags must be a list of strings (got {self.tags!r})")
        if self.log_samples_every < 0:
            raise AapoError(f"train.log_samples_every must be >= 0 (got {self.log_samples_every}); 0 turns it off")
        if self.keep_checkpoints < 0 or self.max_nonfinite_steps < 0:
            raise AapoError("train.keep_checkpoints and train.max_nonfinite_steps must be >= 0 (0 = no limit)")
        if self.save_every < 0:
            raise AapoError(f"train.save_every must be >= 0 (got {self.save_every}); 0 turns periodic saving off")


@dataclass
class RunConfig:
    """One training run. Sections map one-to-one onto the YAML file."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    rewards: RewardsConfig = field(default_factory=RewardsConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output_dir: str = _f("", "run directory (default: runs/<algorithm>-<UTC time>)")
    precision: Literal["auto", "fp32", "bf16"] = _f(
        "auto",
        "number format of the engines: 'bf16' (bf16 weights for rollouts, scoring and the update's forward and "
        "backward; fp32 master weights and Adam moments in the optimizer), 'fp32', or 'auto': bf16 on a GPU or a CPU "
        "with AMX / AVX512-BF16, fp32 elsewhere. A DeepSpeed config that sets bf16.enabled decides instead")

    def validate(self) -> None:
        for section in (self.model, self.data, self.rollout, self.vllm, self.rewards, self.train):
            section.validate()
        self.vllm.validate_for(self.rollout)
        check_lora_run(self)
        self.algorithm.params.validate()
        sequences = self.rollout.prompts_per_rank * self.rollout.group_size
        mini_batches = self.mini_batches
        if sequences % mini_batches:
            divisors = ", ".join(str(d) for d in range(1, sequences + 1) if sequences % d == 0)
            raise AapoError(
                f"algorithm.mini_batches={mini_batches} does not divide the {sequences} sequences per rank "
                f"(rollout.prompts_per_rank x rollout.group_size); choose one of {divisors}"
            )

    @property
    def mini_batches(self) -> int:
        """Optimizer steps per pass over a rollout (1 unless the algorithm splits it)."""
        return self.algorithm.params.rollout_passes()[0]

    @property
    def optimizer_steps_per_rollout(self) -> int:
        return self.algorithm.params.optimizer_steps_per_rollout()

    @property
    def sequences_per_optimizer_step(self) -> int:
        """Sequences of one optimizer step on one rank."""
        return self.rollout.prompts_per_rank * self.rollout.group_size // self.mini_batches

    @property
    def micro_batch_rows(self) -> int:
        """Sequences per micro-batch: train.micro_batch_size, or fewer when a step has fewer."""
        return min(self.train.micro_batch_size, self.sequences_per_optimizer_step)

    @property
    def gradient_accumulation_steps(self) -> int:
        """Micro-batches per optimizer step (the last one may hold fewer sequences)."""
        return -(-self.sequences_per_optimizer_step // self.micro_batch_rows)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["algorithm"] = {"name": self.algorithm.name, **dataclasses.asdict(self.algorithm.params)}
        return out


# ---------------------------------------------------------------------------------------------
# loading


def _positive(name: str, value: int) -> None:
    if value < 1:
        raise AapoError(f"{name} must be >= 1 (got {value})")


def read_config_file(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise AapoError(f"--config: no file '{path}'; give a YAML or JSON run config")
    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        where = getattr(exc, "problem_mark", None) or getattr(exc, "lineno", None)
        raise AapoError(f"--config: '{path}' is not valid YAML/JSON ({where or exc}); fix the syntax") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise AapoError(f"--config: '{path}' must hold a mapping of sections (model:, rollout:, ...)")
    return data


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``section.key=value`` overrides; values are parsed as YAML scalars (1e-5, true, null)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise AapoError(f"override '{item}' must look like section.key=value (e.g. rollout.group_size=8)")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise AapoError(f"override '{item}': '{part}' is not a section")
            node = child
        node[parts[-1]] = value
    return data


def _check_type(name: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _check_type(name, value, args[0])
    if tp is Any:
        return value
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if value in choices and type(value) is type(choices[0]):
            return value
        raise AapoError(f"{name} must be one of {', '.join(str(c) for c in choices)} (got {value!r})")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-5 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    elif tp is dict or origin is dict:
        if isinstance(value, dict):
            return value
    else:
        return value
    tname = getattr(tp, "__name__", str(tp))
    raise AapoError(f"{name} must be of type {tname} (got {value!r})")


def build_dataclass(cls: type, data: dict | None, prefix: str) -> Any:
    """Build ``cls`` from a mapping, strictly: unknown keys and wrong types are errors."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise AapoError(f"{prefix} must be a mapping of keys (got {data!r})")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}.{unknown[0]}" if prefix else f"'{unknown[0]}'"
        raise AapoError(f"{where} is not a known key; valid keys: {', '.join(sorted(names))}")
    kwargs = {}
    for key, value in data.items():
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = build_dataclass(tp, value, f"{prefix}.{key}" if prefix else key)
        else:
            kwargs[key] = _check_type(f"{prefix}.{key}" if prefix else key, value, tp)
    return cls(**kwargs)


# keys that moved: a config written for an earlier version gets one line saying where each went
RENAMED = {**{f"rollout.vllm_{k}": f"vllm.{k}" for k in ("mode", "gpu_memory_utilization", "sleep_level", "dtype",
                                                          "max_num_seqs", "server_url", "reference_url", "timeout_s")},
           "rollout.reference": "rollout.reference_cache (a directory; leave it empty to sample online)"}


def _check_renamed(data: dict) -> None:
    for old, new in RENAMED.items():
        section, _, key = old.partition(".")
        if isinstance(data.get(section), dict) and key in data[section]:
            value = data[section][key]
            if old == "rollout.reference" and value == "online":
                raise AapoError("rollout.reference was renamed: drop rollout.reference=online (sampling online is "
                                "the default)")
            raise AapoError(f"{old} was renamed to {new}; change the key (got {old}={value!r})")


def load_run_config(path: str | Path | None = None, overrides: list[str] | None = None,
                    base: dict | None = None) -> RunConfig:
    """Read (or take ``base``, e.g. a checkpoint's saved config), override, type-check and validate a run config."""
    import copy

    data = read_config_file(path) if path else copy.deepcopy(base or {})
    data = apply_overrides(data, list(overrides or []))
    _check_renamed(data)
    algo = data.pop("algorithm", None) or {}
    if not isinstance(algo, dict):
        raise AapoError("algorithm must be a mapping with a name (e.g. algorithm: {name: aapo})")
    top = {f.name for f in dataclasses.fields(RunConfig)}
    unknown = sorted(set(data) - top)
    if unknown:
        raise AapoError(f"'{unknown[0]}' is not a config section; valid: {', '.join(sorted(top))}")
    if isinstance(data.get("data"), dict):
        data["data"] = apply_data_preset(data["data"])
    sections = {}
    for f in dataclasses.fields(RunConfig):
        if f.name == "algorithm" or f.name not in data:
            continue
        tp = typing.get_type_hints(RunConfig)[f.name]
        if dataclasses.is_dataclass(tp):
            sections[f.name] = build_dataclass(tp, data[f.name], f.name)
        else:
            sections[f.name] = _check_type(f.name, data[f.name], tp)
    algo = dict(algo)
    name = algo.pop("name", DEFAULT_ALGORITHM)
    if not isinstance(name, str):
        raise AapoError(f"algorithm.name must be a string (got {name!r})")
    params = build_dataclass(algorithm_params_class(name), algo, "algorithm")
    cfg = RunConfig(**sections, algorithm=AlgorithmConfig(name=name, params=params))
    cfg.validate()
    return cfg


def flatten_config(d: dict, prefix: str = "") -> dict:
    """A config dict as ``{"rollout.group_size": 4, ...}`` (mappings that are values, such as
    rewards.weights, stay whole)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k not in ("weights", "params"):
            out.update(flatten_config(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def describe_config() -> str:
    """Every config key with its default and help, for ``aapo train --help-config``."""
    lines = []

    def walk(cls, prefix):
        for f in dataclasses.fields(cls):
            tp = typing.get_type_hints(cls)[f.name]
            if dataclasses.is_dataclass(tp):
                walk(tp, f"{prefix}{f.name}.")
                continue
            if f.name == "params":
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"  {prefix}{f.name} = {default!r}\n      {f.metadata.get('help', '')}")

    walk(RunConfig, "")
    from aapo_app.rewards import reward_params_help

    for reward, fields in sorted(reward_params_help().items()):
        for name, (default, text) in fields.items():
            lines.append(f"  rewards.params.{reward}.{name} = {default!r}\n      {text}")
    for name in sorted(ALGORITHMS):
        params_cls = algorithm_params_class(name)
        for f in dataclasses.fields(params_cls):
            lines.append(f"  algorithm.{f.name} = {f.default!r}   [{name}]\n      {f.metadata.get('help', '')}")
    return "\n".join(lines)
