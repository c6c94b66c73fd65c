"""``aapo plot``: training curves of one or more runs, overlaid, from their metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

from aapo_app.errors import AapoError
from aapo_app.metrics import read_metrics

# (metric, panel title); a panel is drawn when at least one run has the metric
PANELS = [
    ("reward/mean", "reward (mean)"),
    ("accuracy", "accuracy (train samples)"),
    ("eval/accuracy", "held-out accuracy"),
    ("loss", "loss"),
    ("completion_len/mean", "completion length (tokens)"),
    ("algo/zero_std_group_frac", "zero-std group fraction"),
    ("algo/momentum_clip_low_frac", "AAPO momentum clipped low (samples)"),
    ("algo/momentum_clip_high_frac", "AAPO momentum clipped high (samples)"),
    ("algo/ratio_clip_frac", "ratio clipped (tokens)"),
    ("grad_norm", "gradient norm"),
]


def read_run(run_dir: str) -> tuple[str, list[dict]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise AapoError(f"RUN_DIR: '{run_dir}' has no metrics.jsonl; give a training run directory")
    rows = read_metrics(path)
    if not rows:
        raise AapoError(f"RUN_DIR: '{run_dir}' has an empty metrics.jsonl; let the run take a step first")
    algorithm = ""
    summary = Path(run_dir) / "summary.json"
    config = Path(run_dir) / "config.yaml"
    if summary.is_file():
        algorithm = json.loads(summary.read_text()).get("algorithm", "")
    elif config.is_file():
        import yaml

        algorithm = (yaml.safe_load(config.read_text()) or {}).get("algorithm", {}).get("name", "")
    label = Path(run_dir).resolve().name + (f" ({algorithm})" if algorithm and algorithm not in Path(run_dir).name else "")
    return label, rows


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average over ``window`` points (1 = raw)."""
    out = []
    for i in range(len(values)):
        part = values[max(0, i - window + 1): i + 1]
        out.append(sum(part) / len(part))
    return out


def plot_runs(run_dirs: list[str], out: str, window: int = 1) -> list[str]:
    """Draw every panel some run has; returns the panel metrics drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [read_run(d) for d in run_dirs]
    drawn = [(key, title) for key, title in PANELS if any(key in r for _, rows in runs for r in rows)]
    cols = 3
    nrows = (len(drawn) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 3.4 * nrows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    color = {label: colors[i % len(colors)] for i, (label, _) in enumerate(runs)}  # one colour per run everywhere
    for ax, (key, title) in zip(axes.flat, drawn):
        for label, rows in runs:
            points = [(r["step"], r[key]) for r in rows if key in r and r[key] is not None]
            if not points:
                continue
            steps, values = zip(*points)
            if key == "eval/accuracy":  # a few evaluations: points joined by lines
                ax.plot(steps, values, marker="o", label=label, color=color[label])
            else:
                ax.plot(steps, smooth(list(values), window), label=label, color=color[label])
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(drawn):]:
        ax.set_visible(False)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=color[label]) for label, _ in runs]
    fig.legend(handles, [label for label, _ in runs], loc="lower center", ncol=min(len(runs), 4), frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    _save(fig, out)
    return [key for key, _ in drawn]


def _save(fig, out: str) -> None:
    import matplotlib.pyplot as plt

    try:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=110)
    except OSError as exc:
        raise AapoError(f"--out: cannot write '{out}' ({exc.strerror or exc}); choose a writable path") from exc
    finally:
        plt.close(fig)


def plot_comparison(results: dict, out: str) -> None:
    """``aapo compare``'s figure from its results (:func:`aapo_app.compare.build_results`). Top row:
    policy reward and training accuracy against step (mean over seeds, 95 % CI band) and the
    held-out accuracy before and after training (95 % CI error bars). Bottom row: the fraction of
    prompt groups whose rewards are all equal and the gradient norm against step, and the
    gradient norm against that fraction, one point per step of every run's mean curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    algos = results["by_algorithm"]
    fig, axes = plt.subplots(2, 3, figsize=(16, 8.4))
    (reward_ax, acc_ax, held_ax), (flat_ax, grad_ax, scatter_ax) = axes
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (algo, entry) in enumerate(algos.items()):
        color = colors[i % len(colors)]
        curves = entry["curves"]
        for ax, key in ((reward_ax, "reward/mean"), (acc_ax, "accuracy"), (flat_ax, "algo/zero_std_group_frac"),
                        (grad_ax, "grad_norm")):
            curve = curves.get(key) or {"steps": []}
            if not curve["steps"]:
                continue
            ax.plot(curve["steps"], curve["mean"], color=color, label=f"{algo} (n={curve['n']})")
            if curve["n"] > 1:
                low = [m - h for m, h in zip(curve["mean"], curve["ci95_half"])]
                high = [m + h for m, h in zip(curve["mean"], curve["ci95_half"])]
                ax.fill_between(curve["steps"], low, high, color=color, alpha=0.15)
        flat, grad = curves.get("algo/zero_std_group_frac") or {}, curves.get("grad_norm") or {}
        if flat.get("steps") and grad.get("steps"):
            by_step = dict(zip(grad["steps"], grad["mean"]))
            points = [(f, by_step[s]) for s, f in zip(flat["steps"], flat["mean"]) if s in by_step]
            scatter_ax.scatter([p[0] for p in points], [p[1] for p in points], color=color, s=18, label=algo)
        points = [(x, entry[key]) for x, key in ((0, "eval_before"), (1, "eval_after")) if entry[key]["mean"] is not None]
        if points:
            offset = (i - (len(algos) - 1) / 2) * 0.06
            held_ax.errorbar([x + offset for x, _ in points], [100 * e["mean"] for _, e in points],
                             yerr=[100 * (e["ci95_half"] or 0.0) for _, e in points], color=color, marker="o",
                             capsize=4, label=algo)
    reward_ax.set_title("policy reward: mean over seeds, band = 95 % CI")
    acc_ax.set_title("training accuracy: mean over seeds, band = 95 % CI")
    acc_ax.axhline(results["threshold"], color="grey", linestyle="--", linewidth=1,
                   label=f"threshold {100 * results['threshold']:g}%")
    flat_ax.set_title("groups with all rewards equal (fraction)")
    grad_ax.set_title("gradient norm before clipping")
    for ax in (reward_ax, acc_ax, flat_ax, grad_ax):
        ax.set_xlabel("step")
    held_ax.set_title("held-out accuracy (%), error bars = 95 % CI")
    held_ax.set_xticks([0, 1], ["before", "after"])
    held_ax.set_xlim(-0.5, 1.5)
    scatter_ax.set_title("gradient norm against flat-group fraction (a step)")
    for ax in (acc_ax, flat_ax):  # fractions: a band past [0, 1] is the CI of few seeds, clipped for reading
        ax.set_ylim(-0.05, 1.05)
    scatter_ax.set_xlabel("fraction of groups with all rewards equal (mean over seeds)")
    scatter_ax.set_ylabel("gradient norm (mean over seeds)")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    acc_ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    _save(fig, out)
