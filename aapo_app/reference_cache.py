"""Reference rollouts computed once: ``aapo reference-rollouts`` writes them, ``rollout.reference_cache=DIR`` reads them.

The reference model is frozen, so the distribution of its completions (and rewards) for a prompt
never changes during a run. A cache directory holds, for every training prompt, G reference
completions (token ids, texts, lengths, truncation) and their rewards, sampled and scored exactly
as an online rollout would, plus ``manifest.json`` with the **fingerprint** of everything that
decides them:

* the reference model (its path and a digest of its weight files),
* the sampling settings (G, max_new_tokens, temperature, top-p, top-k),
* the reward configuration (weights, parameters, plugins, verification timeout),
* the prompt rendering (chat template on/off, system prompt, template, the tokenizer's template).

Records are keyed by a digest of the rendered prompt text, so any data source works. Each rank
appends to its own ``part-<rank>.jsonl``; a killed build is resumed by skipping the keys already
written (by any rank).

Where the samples came from is recorded beside the fingerprint (it does not decide the samples'
distribution, so a cache built on one backend serves runs on another): every record has a
``source`` (``deepspeed-reference``, ``vllm-colocated-reference`` or ``vllm-server:<url>``) and the
manifest lists each build's source with its probe (:mod:`aapo_app.vllm_engine`). In server mode a
cache is only ever sampled from ``vllm.reference_url``, never from the policy's server.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from aapo_app.batches import Grades
from aapo_app.data import wants_chat_template
from aapo_app.errors import AapoError
from aapo_app.rewards import scored_weights

MANIFEST = "manifest.json"
CACHE_FORMAT = 1
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def prompt_key(rendered_prompt: str) -> str:
    return hashlib.sha256(rendered_prompt.encode()).hexdigest()[:24]


def weights_digest(model_path: str) -> str:
    """SHA-256 over the model directory's weight files (names and bytes, in name order)."""
    path = Path(model_path)
    if not path.is_dir():
        try:
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(model_path, local_files_only=True))
        except Exception as exc:  # noqa: BLE001 - any failure means the weights are not on disk
            raise AapoError(f"model.path: cannot find the weights of '{model_path}' on disk to fingerprint them "
                            f"({type(exc).__name__}); download the model first") from exc
    files = sorted(p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file())
    if not files:
        raise AapoError(f"model.path: no weight files ({', '.join(WEIGHT_SUFFIXES)}) in '{path}' to fingerprint")
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()


def fingerprint_components(cfg, model_path: str, tokenizer) -> dict:
    """Everything that decides a prompt's reference completions and rewards (see the module doc)."""
    r, d = cfg.rollout, cfg.data
    return {
        "format": CACHE_FORMAT,
        "reference_model": {"path": cfg.model.path, "weights_sha256": weights_digest(model_path)},
        "sampling": {"group_size": r.group_size, "max_new_tokens": r.max_new_tokens, "temperature": r.temperature,
                     "top_p": r.top_p, "top_k": r.top_k},
        "rewards": {"weights": scored_weights(cfg.rewards), "params": cfg.rewards.params,
                    "plugins": cfg.rewards.plugins, "verify_timeout_s": cfg.rewards.verify_timeout_s},
        "prompts": {"use_chat_template": wants_chat_template(d), "system_prompt": d.system_prompt,
                    "prompt_template": d.prompt_template,
                    "chat_template_sha256": hashlib.sha256(str(tokenizer.chat_template or "").encode()).hexdigest()},
    }


def digest(components: dict) -> str:
    return hashlib.sha256(json.dumps(components, sort_keys=True, default=str).encode()).hexdigest()


def mismatch(found: dict, expected: dict) -> str:
    """The first differing field, as 'section.key (cache X, run Y)'."""
    for section in sorted(set(found) | set(expected)):
        a, b = found.get(section), expected.get(section)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                if a.get(key) != b.get(key):
                    return f"{section}.{key} (cache {a.get(key)!r}, this run {b.get(key)!r})"
        return f"{section} (cache {a!r}, this run {b!r})"
    return ""


