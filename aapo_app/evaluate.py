"""``aapo eval``: the paper's five math benchmarks under the lighteval or simplerl protocol.

Flow per model: load the benchmarks (hub or ``--data-dir``), render prompts, cut the problems into
fixed global batches of ``batch_size`` problems, give batch ``b`` to rank ``b % world``, sample
``n_samples`` completions per problem with the seed ``stream_seed(seed, benchmark, b)``, grade every
completion with the protocol's grader, gather the per-sample records on rank 0, and compute
pass@1 (mean over samples) and unbiased pass@k. Because batch composition and seeds depend only on
the global batch index, a run on N ranks computes exactly the batches a 1-rank run computes, and
gives the same numbers.

Backends (:func:`aapo_app.builder.eval_generator`, the same generators training rollouts use):
``hf`` samples on a ZeRO-3 inference engine's generation mode; ``vllm`` runs vLLM's offline
``LLM`` on each rank's GPU with one seeded request per completion. Prompts are rendered by the
same :func:`aapo_app.data.render_prompt` as training prompts.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from aapo_app.benchmarks import BENCHMARKS, Problem
from aapo_app.errors import AapoError

QWEN_EVAL_PROMPT = (
    "Solve the following math problem efficiently and clearly.  The last line of your response should be of "
    "the following format: 'Therefore, the final answer is: $\\boxed{ANSWER}$. I hope it is correct' (without "
    "quotes) where ANSWER is just the final number or expression that solves the problem. Think step by step "
    "before answering.\n\n{problem}"
)
# SimpleRL-Zoo's "abel" template, the raw prompt its zero-RL Llama models are evaluated with (and the
# format of the simplelr_abel training data); render_prompt adds the final newline of plain-text prompts
SIMPLERL_PROMPT = "Question:\n{problem}\nAnswer:\nLet's think step by step."
# the Qwen2.5-Math evaluation's stop strings for the abel template (its defaults plus "Question:", "Answer:")
SIMPLERL_STOP = ("</s>", "<|im_end|>", "<|endoftext|>", "Question:", "Answer:")


@dataclass
class EvalSettings:
    """Everything that decides the numbers; written into results.json as is."""

    protocol: str = "lighteval"
    prompt_template: str = QWEN_EVAL_PROMPT  # "{problem}" is replaced by the problem text
    system_prompt: str | None = None
    use_chat_template: bool = True
    temperature: float | None = 0.6  # None = greedy
    top_p: float = 0.95
    top_k: int = 0
    max_new_tokens: int = 32768
    n_samples: int = 1
    k: tuple[int, ...] = (1,)
    seed: int = 0
    batch_size: int = 8  # problems per generation batch (x n_samples rows)
    limit: int | None = None
    backend: Literal["hf", "vllm"] = "hf"
    sampler: Literal["aapo", "hf"] = "aapo"  # --backend hf: aapo's decoding loop or transformers' generate
    verify_timeout_s: float = 10.0
    grader_workers: int | None = None
    stop: tuple[str, ...] = ()  # a completion ends before the first of these strings (as vLLM's ``stop``)
    # lighteval tokenizes chat-templated prompts with add_special_tokens=True: a template that writes
    # its own BOS (DeepSeek-R1-Distill) gets two. False (default): one BOS; True: as the reference.
    reference_quirks: bool = False


PROTOCOLS: dict[str, EvalSettings] = {
    # lighteval / open-rs (the paper's Qwen rows): chat template, Qwen evaluation prompt, T 0.6, top-p 0.95
    "lighteval": EvalSettings(),
    # SimpleRL-Zoo's Qwen2.5-Math evaluation (the paper's Llama rows, "follow SimpleRL-Reason"): the raw
    # abel prompt without chat template, its stop strings, T 1.0, top-p 0.95, 16,000 new tokens
    "simplerl": EvalSettings(protocol="simplerl", prompt_template=SIMPLERL_PROMPT, system_prompt=None,
                             use_chat_template=False, temperature=1.0, top_p=0.95, max_new_tokens=16000,
                             stop=SIMPLERL_STOP),
}


def eval_settings(config_path=None, overrides=(), protocol: str | None = None, **flags) -> EvalSettings:
    """``aapo eval``'s settings: the protocol's defaults, then the ``--config`` file (a mapping of
    :class:`EvalSettings` fields, ``protocol`` among them), then ``key=value`` overrides, then the
    command's flags (shorthands, None when not given); type-checked and validated."""
    from aapo_app.config import apply_overrides, build_dataclass, read_config_file

    data = dict(read_config_file(config_path)) if config_path else {}
    data = apply_overrides(data, list(overrides))
    name = data.pop("protocol", None)
    name = protocol or name or "lighteval"
    if name not in PROTOCOLS:
        raise AapoError(f"protocol: unknown protocol '{name}'; choose {' or '.join(PROTOCOLS)}")
    if "k" in data:
        k = data["k"]
        data["k"] = parse_k(",".join(map(str, k)) if isinstance(k, (list, tuple)) else str(k))
    merged = {**asdict(PROTOCOLS[name]), **data, "protocol": name}
    merged["k"] = tuple(merged["k"])
    if isinstance(merged.get("stop"), str):
        raise AapoError("stop: give a list of strings, e.g. stop: ['Question:', 'Answer:'] (got one string)")
    merged["stop"] = tuple(merged["stop"] or ())
    return protocol_settings(name, base=build_dataclass(EvalSettings, merged, ""), **flags)


