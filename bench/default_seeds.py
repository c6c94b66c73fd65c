"""`aapo train` exactly as it ships (no arguments but the seed), or with a config file and overrides, over seeds.

For each seed S this runs ``aapo train [--config FILE] [KEY=VALUE ...] --seed S --output-dir DIR/<algorithm>-seed<S>``
in a subprocess, one after another (a seed whose run finished is skipped, so the script resumes; an
unfinished one is started again), then writes ``bench/results/default_seeds.{json,md}``: held-out
accuracy before and after training per seed (the seed also draws the held-out problems), the gain,
the held-out format rate where the reward includes a format, the wall-clock time of the whole
command (model load, both evaluations and training), the peak RSS of the `aapo train` process, the
precision the run used, and the machine (CPU model, torch threads and the CPU's bf16 flags).

    python bench/default_seeds.py                       # seeds 0-4 into runs/default-seeds
    python bench/default_seeds.py --seeds 0 1 --out runs/ds   # fewer seeds; --report-only rewrites the table
    python bench/default_seeds.py --out runs/ds-fp32 --results bench/results/default_seeds_fp32 precision=fp32
    python bench/default_seeds.py --config my-run.yaml --out runs/mine --results bench/results/my_run_seeds

The run directories are named as ``aapo compare`` names its runs, so ``aapo compare --out DIR`` (with
the same config and overrides) adds the other algorithms to these runs without training them again.

The model must be converted once beforehand (``aapo train`` does it on its first run) for the times
to be those of a user's second run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._common import cpu_flags_text, machine, write_results  # noqa: E402


def train_args(config: str | None, overrides: list[str]) -> list[str]:
    return [*(["--config", config] if config else []), *overrides]


def run_dir_of(out: Path, seed: int, config: str | None, overrides: list[str]) -> Path:
    from aapo_app.compare import run_name
    from aapo_app.config import load_run_config

    return out / run_name(load_run_config(config, overrides).algorithm.name, seed)


def run_seed(out: Path, seed: int, config: str | None, overrides: list[str]) -> None:
    run_dir = run_dir_of(out, seed, config, overrides)
    if (run_dir / "summary.json").is_file() and (run_dir / "wall_seconds.txt").is_file():
        print(f"seed {seed}: done already ({run_dir})", flush=True)
        return
    if run_dir.exists():
        shutil.rmtree(run_dir)
    cmd = [sys.executable, "-m", "aapo_app", "train", *train_args(config, overrides), "--seed", str(seed),
           "--output-dir", str(run_dir)]
    print("+ " + " ".join(cmd[1:]), flush=True)
    start = time.perf_counter()
    child = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)  # this child's own rusage: its peak RSS (KiB on Linux)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise subprocess.CalledProcessError(child.returncode, cmd)
    (run_dir / "wall_seconds.txt").write_text(f"{time.perf_counter() - start:.1f}\n")
    (run_dir / "peak_rss_mb.txt").write_text(f"{usage.ru_maxrss / 1024:.0f}\n")


def row(run_dir: Path) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    info = json.loads((run_dir / "run_info.json").read_text())
    return {"before": summary["eval_before"], "after": summary["eval_after"], "problems": summary["eval_problems"],
            "format_before": summary.get("eval_format_before"), "format_after": summary.get("eval_format_after"),
            "steps": summary["steps"], "wall_s": float((run_dir / "wall_seconds.txt").read_text()),
            "peak_rss_mb": float(rss.read_text()) if (rss := run_dir / "peak_rss_mb.txt").is_file() else None,
            "precision": info["precision"]["name"]}


def _gb(megabytes) -> str:
    return "–" if megabytes is None else f"{megabytes / 1024:.1f} GB"


def _pct(value) -> str:
    return "–" if value is None else f"{100 * value:.1f} %"


def report(out: Path, seeds: list[int], results: str, config: str | None, overrides: list[str]) -> None:
    import torch

    rows = {s: row(run_dir_of(out, s, config, overrides)) for s in seeds}
    gains = [100 * (r["after"] - r["before"]) for r in rows.values()]
    args = " ".join(train_args(config, overrides))
    what = (f"`aapo train {args} --seed S`" if args else
            "`aapo train --seed S` (the shipped default, nothing else set)")
    lines = [f"{what} on {machine(torch.device('cpu'))}, CPU flags: {cpu_flags_text()}; written by "
             f"`python bench/default_seeds.py{' ' + args if args else ''}`.",
             "",
             "| seed | held-out accuracy before → after | gain (points) | format rate before → after | problems | steps "
             "| precision | wall time | peak RSS |",
             "|---|---|---:|---|---:|---:|---|---:|---:|"]
    for s, r in rows.items():
        fmt = (f"{_pct(r['format_before'])} → {_pct(r['format_after'])}"
               if r["format_before"] is not None else "not rewarded")
        lines.append(f"| {s} | {100 * r['before']:.1f} % → {100 * r['after']:.1f} % | {100 * (r['after'] - r['before']):+.1f} "
                     f"| {fmt} | {r['problems']} | {r['steps']} | {r['precision']} | {r['wall_s'] / 60:.1f} min "
                     f"| {_gb(r['peak_rss_mb'])} |")
    mean_before = statistics.mean(100 * r["before"] for r in rows.values())
    mean_after = statistics.mean(100 * r["after"] for r in rows.values())
    lines.append(f"| mean | {mean_before:.1f} % → {mean_after:.1f} % | {statistics.mean(gains):+.1f} | | | | | "
                 f"{statistics.mean(r['wall_s'] for r in rows.values()) / 60:.1f} min | |")
    lines += ["", f"Smallest gain: {min(gains):+.1f} points; largest wall time: "
                  f"{max(r['wall_s'] for r in rows.values()) / 60:.1f} min (model load, both evaluations and training)."]
    text = "\n".join(lines) + "\n"
    write_results(results, {"machine": machine(torch.device("cpu")), "cpu_flags": cpu_flags_text(), "config": config,
                            "overrides": overrides, "seeds": {str(s): r for s, r in rows.items()},
                            "mean_gain_points": statistics.mean(gains), "min_gain_points": min(gains)}, text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--config", help="a run config for every seed (default: none, the shipped default)")
    parser.add_argument("--out", default="runs/default-seeds", help="run directories (one per seed)")
    parser.add_argument("--results", default=str(ROOT / "bench" / "results" / "default_seeds"),
                        help="where the table goes (.json and .md are added)")
    parser.add_argument("--report-only", action="store_true", help="rewrite the table from finished runs")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides for every seed")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    if not args.report_only:
        for seed in args.seeds:
            run_seed(out, seed, args.config, args.overrides)
    report(out, args.seeds, args.results, args.config, args.overrides)


if __name__ == "__main__":
    main()
