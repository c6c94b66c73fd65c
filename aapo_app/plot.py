"""``aapo plot``: training curves of one or more runs, overlaid, from their metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

from aapo_app.errors import AapoError

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
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
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
    try:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=110)
    except OSError as exc:
        raise AapoError(f"--out: cannot write '{out}' ({exc.strerror or exc}); choose a writable path") from exc
    finally:
        plt.close(fig)
    return [key for key, _ in drawn]