def protocol_settings(protocol: str, base: EvalSettings | None = None, **overrides) -> EvalSettings:
    """``base`` (default: the protocol's defaults) with every non-None override applied, validated."""
    if protocol not in PROTOCOLS:
        raise AapoError(f"--protocol: unknown protocol '{protocol}'; choose {' or '.join(PROTOCOLS)}")
    greedy = overrides.pop("greedy", False)
    known = {f.name for f in fields(EvalSettings)}
    settings = replace(base or PROTOCOLS[protocol],
                       **{k: v for k, v in overrides.items() if v is not None and k in known})
    if greedy:
        settings.temperature = None
    validate_settings(settings)
    return settings


def validate_settings(s: EvalSettings) -> None:
    if "{problem}" not in s.prompt_template:
        raise AapoError("--prompt-template must contain '{problem}' where the problem text goes")
    if s.temperature is not None and not s.temperature > 0:
        raise AapoError(f"--temperature must be > 0 (got {s.temperature}); use --greedy for greedy decoding")
    if not 0 < s.top_p <= 1:
        raise AapoError(f"--top-p must be in (0, 1] (got {s.top_p})")
    for name in ("max_new_tokens", "n_samples", "batch_size"):
        if getattr(s, name) < 1:
            raise AapoError(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(s, name)})")
    if s.limit is not None and s.limit < 1:
        raise AapoError(f"--limit must be >= 1 (got {s.limit})")
    if not s.k or any(k < 1 for k in s.k):
        raise AapoError(f"--k: give positive integers like 1,4,8 (got {','.join(map(str, s.k))})")
    if max(s.k) > s.n_samples:
        raise AapoError(f"--k {max(s.k)} needs at least {max(s.k)} samples per problem; "
                        f"set --n-samples {max(s.k)} or more")
    if s.temperature is None and s.n_samples > 1:
        raise AapoError("--greedy gives one answer per problem; drop --greedy or use --n-samples 1")
    if any(not isinstance(x, str) or not x for x in s.stop):
        raise AapoError(f"stop: give a list of strings, e.g. stop: ['Question:', 'Answer:'] (got {list(s.stop)!r})")
    if s.backend not in ("hf", "vllm"):
        raise AapoError(f"backend must be one of hf, vllm (got {s.backend!r})")


def parse_k(text: str) -> tuple[int, ...]:
    try:
        ks = tuple(sorted({int(x) for x in text.split(",") if x.strip()}))
    except ValueError:
        raise AapoError(f"--k: give positive integers like 1,4,8 (got '{text}')") from None
    if not ks:
        raise AapoError(f"--k: give positive integers like 1,4,8 (got '{text}')")
    return ks


