"""Experiment tracking: wandb and TensorBoard, on rank 0, beside the always-written metrics.jsonl.

``train.report_to`` (or ``aapo train --report-to wandb,tensorboard``) turns them on:

* **wandb**: one run per training run, named ``train.run_name`` (default: the run directory's
  name), with ``train.tags``, the full resolved config, the DeepSpeed configs and the git commit of
  the code. Without an API key (``WANDB_API_KEY`` or a ``~/.netrc`` entry), or when api.wandb.ai
  cannot be reached, it runs in offline mode and prints the ``wandb sync`` command that uploads
  the run later. ``WANDB_MODE`` set by the user wins.
* **tensorboard**: event files under ``<run dir>/tensorboard``.

Every ``train.log_samples_every`` steps a sample of the rollout (the first prompt's G samples: the
prompt, each policy completion and its reference completion, every reward part, the advantage and,
for AAPO, its group and momentum terms) goes to both as a table, and always to
``<run dir>/samples/step-<N>.md``.
"""

from __future__ import annotations

import json
import netrc
import os
import secrets
import socket
import subprocess
from pathlib import Path

from aapo_app.errors import AapoError

REPORTERS = ("wandb", "tensorboard")


def git_commit() -> str:
    """The commit of the aapo code that runs (with ``-dirty`` when it has local changes), or unknown.

    Only a checkout has one: an installed copy (site-packages, a --target folder) is not the root of a
    git repository, and the repository around it (a venv inside some checkout) is not this code's.
    """
    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():  # a directory in a clone, a file in a worktree
        return "unknown"
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        if sha.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return sha.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def wandb_mode() -> tuple[str, str]:
    """(mode, why): online when a key is configured and api.wandb.ai answers, else offline."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"], "WANDB_MODE is set"
    has_key = bool(os.environ.get("WANDB_API_KEY"))
    if not has_key:
        try:
            has_key = netrc.netrc().authenticators("api.wandb.ai") is not None
        except (FileNotFoundError, netrc.NetrcParseError, OSError):
            has_key = False
    if not has_key:
        return "offline", "no wandb API key (WANDB_API_KEY or ~/.netrc)"
    try:
        socket.create_connection(("api.wandb.ai", 443), timeout=3).close()
    except OSError:
        return "offline", "api.wandb.ai cannot be reached"
    return "online", "API key and network"


def sample_rows(scored, group: int = 0) -> list[dict]:
    """One prompt group of a scored batch as table rows."""
    batch, G = scored.rollout, scored.rollout.group_size
    ex = batch.examples[group]
    rows = []
    for j in range(G):
        i = group * G + j
        row = {"prompt": ex.problem, "answer": ex.answer, "completion": batch.policy.texts[i],
               "reward": float(scored.rewards[group, j])}
        if batch.reference is not None:
            row["ref_completion"] = batch.reference.texts[i]
            row["ref_reward"] = float(scored.ref_rewards[group, j])
        for name, values in scored.reward_parts.items():
            row[f"reward/{name}"] = float(values[group, j])
        row["advantage"] = float(scored.advantages[group, j])
        for name, values in scored.advantage_parts.items():
            row[f"advantage/{name}"] = float(values[group, j])
        rows.append(row)
    return rows


def markdown_rows(rows: list[dict]) -> str:
    if not rows:
        return ""
    cols = list(rows[0])

    def cell(v):
        text = f"{v:.4g}" if isinstance(v, float) else str(v)
        return text.replace("|", "\\|").replace("\n", "<br>")

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


class Reporter:
    """Rank 0's connection to wandb / TensorBoard (a no-op on other ranks and when none is asked for)."""

    def __init__(self, targets: list[str], output_dir: Path, run_name: str, tags: list[str], project: str,
                 config: dict, rank: int, log=print):
        self.targets = list(targets) if rank == 0 else []
        self.output_dir = Path(output_dir)
        self.wandb_run = None
        self.tb = None
        self.log = log
        if "wandb" in self.targets:
            try:
                import wandb
            except ImportError:
                raise AapoError("train.report_to: wandb is not installed; `pip install 'aapo[wandb]'` or drop wandb") from None
            mode, why = wandb_mode()
            self.wandb_mode = mode
            id_file = self.output_dir / "wandb_run_id"  # a resumed run continues the same wandb run
            run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
            self.wandb_run = wandb.init(project=project, name=run_name, tags=list(tags), config=config,
                                        dir=str(self.output_dir), mode=mode, id=run_id, resume="allow",
                                        reinit="finish_previous")
            id_file.write_text(run_id)
            log(f"wandb: {mode} ({why}); run '{run_name}' in project '{project}'")
        if "tensorboard" in self.targets:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise AapoError("train.report_to: tensorboard is not installed; `pip install tensorboard` or drop "
                                "tensorboard") from None
            self.tb = SummaryWriter(log_dir=str(self.output_dir / "tensorboard"))
            self.tb.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```", 0)

    def metrics(self, m: dict, step: int) -> None:
        numbers = {k: v for k, v in m.items() if k != "step" and isinstance(v, (int, float))}
        if self.wandb_run is not None:
            self.wandb_run.log(numbers, step=step)
        if self.tb is not None:
            for k, v in numbers.items():
                self.tb.add_scalar(k, v, step)

    def samples(self, rows: list[dict], step: int) -> None:
        if self.wandb_run is not None and rows:
            import wandb

            cols = list(rows[0])
            self.wandb_run.log({"rollout_samples": wandb.Table(columns=cols, data=[[r[c] for c in cols] for r in rows])},
                               step=step)
        if self.tb is not None and rows:
            self.tb.add_text("rollout_samples", markdown_rows(rows), step)

    def finish(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.wandb_run is not None:
            run_dir = Path(self.wandb_run.dir).parent
            self.wandb_run.finish()
            self.wandb_run = None
            if self.wandb_mode == "offline":
                self.log(f"wandb: offline run saved; upload it with: wandb sync {run_dir}")


def write_samples_file(output_dir: Path, step: int, rows: list[dict]) -> Path:
    path = Path(output_dir) / "samples" / f"step-{step}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# Rollout sample, step {step}\n\n" + markdown_rows(rows))
    return path


def parse_report_to(text: str) -> list[str]:
    targets = [t.strip() for t in text.split(",") if t.strip()]
    for t in targets:
        if t not in REPORTERS:
            raise AapoError(f"--report-to: unknown target '{t}'; choose from {', '.join(REPORTERS)} (comma list)")
    return targets
