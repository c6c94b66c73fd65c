"""AAPO with the reference group sampled online every step against read from a cache, and both
against GRPO's step, over seeds.

Builds the cache once (``aapo reference-rollouts``), then runs ``aapo train`` (the embedded default
unless overridden) for every seed in three arms: AAPO with ``rollout.reference_cache=''`` (online),
AAPO with ``rollout.reference_cache=DIR`` (cached) and GRPO (``algorithm.name=grpo``, which scores
the reference's log-probs for its KL term instead of sampling a reference group), interleaved so that
machine noise hits the arms alike, one run at a time, skipping runs that already finished (so it can
be resumed; ``--no-grpo`` leaves the third arm out). Prints and writes a table: held-out accuracy
before/after (mean ± std over seeds), AAPO's diagnostics (reference reward, group term, momentum
term, clipping of the momentum), and seconds per step, rollout and update, with the cached/online,
online/GRPO and cached/GRPO ratios.

    python bench/cached_reference.py --out runs/cached-reference --seeds 0,1,2
    python bench/cached_reference.py --out runs/cached-reference --seeds 0,1,2 rollout.group_size=8
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from _common import write_results  # noqa: E402

DIAGNOSTICS = ("ref_reward/mean", "algo/group_term_mean", "algo/momentum_mean", "algo/momentum_clip_low_frac",
               "algo/momentum_clip_high_frac", "reward/mean")
TIMES = ("step_seconds", "rollout_seconds", "update_seconds")


def aapo(*args) -> None:
    cmd = [sys.executable, "-m", "aapo_app", *map(str, args)]
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def run_arm(out: Path, mode: str, seed: int, cache: Path, overrides: list[str]) -> Path:
    run_dir = out / f"{mode}-seed{seed}"
    if (run_dir / "summary.json").exists():
        return run_dir
    shutil.rmtree(run_dir, ignore_errors=True)  # an interrupted run starts again
    if mode == "grpo":
        arm = ["algorithm.name=grpo"]
    else:
        arm = ["algorithm.name=aapo", f"rollout.reference_cache={'' if mode == 'online' else cache}"]
    aapo("train", "--output-dir", run_dir, "--seed", seed, *arm, "train.save_final=false", *overrides)
    return run_dir


def read_run(run_dir: Path) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "step_seconds" in r]
    return {"eval_before": summary["eval_before"], "eval_after": summary["eval_after"],
            **{k: statistics.fmean(r[k] for r in steps) for k in DIAGNOSTICS + TIMES if all(k in r for r in steps)}}


def mean_std(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.3f}"
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/cached-reference")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--results", default=str(ROOT / "bench" / "results" / "cached_reference"))
    p.add_argument("--no-grpo", action="store_true", help="leave out the GRPO arm")
    p.add_argument("overrides", nargs="*", help="KEY=VALUE run-config overrides for every run and the cache")
    args = p.parse_args()
    out, seeds = Path(args.out).resolve(), [int(s) for s in args.seeds.split(",")]
    start = time.perf_counter()
    runs = {mode: [] for mode in ("online", "cached") + (() if args.no_grpo else ("grpo",))}
    for seed in seeds:
        # the train/held-out split follows train.seed, so each seed has its own training prompts
        cache = out / f"cache-seed{seed}"
        aapo("reference-rollouts", "--out", cache, "--batch-prompts", 8, f"train.seed={seed}", "algorithm.name=aapo",
             *args.overrides)
        for mode in runs:
            runs[mode].append(read_run(run_arm(out, mode, seed, cache, args.overrides)))
    keys = ["eval_before", "eval_after", *DIAGNOSTICS, *TIMES]
    arms = list(runs)
    pairs = [("cached", "online")] + ([("online", "grpo"), ("cached", "grpo")] if "grpo" in runs else [])
    lines = [f"The embedded default{' with ' + ' '.join(args.overrides) if args.overrides else ''}, seeds "
             f"{args.seeds}; {time.perf_counter() - start:.0f} s in all (caches and runs not already done). "
             f"online, cached: AAPO with its reference group sampled every step or read from the cache; grpo: GRPO "
             f"(reference log-probs for its KL term).", "",
             "| | " + " | ".join(arms) + " | " + " | ".join(f"{a} / {b}" for a, b in pairs) + " |",
             "|---|" + "---:|" * (len(arms) + len(pairs))]
    for k in keys:
        values = {arm: [r[k] for r in runs[arm] if k in r] for arm in arms}
        if not values["online"] or not values["cached"]:
            continue
        cells = [mean_std(values[arm]) if values[arm] else "–" for arm in arms]
        ratios = [f"{statistics.fmean(values[a]) / statistics.fmean(values[b]):.2f}"
                  if k in TIMES and values[a] and values[b] else "" for a, b in pairs]
        lines.append(f"| {k} | " + " | ".join(cells + ratios) + " |")
    res = {"seeds": seeds, "overrides": args.overrides, "runs": runs}
    write_results(args.results, res, "\n".join(lines))


if __name__ == "__main__":
    main()