# --------------------------------------------------------------------------- metrics


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k = 1 - C(n-c, k) / C(n, k) for n samples of which c are correct."""
    if k > n:
        raise ValueError(f"k={k} > n={n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def benchmark_scores(records: list[dict], ks: tuple[int, ...]) -> dict:
    """pass@k (in %) over problems, from per-sample records of one benchmark."""
    by_problem: dict[str, list[bool]] = {}
    for r in records:
        by_problem.setdefault(r["problem_id"], []).append(bool(r["correct"]))
    scores = {}
    for k in ks:
        values = [pass_at_k(len(v), sum(v), k) for v in by_problem.values()]
        scores[f"pass@{k}"] = 100.0 * sum(values) / len(values) if values else float("nan")
    scores["problems"] = len(by_problem)
    scores["samples"] = len(records)
    for status in ("no_answer", "timeout", "error"):
        scores[status] = sum(r["status"] == status for r in records)
    scores["truncated"] = sum(bool(r.get("truncated")) for r in records)
    return scores


# --------------------------------------------------------------------------- the run


@dataclass
class ModelSpec:
    """One row of the results table."""

    label: str
    path: str  # what resolve_model_path accepts (or a LoRA checkpoint: its adapter)
    source: dict = field(default_factory=dict)  # e.g. {"run": dir, "step": 12}
    base_model: str = ""  # a LoRA checkpoint: the model.path its adapter is merged into (docs/lora.md)


def run_checkpoints(run_dir: str, step: str = "latest") -> list[ModelSpec]:
    """The saved checkpoints of a training run: ``latest``, ``all``, or one step number."""
    from aapo_app.checkpoint import saved_checkpoints, select_steps

    from aapo_app.lora import ADAPTER_CONFIG, lora_base_model

    # the gathered HF weights, or a LoRA run's adapter
    found = {s: d for s, d in saved_checkpoints(run_dir, "--run").items()
             if (d / "config.json").is_file() or (d / ADAPTER_CONFIG).is_file()}
    if not found:
        saved_checkpoints(run_dir, "--run", require="config.json")  # its one-line error
    steps = select_steps(found, step, run_dir, allow_all=True)
    root = Path(run_dir).expanduser()
    name = root.resolve().name
    return [ModelSpec(f"{name}@step-{s}", str(found[s]), {"run": str(root), "step": s}, lora_base_model(found[s]))
            for s in steps]


def _grade(records: list[dict], s: EvalSettings) -> None:
    """Grade every record against the gold as the protocol's reference reads it."""
    from aapo_app.grader import Grader

    golds = [r.get("reference_gold", r["gold"]) for r in records]
    kinds = [r.get("gold_kind", "answer") for r in records]
    with Grader(timeout_s=s.verify_timeout_s, num_workers=s.grader_workers, protocol=s.protocol) as grader:
        results = grader.grade_many(golds, [r["completion"] for r in records], kinds)
    for r, g in zip(records, results):
        r.update(extracted=g.predicted, gold_parsed=g.gold, correct=bool(g.correct), status=g.status)


def cut_at_stop(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    """``text`` up to the first occurrence of any stop string (excluded, as vLLM's ``stop`` does), and
    whether one occurred. Sampling is left to right, so this is the text a generator that stopped there
    would have returned; only the tokens after it were wasted."""
    cuts = [i for i in (text.find(x) for x in stop if x) if i >= 0]
    return (text[:min(cuts)], True) if cuts else (text, False)


def _gather_records(records: list[dict], rank: int, world: int) -> list[dict]:
    import torch.distributed as dist

    if world == 1:
        return records
    box = [None] * world if rank == 0 else None
    dist.gather_object(records, box, dst=0)
    return [r for part in box for r in part] if rank == 0 else []


class BatchJournal:
    """Finished generation batches of one model, appended to ``<dir>/<model>-<hash>/rank<r>.jsonl`` as
    they finish, so that an interrupted evaluation resumes (``--resume``) without sampling them again.

    The hash covers everything that decides the samples (model, data, generation settings), so a
    journal is only reused for the same evaluation. Batches are global (see the module docstring),
    so a resumed run may use a different number of ranks: each rank reads every file and takes the
    batches it owns."""

    def __init__(self, directory: Path, spec: ModelSpec, s: EvalSettings, data_dir: str | None, rank: int):
        import hashlib

        decides = {k: v for k, v in asdict(s).items() if k not in ("k", "verify_timeout_s", "grader_workers")}
        blob = json.dumps({"model": spec.path, "data": data_dir, "settings": decides}, sort_keys=True, default=str)
        safe = "".join(c if c.isalnum() or c in "-_.@" else "_" for c in spec.label)[:80]
        self.dir = Path(directory) / f"{safe}-{hashlib.sha1(blob.encode()).hexdigest()[:12]}"
        self.path = self.dir / f"rank{rank}.jsonl"

    def load(self) -> dict[tuple[str, int], list[dict]]:
        done = {}
        for f in sorted(self.dir.glob("rank*.jsonl")):
            for line in f.read_text().splitlines():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:  # the last line of a killed run may be cut short
                    continue
                done[(entry["benchmark"], entry["batch"])] = entry["records"]
        return done

    def append(self, benchmark: str, batch: int, records: list[dict]) -> None:
        import os

        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps({"benchmark": benchmark, "batch": batch, "records": records}) + "\n")
            f.flush()
            os.fsync(f.fileno())


