"""Checkpoints that survive: save, keep the last K, find one to resume from, and restore it.

A checkpoint is a directory ``<run>/checkpoints/step-<N>/`` holding

* the policy's full weights and tokenizer as a Hugging Face model (``config.json``,
  ``model.safetensors``, ...): ``aapo eval --run`` and ``from_pretrained`` read these; with LoRA
  (``model.lora``) the adapter alone instead (``adapter_config.json``, ``adapter_model.safetensors``,
  peft's format), and the DeepSpeed state below holds the adapter parameters only (docs/lora.md);
* ``deepspeed/``: the DeepSpeed engine checkpoint (every rank's ZeRO partitions, the optimizer
  states and the learning-rate scheduler), written by ``engine.save_checkpoint``;
* ``ranks/rank<r>.pt``: each rank's RNG states (torch, CUDA, Python) and prompt-sampler position;
* ``trainer_state.json``: the step, the metrics so far, the world size and the resolved config.

It is written under ``step-<N>.tmp`` and renamed when every rank has finished, so a kill or a full
disk during a save leaves the previous checkpoint as it was; a directory named ``step-<N>`` is
complete. Every rank must see the run directory (a shared filesystem on several nodes).
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import torch

from aapo_app.errors import AapoError

STATE_FILE = "trainer_state.json"


def checkpoint_dirs(run_dir: Path) -> dict[int, Path]:
    """Complete checkpoints of a run by step (unfinished ``.tmp`` saves are ignored)."""
    found = {}
    for d in (Path(run_dir) / "checkpoints").glob("step-*"):
        tail = d.name[len("step-"):]
        if tail.isdigit() and d.is_dir():
            found[int(tail)] = d
    return found


def saved_checkpoints(run_dir: str, option: str, require: str | None = None) -> dict[int, Path]:
    """A run's complete checkpoints (those holding the file ``require``, if given), or the
    one-line error for ``option`` when the directory or its checkpoints are missing."""
    root = Path(run_dir).expanduser()
    if not root.is_dir():
        raise AapoError(f"{option}: '{run_dir}' is not a directory; give a training run directory")
    found = {s: d for s, d in checkpoint_dirs(root).items() if require is None or (d / require).is_file()}
    if not found:
        raise AapoError(f"{option}: '{run_dir}' has no checkpoints/step-N (the run saves one at its end with "
                        f"train.save_final=true, or every train.save_every steps)")
    return found


def select_steps(found: dict[int, Path], step: str | None, run_dir: str, allow_all: bool = False) -> list[int]:
    """``latest`` (or None), ``all`` (when allowed) or one step number among ``found``."""
    if step is None or step == "latest":
        return [max(found)]
    if allow_all and step == "all":
        return sorted(found)
    if not str(step).isdigit() or int(step) not in found:
        choices = "latest / all" if allow_all else "latest"
        raise AapoError(f"--step: no checkpoint step-{step} in '{run_dir}'; saved steps: "
                        f"{', '.join(map(str, sorted(found)))} (or use {choices})")
    return [int(step)]


def step_of(step_dir: Path) -> int:
    return int(Path(step_dir).name[len("step-"):])


def _zip_damage(path: Path) -> str | None:
    """What is wrong with a file ``torch.save`` wrote (a zip archive), or None. Opening the archive
    reads its central directory, at the end of the file: a truncated or empty file has none."""
    import zipfile

    if not path.is_file():
        return f"{path.name} is missing"
    try:
        with zipfile.ZipFile(path) as z:
            end = max((i.header_offset + i.compress_size for i in z.infolist()), default=0)
    except (zipfile.BadZipFile, OSError):
        return f"{path.name} is truncated or not a torch file"
    return f"{path.name} is truncated" if end > path.stat().st_size else None


def weights_damage(model_dir: Path) -> str | None:
    """What is wrong with a Hugging Face directory's safetensors weights, or None: every file's
    header must parse and the file must be as long as the tensors it declares."""
    import struct

    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError):
            return f"{index.name} is not a readable index"
    else:
        files = [p.name for p in model_dir.glob("*.safetensors")]
    for name in files:
        path = model_dir / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        try:
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n)) if 8 + n <= size else None
        except (OSError, ValueError, struct.error):
            header = None
        if not isinstance(header, dict):
            return f"{name} is truncated (its header is incomplete)"
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + n + end > size:
            return f"{name} is truncated ({size} of {8 + n + end} bytes)"
    return None


def _zero_stage(run_dir: Path) -> int:
    """The ZeRO stage the run recorded (each rank then saves its own optimizer states); 3 if unknown."""
    try:
        return int(json.loads((Path(run_dir) / "ds_config.json").read_text())["zero_optimization"]["stage"])
    except (OSError, ValueError, KeyError, TypeError):
        return 3


def checkpoint_damage(step_dir: Path) -> str | None:
    """What makes checkpoint ``step_dir`` unusable for a resume, or None: its trainer state, its
    Hugging Face weights, every rank's DeepSpeed files and RNG state are present and complete.
    The checks read file headers and zip directories, not the tensors, so they are fast."""
    step_dir = Path(step_dir)
    try:
        state = json.loads((step_dir / STATE_FILE).read_text())
        world = int(state["world_size"])
    except FileNotFoundError:
        return f"{STATE_FILE} is missing"
    except (OSError, ValueError, KeyError, TypeError):
        return f"{STATE_FILE} is not readable"
    damage = weights_damage(step_dir)
    if damage:
        return damage
    ds = step_dir / "deepspeed" / "state"
    optim = sorted(ds.glob("*optim_states.pt"))
    if not ds.is_dir() or not any(ds.glob("*model_states.pt")):
        return "deepspeed/state holds no model states"
    if _zero_stage(step_dir.parent.parent) > 0 and len(optim) != world:
        return f"deepspeed/state holds {len(optim)} optimizer-state files for {world} ranks"
    for path in sorted(ds.glob("*.pt")):
        damage = _zip_damage(path)
        if damage:
            return f"deepspeed/state/{damage}"
    for r in range(world):
        damage = _zip_damage(step_dir / "ranks" / f"rank{r}.pt")
        if damage:
            return f"ranks/{damage}"
    return None


def _damaged_message(step_dir: Path, damage: str) -> str:
    earlier = [d for s, d in sorted(checkpoint_dirs(step_dir.parent.parent).items(), reverse=True)
               if s < step_of(step_dir) and checkpoint_damage(d) is None]
    way = (f"{earlier[0].name} is intact: resume from it with --resume {earlier[0]}" if earlier
           else "no earlier checkpoint is intact; start the run again")
    return f"--resume: checkpoint {step_dir} is damaged ({damage}); {way}"


def find_resume_checkpoint(spec: str, output_dir: str | None) -> Path:
    """``--resume latest`` (the run's newest checkpoint), a run directory (its newest), or one
    ``checkpoints/step-N`` directory. The newest is taken even when it is incomplete:
    :func:`verify_checkpoint` then says so, rather than an older one being used silently."""
    if spec == "latest":
        if not output_dir:
            raise AapoError("--resume latest needs --output-dir RUN_DIR (the run to continue)")
        root = Path(output_dir)
    else:
        root = Path(spec)
    if not root.is_dir():
        raise AapoError(f"--resume: '{root}' is not a directory; give a run directory or one of its "
                        f"checkpoints/step-N")
    if root.name.startswith("step-") and root.parent.name == "checkpoints":
        step_dir = root
    else:
        steps = checkpoint_dirs(root)
        if not steps:
            raise AapoError(f"--resume: '{root}' has no checkpoint (checkpoints/step-N); the run must have saved one "
                            f"(train.save_every, or the end of training); start it again with --overwrite")
        step_dir = steps[max(steps)]
    return step_dir


def verify_checkpoint(step_dir: Path) -> None:
    """One line naming what is damaged in ``step_dir`` and the newest intact earlier checkpoint."""
    damage = checkpoint_damage(step_dir)
    if damage:
        raise AapoError(_damaged_message(Path(step_dir), damage))


RECORDED_DS_CONFIGS = {"--ds-config": "ds_config.json", "--ref-ds-config": "ds_config_reference.json"}


def recorded_ds_config(run_dir: Path, option: str) -> str | None:
    """The DeepSpeed config a run recorded at its start for ``option`` (None for runs that predate it)."""
    path = Path(run_dir) / RECORDED_DS_CONFIGS[option]
    return str(path) if path.is_file() else None


def _differences(old, new, prefix=""):
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new), key=str):
            yield from _differences(old.get(key), new.get(key), f"{prefix}{key}.")
    elif old != new:
        yield prefix[:-1], old, new


def check_same_ds_configs(run_dir: Path, configs: dict[str, dict]) -> None:
    """A resumed run must use the DeepSpeed configs it was trained with (a ZeRO-2 or bf16 config
    cannot load a ZeRO-3 fp32 checkpoint, and a silently different one would not be the run's):
    one line naming the first key that differs."""
    for option, resolved in configs.items():
        recorded = recorded_ds_config(run_dir, option)
        if recorded is None:
            continue
        try:
            old = json.loads(Path(recorded).read_text())
        except (OSError, ValueError):
            continue
        first = ("zero_optimization.stage", "bf16.enabled", "fp16.enabled", "zero_optimization.offload_optimizer")
        differences = sorted(_differences(old, resolved), key=lambda d: (not d[0].startswith(first), d[0]))
        for key, was, now in differences:
            raise AapoError(f"{option}: the run was trained with {key}={was!r} (its {Path(recorded).name}) but this "
                            f"command gives {now!r}; resume without {option} to use the run's own")


def read_state(step_dir: Path) -> dict:
    try:
        return json.loads((step_dir / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise AapoError(f"--resume: cannot read {step_dir / STATE_FILE} ({exc}); the checkpoint is damaged, "
                        f"resume from an earlier one") from exc


def rank_state(sampler) -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "sampler": sampler.state_dict()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rank_state(state: dict, sampler) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    sampler.load_state_dict(state["sampler"])


def prune(run_dir: Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` checkpoints (0 keeps all); returns what was deleted."""
    if keep <= 0:
        return []
    found = checkpoint_dirs(run_dir)
    gone = [found[step] for step in sorted(found)[:-keep]]
    for path in gone:
        shutil.rmtree(path, ignore_errors=True)
    return gone


def truncate_jsonl(path: Path, max_step: int) -> None:
    """Drop the lines of a per-step log written after ``max_step`` (by a run killed after a save)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= max_step:
                kept.append(line)
        except json.JSONDecodeError:  # a line cut short by the kill
            continue
    path.write_text("".join(line + "\n" for line in kept))


def checkpoint_bytes(model_numel: int, param_bytes: int, world: int) -> int:
    """Rough size of one checkpoint: HF weights + fp32 master weights and two Adam moments."""
    return model_numel * (param_bytes + 12) + 64 * 2**20 * world


def _failure_text(exc: BaseException, run_dir: Path) -> str:
    lines = str(exc).strip().splitlines()
    text = getattr(exc, "strerror", None) or (lines[0][:160] if lines else type(exc).__name__)
    try:
        free = shutil.disk_usage(run_dir).free
    except OSError:
        return text
    return f"{text}; {free / 2**20:.0f} MiB free on the disk"


class Checkpointer:
    """Saving and restoring one run's checkpoints (the layout in the module docstring). Every method
    is collective: all ranks call it."""

    def __init__(self, run_dir: Path, rank: int, world: int, keep: int, lora=None, base_model: str | None = None):
        """``lora``: the run's :class:`~aapo_app.lora.LoraSettings` (adapter-only checkpoints when
        enabled); ``base_model``: its ``model.path``, recorded in the adapter's config."""
        from aapo_app.lora import LoraSettings

        self.run_dir, self.rank, self.world, self.keep = Path(run_dir), rank, world, keep
        self.lora, self.base_model = lora or LoraSettings(), base_model

    def check_disk_space(self, policy, saves: int) -> None:
        """Refuse to start when the disk cannot hold the checkpoints this run will keep at once: before
        a save the oldest are pruned to ``keep - 1`` (at least 1), so ``keep`` (at least 2) exist
        while it is written; ``saves`` is how many this run will make."""
        if saves <= 0:
            return
        existing = len(checkpoint_dirs(self.run_dir))
        if self.keep > 0:
            peak = min(existing + saves - 1, max(self.keep - 1, 1)) + 1
        else:
            peak = existing + saves
        if peak <= existing:
            return
        numel = sum(getattr(p, "ds_numel", p.numel()) for p in policy.module.parameters()
                    if p.requires_grad or not self.lora.enabled)  # LoRA: the adapters alone are saved
        one = checkpoint_bytes(numel, 4, self.world)
        need, free = (peak - existing) * one, shutil.disk_usage(self.run_dir).free
        if free < need:
            raise AapoError(f"--output-dir: {free / 2**30:.1f} GiB free on the run directory's disk; this run needs "
                            f"about {need / 2**30:.1f} GiB for {peak - existing} more checkpoint(s) of "
                            f"{one / 2**30:.1f} GiB; free space, choose another --output-dir, lower "
                            f"train.keep_checkpoints, or set train.save_final=false train.save_every=0")

    def save(self, step: int, policy, tokenizer, sampler, state: dict) -> Path:
        """Save everything a resume needs as ``checkpoints/step-<step>``: written under ``.tmp`` and
        renamed once every rank is done, so a kill or a full disk leaves the previous checkpoint
        intact; then keep only the newest ``keep``. ``state`` (rank 0's) goes to ``trainer_state.json``
        with the step and the world size."""
        from aapo_app.engine import barrier

        final = self.run_dir / "checkpoints" / f"step-{step}"
        tmp = final.with_name(final.name + ".tmp")
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # the remains of a save that was killed
            if self.keep > 0:  # make room first: keep - 1 (at least 1) old ones beside the new one
                prune(self.run_dir, max(self.keep - 1, 1))
            tmp.mkdir(parents=True, exist_ok=True)
        barrier()
        failure = ""
        try:
            if self.lora.enabled:  # the adapter alone; the frozen base is model.path
                from aapo_app.lora import save_adapter_checkpoint

                save_adapter_checkpoint(policy, tmp, tokenizer, self.lora, self.base_model)
                state = {**state, "lora": self.lora.to_record()}
            else:
                policy.save_pretrained(tmp, tokenizer)
            policy.engine.save_checkpoint(str(tmp / "deepspeed"), tag="state", save_latest=False,
                                          exclude_frozen_parameters=self.lora.enabled)
            (tmp / "ranks").mkdir(exist_ok=True)
            torch.save(rank_state(sampler), tmp / "ranks" / f"rank{self.rank}.pt")
            if self.rank == 0:
                full = {"step": step, "world_size": self.world, **state}
                (tmp / STATE_FILE).write_text(json.dumps(full, indent=1))
        except Exception as exc:  # noqa: BLE001 - a full disk raises OSError, RuntimeError (torch.save) or Exception (tokenizers)
            failure = _failure_text(exc, self.run_dir)
        failures = failure if self.world == 1 else self._gather_failure(failure)
        if failures:
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            previous = sorted(checkpoint_dirs(self.run_dir))
            kept = f"the previous checkpoint step-{previous[-1]} is intact" if previous else "no earlier checkpoint exists"
            raise AapoError(f"checkpoint step-{step} could not be written ({failures}); {kept}; free disk space "
                            f"or lower train.keep_checkpoints, then resume with --resume latest")
        if self.rank == 0:
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            prune(self.run_dir, self.keep)
        barrier()
        return final

    def _gather_failure(self, failure: str) -> str:
        """Any rank's save error, on every rank (so that all of them stop together)."""
        import torch.distributed as dist

        box = [None] * self.world
        dist.all_gather_object(box, failure)
        return "; ".join(sorted({f for f in box if f}))

    def restore(self, step_dir: Path, policy, sampler) -> dict:
        """Load a checkpoint into the policy engine (weights, optimizer, scheduler), the prompt sampler
        and the RNGs, cut the run's logs back to its step, and return its ``trainer_state.json``."""
        from aapo_app.engine import barrier

        from aapo_app.lora import check_checkpoint_matches

        state = read_state(step_dir)
        check_checkpoint_matches(state, self.lora, "--resume")
        if state.get("world_size") != self.world:
            raise AapoError(f"--resume: the checkpoint was written by {state.get('world_size')} ranks and this run has "
                            f"{self.world}; resume with the same number of ranks")
        # a LoRA checkpoint holds no frozen (base) parameters: they stay as model.path loaded them
        load_path, _ = policy.engine.load_checkpoint(str(step_dir / "deepspeed"), tag="state",
                                                     load_optimizer_states=True, load_lr_scheduler_states=True,
                                                     load_module_strict=not self.lora.enabled)
        if load_path is None:
            raise AapoError(f"--resume: DeepSpeed could not load {step_dir / 'deepspeed'}; resume from another step")
        rank_file = step_dir / "ranks" / f"rank{self.rank}.pt"
        try:
            restore_rank_state(torch.load(rank_file, weights_only=False), sampler)
        except (OSError, KeyError, ValueError) as exc:
            raise AapoError(f"--resume: cannot read {rank_file} ({exc}); resume from another step") from exc
        step = int(state["step"])
        if self.rank == 0:
            truncate_jsonl(self.run_dir / "metrics.jsonl", step)
        truncate_jsonl(self.run_dir / "rollouts" / f"rank{self.rank}.jsonl", step)
        barrier()
        return state