def read_manifest(cache_dir: Path) -> dict | None:
    path = Path(cache_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise AapoError(f"reference cache: cannot read {path} ({exc}); rebuild it with aapo reference-rollouts") from exc


def check_manifest(manifest: dict | None, components: dict, cache_dir: Path, what: str) -> None:
    """Refuse a cache built for other settings (naming the first field that differs)."""
    if manifest is None:
        raise AapoError(f"{what}: '{cache_dir}' is not a reference cache (no {MANIFEST}); build one with "
                        f"aapo reference-rollouts --config FILE --out DIR")
    if manifest.get("fingerprint") != digest(components):
        diff = mismatch(manifest.get("components", {}), components) or "its fingerprint"
        raise AapoError(f"{what}: the cache in '{cache_dir}' was built for other settings: {diff}; rebuild it with "
                        f"aapo reference-rollouts for this config, or set rollout.reference_cache=''")


def read_records(cache_dir: Path) -> dict[str, dict]:
    """Every complete record of every part file, by prompt key (a torn last line is ignored)."""
    records: dict[str, dict] = {}
    for part in sorted(Path(cache_dir).glob("part-*.jsonl")):
        for line in part.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # the last line of a killed write
            records.setdefault(rec["key"], rec)
    return records


@dataclass
class CachedGroups:
    """The reference groups of a batch's prompts, prompt-major like the samples: ``[P*G]`` rows."""

    completion_ids: torch.Tensor  # [P*G, T_c], pad after each completion
    grades: Grades  # their stored rewards (weighted total and each reward's values)


class ReferenceCache:
    """A built cache, checked against this run's fingerprint, answering batches of prompts."""

    def __init__(self, cache_dir: str | Path, components: dict, pad_id: int):
        self.dir = Path(cache_dir)
        check_manifest(read_manifest(self.dir), components, self.dir, "rollout.reference_cache")
        self.records = read_records(self.dir)
        self.pad_id = pad_id
        self.group_size = components["sampling"]["group_size"]

    def groups(self, rendered_prompts: list[str]) -> CachedGroups:
        rows, rewards, parts = [], [], {}
        for text in rendered_prompts:
            rec = self.records.get(prompt_key(text))
            if rec is None:
                raise AapoError(f"rollout.reference_cache: a training prompt is missing from the cache in '{self.dir}' "
                                f"(built for other data?); run aapo reference-rollouts again with this config "
                                f"to add it")
            rows += rec["completion_ids"]
            rewards += rec["rewards"]
            for name, values in rec["reward_parts"].items():
                parts.setdefault(name, []).extend(values)
        from aapo_app.generation import pad_rows

        grades = Grades(torch.tensor(rewards, dtype=torch.float32),
                        {k: torch.tensor(v, dtype=torch.float32) for k, v in parts.items()})
        return CachedGroups(completion_ids=pad_rows(rows, self.pad_id), grades=grades)


# ---------------------------------------------------------------------------------------------
# building a cache: `aapo reference-rollouts`


def drop_torn_tail(path: Path) -> None:
    """Cut a part file back to its last complete line (a build killed mid-write leaves half a record)."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


def check_server_source(cfg) -> None:
    """In server mode a cache is sampled from the reference server, never from the policy's: that
    one may hold weights a training run pushed into it, while the fingerprint names the base
    weights. The two URLs are compared by the addresses they reach, not by their text."""
    from aapo_app.vllm_engine import same_server

    v = cfg.vllm
    if cfg.rollout.backend != "vllm" or v.mode != "server":
        return
    if not v.reference_url:
        raise AapoError("vllm.reference_url: aapo reference-rollouts in server mode samples from a "
                        "reference server only, never from the policy's (vllm.server_url may hold trained "
                        "weights); start a `vllm serve` with model.path and give its URL, or use "
                        "vllm.mode=colocate or rollout.backend=deepspeed")
    where = same_server(v.reference_url, v.server_url) if v.server_url else ""
    if where:
        raise AapoError(f"vllm.reference_url reaches the policy's server ({where}, as vllm.server_url "
                        f"does): a reference cache must not be sampled from it; start a `vllm serve` of its own with "
                        f"model.path and give its URL")


def sample_source(reference) -> dict:
    """Where a cache's samples come from: the generator's source name and, for vLLM engines, the
    first values of its probe (weights for a colocated engine, greedy log-probs for a server).
    Collective."""
    from aapo_app.vllm_engine import VLLMEngine

    if not isinstance(reference, VLLMEngine):
        return {"source": reference.source}
    probe = reference.probe()
    return {"source": reference.source,
            "probe": {name: [round(float(x), 6) for x in values.reshape(-1)[:8]] for name, values in probe.items()}}


def record_source(cache_dir: Path, source: dict) -> None:
    """Add a build's source to the manifest's ``sources`` (once; written atomically)."""
    path = Path(cache_dir) / MANIFEST
    manifest = read_manifest(cache_dir) or {}
    sources = manifest.setdefault("sources", [])
    if source in sources:
        return
    sources.append(source)
    tmp = path.with_name(MANIFEST + ".tmp")
    try:
        tmp.write_text(json.dumps(manifest, indent=1))
        os.replace(tmp, path)
    except OSError as exc:
        raise AapoError(f"--out: cannot write to '{cache_dir}' ({exc.strerror}); choose a writable directory") from exc


def build(cfg, out_dir: str | Path, ds_config: str | None = None, prompts_per_batch: int | None = None,
          log=print, seeds: list[int] | None = None) -> dict:
    """Sample and score G reference completions for every training prompt not yet in ``out_dir``:
    the training prompts of each seed's train/held-out split in ``seeds`` (default: train.seed), so
    that runs with any of those seeds find their prompts.

    ``rollout.backend`` chooses the sampler: the DeepSpeed engine, or vLLM (a colocated engine
    per rank, or the server at ``vllm.reference_url``; never the policy's server). Each
    record, and the manifest's ``sources``, say which (:func:`sample_source`).

    Data-parallel: each rank takes every world-th missing prompt and appends to ``part-<rank>.jsonl``
    (collective: all ranks run the same number of batches; a rank out of prompts samples a dummy
    batch it throws away). Returns counts for the summary line."""
    import math

    from tqdm import tqdm

    from aapo_app.builder import open_model, reference_rollout_generator
    from aapo_app.data import PromptStyle, load_examples
    from aapo_app.ds_config import DEFAULT_REFERENCE_CONFIG, fill_ds_config, read_ds_config
    from aapo_app.engine import all_reduce_sum, barrier, init_distributed, launched_world_size, on_rank0
    from aapo_app.generation import Sampling, encode_prompts
    from aapo_app.models import resolve_model_path
    from aapo_app.rewards import run_reward_model
    from aapo_app.rollout import stream_seed

    ds = fill_ds_config(read_ds_config(ds_config, DEFAULT_REFERENCE_CONFIG, option="--ds-config"), cfg,
                        launched_world_size(), training=False)
    resolve_model_path(cfg.model.path, convert=False)
    check_server_source(cfg)
    if cfg.rollout.backend == "vllm":
        from aapo_app.vllm_engine import check_vllm_machine

        check_vllm_machine(cfg.vllm)
    train = [ex for seed in (seeds or [cfg.train.seed]) for ex in load_examples(cfg.data, seed)[0]]
    rank, world = init_distributed()
    files = open_model(cfg.model.path, rank)
    model_path, tok = files.path, files.tokenizer
    style = PromptStyle(tok, cfg.data)
    out = Path(out_dir)

    def prepare() -> None:  # rank 0 alone reads and writes the manifest (and hashes the weights for it)
        components = fingerprint_components(cfg, model_path, tok)
        try:
            out.mkdir(parents=True, exist_ok=True)
            manifest = read_manifest(out)
            if manifest is None:
                (out / MANIFEST).write_text(json.dumps({"fingerprint": digest(components), "components": components},
                                                       indent=1))
        except OSError as exc:
            raise AapoError(f"--out: cannot write to '{out}' ({exc.strerror}); choose a writable directory") from exc
        if manifest is not None:
            check_manifest(manifest, components, out, "--out")

    on_rank0(prepare)

    drop_torn_tail(out / f"part-{rank}.jsonl")
    barrier()
    done = set(read_records(out))
    seen, todo = set(done), []
    for ex in train:
        text = style.render(ex.problem)
        key = prompt_key(text)
        if key not in seen:
            seen.add(key)
            todo.append((key, ex, text))
    mine = todo[rank::world]
    per_batch = prompts_per_batch or cfg.rollout.prompts_per_rank
    counts = all_reduce_sum([len(mine) if r == rank else 0 for r in range(world)])
    n_batches = max(math.ceil(c / per_batch) for c in counts)
    G = cfg.rollout.group_size
    log(f"reference rollouts: {len(done)} prompts cached already, {len(todo)} to sample on {world} rank(s), "
        f"G={G}, into {out}")
    reference = reference_rollout_generator(cfg, files, ds, rank, per_batch)
    source = sample_source(reference)
    if todo:
        on_rank0(lambda: record_source(out, source))
    rewards = run_reward_model(cfg.rewards)
    bar = tqdm(total=len(todo), desc="reference rollouts", unit="prompt", disable=rank != 0 or not todo)
    try:
        with open(out / f"part-{rank}.jsonl", "a") as f:
            for b in range(n_batches):
                chunk = mine[b * per_batch:(b + 1) * per_batch]
                real = bool(chunk)
                chunk = chunk or (mine or todo)[-1:]  # a dummy batch keeps the collective generation in step
                ids, mask = encode_prompts(tok, [text for _, _, text in chunk], style.add_special_tokens)
                s = reference.sample(ids, mask, num_samples=G, sampling=Sampling.of_rollout(cfg.rollout),
                                     seed=stream_seed(cfg.train.seed, "reference-rollouts", chunk[0][0]))
                if real:
                    answers = [ex.answer for _, ex, _ in chunk for _ in range(G)]
                    scored = rewards.score(s.texts, answers, s.lengths.tolist())
                    completion = s.sequences[:, s.prompt_width:]
                    for i, (key, ex, _) in enumerate(chunk):
                        rows = range(i * G, (i + 1) * G)
                        f.write(json.dumps({
                            "key": key, "prompt_id": ex.id, "problem": ex.problem, "answer": ex.answer,
                            "source": source["source"],
                            "completions": [s.texts[j] for j in rows],
                            "completion_ids": [completion[j, :int(s.lengths[j])].tolist() for j in rows],
                            "lengths": [int(s.lengths[j]) for j in rows],
                            "truncated": [bool(s.truncated[j]) for j in rows],
                            "rewards": [float(scored.total[j]) for j in rows],
                            "reward_parts": {k: [float(v[j]) for j in rows] for k, v in scored.per_reward.items()},
                        }) + "\n")
                    f.flush()
                bar.update(int(all_reduce_sum([len(chunk) if real else 0])[0]))
    finally:
        bar.close()
        rewards.close()
    barrier()
    return {"cached_before": len(done), "sampled": len(todo), "total": len(done) + len(todo)}