def evaluate_model(spec: ModelSpec, problems: dict[str, list[Problem]], s: EvalSettings, *, data_dir: str | None,
                   ds_config: dict, rank: int, world: int, log=print, journal_dir: Path | None = None,
                   resume: bool = False) -> list[dict]:
    """All benchmarks of ``problems`` (name -> problems, in order) for one model; returns the
    per-sample records (complete on rank 0 only). ``data_dir`` only identifies the data in the journal.

    With ``journal_dir`` every finished batch is journaled there; with ``resume`` batches already in
    the journal are taken from it instead of being sampled again."""
    merged = None
    if spec.base_model:  # a LoRA checkpoint: evaluated as its base model with the adapter merged in
        from aapo_app.lora import merge_for_eval

        merged = merge_for_eval(spec, (journal_dir.parent if journal_dir is not None else Path(".")) / "merged", rank)
    try:
        return _evaluate_files(spec, merged or spec.path, problems, s, data_dir=data_dir, ds_config=ds_config, rank=rank,
                               world=world, log=log, journal_dir=journal_dir, resume=resume)
    finally:
        if merged is not None:
            from aapo_app.engine import barrier

            barrier()
            if rank == 0:
                import shutil

                shutil.rmtree(merged, ignore_errors=True)


def _evaluate_files(spec, path, problems, s, *, data_dir, ds_config, rank, world, log, journal_dir, resume):
    from tqdm import tqdm

    from aapo_app.builder import eval_generator, open_model
    from aapo_app.data import PromptStyle
    from aapo_app.generation import Sampling, encode_prompts
    from aapo_app.rollout import stream_seed

    files = open_model(path, rank)
    style = PromptStyle(files.tokenizer, s)
    benchmarks = list(problems)
    batches = []  # (benchmark, global batch index, problems) for every batch of every benchmark
    for name in benchmarks:
        items = problems[name]
        for b, start in enumerate(range(0, len(items), s.batch_size)):
            batches.append((name, b, items[start:start + s.batch_size]))
    mine = [batch for i, batch in enumerate(batches) if i % world == rank]
    journal = BatchJournal(journal_dir, spec, s, data_dir, rank) if journal_dir is not None else None
    done = journal.load() if journal is not None and resume else {}
    records = [r for name, b, _ in mine for r in done.get((name, b), [])]
    todo = [batch for batch in mine if (batch[0], batch[1]) not in done]
    if rank == 0 and done:
        log(f"resuming: {len(done)} of {len(batches)} batches already sampled for {spec.label}")
    generator = eval_generator(s.backend, files, ds_config, seed=s.seed, sampler=s.sampler)
    context = generator.max_model_len
    bar = tqdm(total=sum(len(p) for _, _, p in todo), desc=f"aapo eval [{spec.label}]", unit="problem",
               disable=rank != 0, file=sys.stderr, dynamic_ncols=True)
    capped = False
    with generator.session():  # the weights gathered once for all of this rank's batches (collective)
        for name, b, items in todo:
            prompts = [style.render(p.problem) for p in items]
            max_new = s.max_new_tokens
            if context:
                room = context - max(style.lengths(prompts))
                if room < max_new:
                    max_new, capped = max(1, room), True
            # the lighteval reference tokenizes templated text with its special tokens (a second BOS)
            special = style.add_special_tokens or (s.reference_quirks and s.protocol == "lighteval")
            ids, mask = encode_prompts(files.tokenizer, prompts, special)
            out = generator.sample(ids, mask, num_samples=s.n_samples, seed=stream_seed(s.seed, name, b),
                                   sampling=Sampling(max_new, s.temperature, s.top_p, s.top_k))
            batch_records = []
            for i, p in enumerate(items):
                reference_gold, kind = p.reference.get(s.protocol, (p.gold, "answer"))
                for j in range(s.n_samples):
                    row = i * s.n_samples + j
                    text, stopped = cut_at_stop(out.texts[row], s.stop)
                    batch_records.append(
                        {"model": spec.label, "benchmark": name, "problem_id": p.id, "sample": j, "batch": b,
                         "prompt": prompts[i], "completion": text, "tokens": int(out.lengths[row]),
                         "truncated": bool(out.truncated[row]) and not stopped, "stopped_at_stop_string": stopped,
                         "gold": p.gold, "reference_gold": reference_gold, "gold_kind": kind,
                         "max_new_tokens": max_new, "context": context})
            if journal is not None:
                journal.append(name, b, batch_records)
            records += batch_records
            bar.update(len(items))
    bar.close()
    if capped and rank == 0:
        log(f"note: max new tokens capped by the model's context ({context} positions; the results table shows it)")
    _grade(records, s)
    gathered = _gather_records(records, rank, world)
    if rank != 0:
        return []
    order = {name: i for i, name in enumerate(benchmarks)}
    index = {(name, p.id): i for name in benchmarks for i, p in enumerate(problems[name])}
    gathered.sort(key=lambda r: (order[r["benchmark"]], index[(r["benchmark"], r["problem_id"])], r["sample"]))
    return gathered


