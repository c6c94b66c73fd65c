"""``aapo export``: a training checkpoint as a standalone Hugging Face model directory.

The weights come from the DeepSpeed checkpoint itself: DeepSpeed's ``zero_to_fp32`` merges every
rank's ZeRO-2/3 partitions of the fp32 master weights into one state dict (on the CPU, without a
process group). They are loaded into the model's architecture (from the checkpoint's
``config.json``), cast to ``--dtype`` and saved with ``save_pretrained`` (safetensors) together
with the tokenizer and the generation config. The result loads with
``AutoModelForCausalLM.from_pretrained`` and ``aapo eval --model``, and its logits equal the
training engine's (tested).

A LoRA run's checkpoint (``model.lora``) holds the adapter only: ``--what merged`` (the default)
merges the adapter from the DeepSpeed state into the base model (``model.path``) and writes a plain
transformers model; ``--what adapter`` writes the adapter alone, in peft's format
(``PeftModel.from_pretrained(base, out)`` loads it). See docs/lora.md.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from aapo_app.checkpoint import checkpoint_damage, saved_checkpoints, select_steps
from aapo_app.errors import AapoError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def find_checkpoint(run_dir: str, step: str | None) -> Path:
    found = saved_checkpoints(run_dir, "RUN_DIR")
    return found[select_steps(found, step, run_dir)[0]]


WHAT = ("merged", "adapter")


def export(run_dir: str, out: str, step: str | None = None, dtype: str = "auto", what: str = "merged") -> Path:
    """Write the checkpoint's model to ``out`` (``what``: the merged model, or a LoRA run's adapter
    alone); returns ``out``."""
    from aapo_app.lora import is_adapter_dir

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    ckpt = find_checkpoint(run_dir, step)
    damage = checkpoint_damage(ckpt)
    if damage:
        raise AapoError(f"checkpoint '{ckpt}' is damaged ({damage}); export another step")
    out_dir = Path(out)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise AapoError(f"--out: '{out}' exists and is not empty; choose a new directory")
    if dtype != "auto" and dtype not in DTYPES:
        raise AapoError(f"--dtype must be auto, fp32, bf16 or fp16 (got {dtype})")
    if what not in WHAT:
        raise AapoError(f"--what must be merged or adapter (got {what})")
    if is_adapter_dir(ckpt):
        return _export_lora(ckpt, run_dir, out_dir, dtype, what)
    if what == "adapter":
        raise AapoError(f"--what adapter: checkpoint '{ckpt}' holds full weights (the run trained without "
                        f"model.lora), not an adapter; export it with --what merged")
    ds_dir = ckpt / "deepspeed"
    try:
        config = AutoConfig.from_pretrained(ckpt)
        tokenizer = AutoTokenizer.from_pretrained(ckpt)
    except (OSError, ValueError) as exc:
        raise AapoError(f"checkpoint '{ckpt}' has no readable config/tokenizer ({exc}); export another step") from exc
    if (ds_dir / "state").is_dir():
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        try:
            state = get_fp32_state_dict_from_zero_checkpoint(str(ds_dir), tag="state")
        except Exception as exc:  # a damaged or partial checkpoint
            raise AapoError(f"cannot merge the ZeRO partitions in '{ds_dir}' ({type(exc).__name__}: {exc}); "
                            f"export another step") from exc
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
        tied = set(getattr(model, "_tied_weights_keys", None) or [])
        if isinstance(getattr(model, "_tied_weights_keys", None), dict):
            tied = set(model._tied_weights_keys)
        missing = [k for k in missing if k not in tied]
        if missing or unexpected:
            raise AapoError(f"the ZeRO checkpoint in '{ds_dir}' does not match the model: missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]}")
        model.tie_weights()
        source = "deepspeed (fp32 master weights merged from the ZeRO partitions)"
    else:  # an older checkpoint without engine state: its gathered HF weights
        model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
        source = "the checkpoint's gathered Hugging Face weights"
    target = config.dtype if dtype == "auto" and getattr(config, "dtype", None) else DTYPES.get(dtype, torch.float32)
    if isinstance(target, str):
        target = getattr(torch, target)
    model = model.to(target)
    model.eval()
    try:
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(ckpt)
    except OSError:
        pass  # no generation_config.json in the checkpoint: keep the one built from the config
    return _write(model, tokenizer, out_dir, {"run_dir": str(Path(run_dir).resolve()), "checkpoint": ckpt.name,
                                              "weights_from": source, "dtype": str(target).replace("torch.", "")})


def _write(model, tokenizer, out_dir: Path, meta: dict) -> Path:
    """``model.save_pretrained`` (a transformers model, or a PeftModel: its adapter), the tokenizer and
    ``aapo_export.json`` under ``<out>.tmp``, renamed to ``out`` when complete."""
    out = str(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "aapo_export.json").write_text(json.dumps(meta, indent=2))
        if out_dir.exists():
            out_dir.rmdir()
        tmp.rename(out_dir)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise AapoError(f"--out: cannot write '{out}' ({exc.strerror or exc}); choose a writable directory") from exc
    return out_dir


def _export_lora(ckpt: Path, run_dir: str, out_dir: Path, dtype: str, what: str) -> Path:
    """A LoRA checkpoint: the adapter from its DeepSpeed state, merged into the base or alone."""
    from transformers import AutoTokenizer

    from aapo_app.checkpoint import read_state
    from aapo_app.lora import export_lora

    try:
        base = read_state(ckpt)["config"]["model"]["path"]
        tokenizer = AutoTokenizer.from_pretrained(ckpt)
    except (AapoError, KeyError, TypeError, OSError, ValueError) as exc:
        raise AapoError(f"checkpoint '{ckpt}' has no readable trainer state or tokenizer ({exc}); export another "
                        f"step") from exc
    target = DTYPES.get(dtype, torch.float32)  # auto: the adapter's training dtype, fp32 on this engine
    model, source = export_lora(ckpt, out_dir, what, target, base)
    if what == "merged":
        try:
            from transformers import GenerationConfig

            from aapo_app.models import resolve_model_path

            model.generation_config = GenerationConfig.from_pretrained(resolve_model_path(base))
        except OSError:
            pass
    return _write(model, tokenizer, out_dir, {"run_dir": str(Path(run_dir).resolve()), "checkpoint": ckpt.name,
                                              "weights_from": source, "what": what, "base_model": base,
                                              "dtype": str(target).replace("torch.", "")})
