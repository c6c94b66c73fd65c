"""The paper's Table 1, Figure 2 and loss variance in miniature: every algorithm x seed at the same budget.

Runs ``aapo train`` once per (algorithm, seed) on the embedded default (or whatever the overrides
say), one run after another, skipping runs that already finished (so it can be resumed), then
writes ``table.md`` (held-out accuracy mean ± std over seeds, steps to reach a training-accuracy
threshold, variance of the training loss) and ``curves.png`` (reward and accuracy against step,
mean over seeds with a min-max band).

    python bench/compare_algorithms.py --out runs/compare --steps 12 --seeds 0,1,2
    python bench/compare_algorithms.py --out runs/compare --report-only      # redo table and plot

Needs matplotlib (``pip install -e '.[bench]'``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ALGORITHMS = "aapo,grpo,gpg,dr_grpo,dapo"


def run_all(args, extra: list[str]) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = [(a, s) for s in args.seeds for a in args.algorithms]
    for k, (algo, seed) in enumerate(runs, 1):
        run_dir = out / f"{algo}-seed{seed}"
        if (run_dir / "summary.json").exists():
            print(f"[{k}/{len(runs)}] {run_dir} done already", flush=True)
            continue
        if run_dir.exists():  # an interrupted run: start it again
            for f in sorted(run_dir.rglob("*"), reverse=True):
                f.unlink() if f.is_file() else f.rmdir()
            run_dir.rmdir()
        cmd = [sys.executable, "-m", "aapo_app", "train", "--max-steps", str(args.steps), "--seed", str(seed),
               "--output-dir", str(run_dir), f"algorithm.name={algo}", "train.log_rollouts=false", "train.save_final=false",
               *extra]
        print(f"[{k}/{len(runs)}] + {' '.join(cmd)}", flush=True)
        start = time.time()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        print(f"    {time.time() - start:.0f} s", flush=True)


def load(out: Path, algorithms, seeds):
    data = {}
    for algo in algorithms:
        for seed in seeds:
            path = out / f"{algo}-seed{seed}" / "metrics.jsonl"
            if path.exists():
                data.setdefault(algo, {})[seed] = [json.loads(x) for x in path.read_text().splitlines()]
    return data


def mean_std(values):
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def steps_to(curve, threshold, window=3):
    """First step whose trailing `window`-step mean of training accuracy reaches `threshold`."""
    for i in range(window - 1, len(curve)):
        if statistics.fmean(curve[i - window + 1:i + 1]) >= threshold:
            return i + 1
    return None


def report(out: Path, algorithms, seeds, threshold: float) -> str:
    data = load(out, algorithms, seeds)
    lines = [
        f"| algorithm | held-out accuracy after (%) | before (%) | steps to train acc ≥ {threshold:.0%} "
        "(3-step mean) | training-loss variance | zero-std groups | ratio-clipped tokens | extra rollout rounds "
        "| optimizer steps / step | seeds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def step_mean(runs, key):
        values = [m[key] for r in runs.values() for m in r[1:] if key in m]
        return f"{statistics.fmean(values):.3g}" if values else "–"

    for algo in algorithms:
        runs = data.get(algo, {})
        after = [100 * r[-1]["eval/accuracy"] for r in runs.values() if "eval/accuracy" in r[-1]]
        before = [100 * r[0]["eval/accuracy"] for r in runs.values()]
        reach = [steps_to([m["accuracy"] for m in r[1:]], threshold) for r in runs.values()]
        reached = [s for s in reach if s is not None]
        loss_var = [statistics.pvariance([m["loss"] for m in r[1:]]) for r in runs.values() if len(r) > 2]
        a_m, a_s = mean_std(after)
        b_m, _ = mean_std(before)
        r_m, r_s = mean_std(reached)
        v_m, v_s = mean_std(loss_var)
        reach_text = f"{r_m:.1f} ± {r_s:.1f} ({len(reached)}/{len(reach)} reached)" if reached else f"never (0/{len(reach)})"
        lines.append(f"| {algo} | {a_m:.1f} ± {a_s:.1f} | {b_m:.1f} | {reach_text} | {v_m:.2e} ± {v_s:.1e} "
                     f"| {step_mean(runs, 'algo/zero_std_group_frac')} | {step_mean(runs, 'algo/ratio_clip_frac')} "
                     f"| {step_mean(runs, 'resample_rounds')} | {step_mean(runs, 'optimizer_steps')} | {len(runs)} |")
    table = "\n".join(lines) + "\n"
    (out / "table.md").write_text(table)
    plot(data, out / "curves.png")
    return table


def plot(data, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in ((axes[0], "reward/mean", "policy reward"), (axes[1], "accuracy", "policy sample accuracy")):
        for algo, runs in data.items():
            curves = [[m[key] for m in r[1:]] for r in runs.values()]
            n = min(len(c) for c in curves)
            steps = list(range(1, n + 1))
            cols = [[c[i] for c in curves] for i in range(n)]
            mean = [statistics.fmean(c) for c in cols]
            line, = ax.plot(steps, mean, label=f"{algo} ({len(curves)} seeds)")
            ax.fill_between(steps, [min(c) for c in cols], [max(c) for c in cols], color=line.get_color(), alpha=0.15)
        ax.set_xlabel("step")
        ax.set_title(f"{title}: mean over seeds, band = min-max")
        ax.grid(alpha=0.3)
    axes[1].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/compare")
    p.add_argument("--algorithms", default=ALGORITHMS, type=lambda s: s.split(","))
    p.add_argument("--seeds", default="0,1,2", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--threshold", type=float, default=0.9, help="training accuracy for the steps-to column")
    p.add_argument("--report-only", action="store_true")
    args, extra = p.parse_known_args()
    if not args.report_only:
        run_all(args, extra)
    print(report(Path(args.out), args.algorithms, args.seeds, args.threshold))


if __name__ == "__main__":
    main()