def summarize(records: list[dict], benchmarks: list[str], ks: tuple[int, ...]) -> dict:
    """Per-benchmark scores and their average (unweighted mean over benchmarks, as in the paper), and
    the generation length the samples actually had (``generation``: the smallest ``max_new_tokens``
    used, lower than asked when the model's context capped it, and that context)."""
    out = {}
    for name in benchmarks:
        rows = [r for r in records if r["benchmark"] == name]
        out[name] = benchmark_scores(rows, ks)
    out["average"] = {f"pass@{k}": sum(out[n][f"pass@{k}"] for n in benchmarks) / len(benchmarks) for k in ks}
    used = [r["max_new_tokens"] for r in records if r.get("max_new_tokens")]
    if used:
        out["generation"] = {"max_new_tokens": min(used),
                             "context": next((r["context"] for r in records if r.get("context")), None)}
    return out


def length_cell(scores: dict, asked: int) -> str:
    """The results table's "Max new tokens" cell: the length asked, or the cap and its reason."""
    gen = scores.get("generation") or {}
    used = gen.get("max_new_tokens", asked)
    if used >= asked:
        return f"{asked:,}"
    context = gen.get("context")
    reason = f"the model's {context:,}-position context" if context else "the model's context"
    return f"{used:,} (capped by {reason}; the protocol asks {asked:,})"


def markdown_table(results: dict[str, dict], benchmarks: list[str], ks: tuple[int, ...],
                   asked_tokens: int | None = None) -> str:
    """Rows = models, columns = benchmarks + Avg. (the paper's table), one table per k. With
    ``asked_tokens`` a last column gives each row's generation length (:func:`length_cell`), so a
    length capped by a short context shows beside the numbers it affects."""
    names = {"aime24": "AIME24", "math500": "MATH-500", "amc23": "AMC23", "minerva": "Minerva",
             "olympiadbench": "OlympiadBench"}
    parts = []
    for k in ks:
        header = "| Model | " + " | ".join(names[b] for b in benchmarks) + " | Avg. |"
        rule = "|---|" + "---:|" * (len(benchmarks) + 1)
        if asked_tokens is not None:
            header, rule = header + " Max new tokens |", rule + "---|"
        rows = [f"pass@{k} (%)", "", header, rule]
        for label, scores in results.items():
            cells = [f"{scores[b][f'pass@{k}']:.1f}" for b in benchmarks]
            row = f"| {label} | " + " | ".join(cells) + f" | {scores['average'][f'pass@{k}']:.1f} |"
            if asked_tokens is not None:
                row += f" {length_cell(scores, asked_tokens)} |"
            rows.append(row)
        parts.append("\n".join(rows))
    return "\n\n".join(parts) + "\n"


def write_results(out_dir: Path, specs: list[ModelSpec], benchmarks: list[str], s: EvalSettings,
                  data_dir: str | None, results: dict, records: list[dict], seconds: float) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = asdict(s)
    settings["k"] = list(s.k)
    payload = {
        "settings": settings,
        "benchmarks": benchmarks,
        "data": {b: (str(Path(data_dir) / BENCHMARKS[b].local_name) if data_dir else BENCHMARKS[b].hub_id)
                 for b in benchmarks},
        "models": [{"label": m.label, "path": m.path, **m.source} for m in specs],
        "results": results,
        "seconds": seconds,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    paths = {"json": out_dir / "results.json", "markdown": out_dir / "results.md", "samples": out_dir / "samples.jsonl"}
    paths["json"].write_text(json.dumps(payload, indent=2))
    temp = "greedy" if s.temperature is None else f"T={s.temperature}, top-p={s.top_p}"
    paths["markdown"].write_text(
        f"# aapo eval ({s.protocol} protocol, {temp}, {s.n_samples} sample(s) per problem, "
        f"max {s.max_new_tokens} new tokens{', first ' + str(s.limit) + ' problems' if s.limit else ''})\n\n"
        + markdown_table(results, benchmarks, s.k, s.max_new_tokens))
    with open(paths["samples"], "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return paths
