"""``aapo compare``: algorithms × seeds on one config, one run after another, paired by seed.

    aapo compare --out runs/cmp --algorithms aapo,grpo,gpg,dr_grpo,dapo --seeds 0,1,2,3,4 --baseline grpo \\
        --config run.yaml train.save_every=2        # KEY=VALUE to every run; aapo:KEY=VALUE to one algorithm
    aapo compare --out runs/cmp --nproc 2 ...       # each run on 2 ranks (torchrun on this machine)
    aapo compare --out runs/cmp --report-only --threshold 0.8     # the report again, from the runs

Each (algorithm, seed) trains through ``aapo train`` in a child process, in ``OUT/<algorithm>-seed<S>/``
(output in ``OUT/logs/``). A finished run is skipped, an interrupted one resumed from its newest
checkpoint (``--resume latest``) or, when it saved none, started again; so the command survives
being killed and continues when given again. ``OUT/compare.json`` records the settings every run
shares (the resolved run config of each algorithm, the DeepSpeed configs, ``--nproc``): a later
invocation may add algorithms or seeds, but one with other settings is refused with one line
naming the setting, before anything is touched.

The report (``compare.md``, ``results.json``, ``curves.png``) is computed from the runs' files only:
``metrics.jsonl`` (step 0 holds the held-out accuracy before training, the last step the one after),
``config.yaml`` and ``run_info.json`` (world size and the data fingerprints that check the pairing).
The statistics are :mod:`aapo_app.stats`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from aapo_app import stats
from aapo_app.errors import AapoError
from aapo_app.metrics import read_metrics

DEFAULT_ALGORITHMS = ("aapo", "grpo", "gpg", "dr_grpo", "dapo")
DEFAULT_SEEDS = (0, 1, 2)
MANIFEST = "compare.json"
RESULTS = "results.json"
TABLE = "compare.md"
CURVES = "curves.png"
LOCK = ".compare.lock"
#: config keys each run of a comparison sets itself
PER_RUN_KEYS = ("algorithm.name", "train.seed", "output_dir")

DEFINITIONS = {
    "ci95_half": "half-width of the two-sided 95 % Student-t confidence interval of the mean over seeds: "
                 "t_{0.975, n-1} x s / sqrt(n), s the sample standard deviation (n - 1)",
    "eval_before / eval_after": "held-out accuracy (greedy, data.eval_size problems) before training (step 0) and "
                                "after the last step, as a fraction",
    "improvement": "eval_after - eval_before of each seed, then mean and CI over seeds",
    "vs_baseline": "eval_after(algorithm) - eval_after(baseline) of each seed (same held-out set and data order), "
                   "then mean, CI, the paired t-test (two-sided, n - 1 dof) and the exact sign-flip permutation "
                   "test (two-sided; every one of the 2^n sign assignments; smallest possible p is 2 / 2^n)",
    "steps_to_threshold": "first step s >= window whose trailing window-step mean of the training accuracy "
                          "(metric accuracy, the policy samples' fraction graded correct) reaches the threshold; "
                          "runs that never do are counted, not averaged in",
    "samples_to_threshold": "policy completions sampled up to and including that step: prompts_per_rank x G x ranks "
                            "x (1 + resample_rounds) per step (DAPO's dynamic sampling and GPG's regeneration rounds "
                            "included; AAPO's G reference completions per prompt are not counted)",
    "grad_norm_var": "population variance over the run's steps of grad_norm, the global gradient norm before "
                     "clipping: the norm of the gradient of each step's loss with respect to the weights, the same "
                     "units for every algorithm (the losses' own scales differ)",
    "grad_norm_mean": "mean over the run's steps of grad_norm",
    "loss_cv": "population standard deviation of loss over the run's steps divided by the mean of |loss| "
               "(dimensionless; |loss| so that losses averaging near 0, as GRPO's do, do not blow it up)",
    "loss_var": "population variance of loss over the run's steps, in each algorithm's own loss units (not "
                "comparable across algorithms; in results.json only)",
    "zero_std_frac": "mean over the run's steps of algo/zero_std_group_frac, the fraction of prompt groups whose G "
                     "rewards are all equal",
    "flat_group_frac": "fraction of the logged prompt groups (rollouts/rank*.jsonl, every group of every step) whose G "
                       "rewards are all equal (flat); DAPO logs the groups it kept after dynamic sampling",
    "flat_with_signal_frac": "fraction of the flat groups in which some sample has |advantage| > 1e-6: a sample's "
                             "policy-gradient term is A x grad log pi, so a flat group with all A = 0 pushes nothing "
                             "(GRPO's KL term aside)",
    "flat_adv_abs / mixed_adv_abs": "mean |advantage| over the samples of flat groups / of the other groups",
    "grad_norm_flat_steps / grad_norm_other_steps": "mean grad_norm over the steps where at least half of the groups "
                                                    "are flat (algo/zero_std_group_frac >= 0.5) / over the other steps",
    "ratio_clip_frac / resample_rounds / optimizer_steps": "means over the run's steps of algo/ratio_clip_frac (GRPO, "
                                                           "Dr. GRPO, DAPO), resample_rounds and optimizer_steps",
}
#: per-step metrics whose mean over seeds (with its CI band) the report keeps and plots
CURVES_KEYS = ("reward/mean", "accuracy", "algo/zero_std_group_frac", "grad_norm")
#: per-run numbers about flat groups (see flat_group_signal) and the gradient norm on mostly-flat steps
FLAT_KEYS = ("flat_group_frac", "flat_with_signal_frac", "flat_adv_abs", "mixed_adv_abs", "grad_norm_flat_steps",
             "grad_norm_other_steps")
#: per-step metrics reported as their mean over the run's steps (results key -> metrics.jsonl key)
STEP_MEANS = {"zero_std_frac": "algo/zero_std_group_frac", "ratio_clip_frac": "algo/ratio_clip_frac",
              "resample_rounds": "resample_rounds", "optimizer_steps": "optimizer_steps"}


# ---------------------------------------------------------------------------------------------
# the plan: arguments, checked and merged with OUT/compare.json

@dataclass
class Plan:
    out: Path
    algorithms: list[str]
    seeds: list[int]
    baseline: str
    threshold: float
    window: int
    config: str | None = None
    ds_config: str | None = None
    ref_ds_config: str | None = None
    nproc: int = 1
    overrides: list[str] = field(default_factory=list)  # KEY=VALUE and ALGO:KEY=VALUE, --max-steps last
    report_only: bool = False
    resolved: dict = field(default_factory=dict)  # algorithm -> its flattened run config (without PER_RUN_KEYS)
    shas: dict = field(default_factory=dict)  # --ds-config / --ref-ds-config -> sha256 of the file (None: default)

    def run_dir(self, algorithm: str, seed: int) -> Path:
        return self.out / run_name(algorithm, seed)

    def runs(self) -> list[tuple[str, int]]:
        """Seed by seed, every algorithm of a seed in turn: a stopped comparison has whole seeds."""
        return [(a, s) for s in self.seeds for a in self.algorithms]


def run_name(algorithm: str, seed: int) -> str:
    return f"{algorithm}-seed{seed}"


def _int(text: str, option: str, minimum: int, example: str) -> int:
    try:
        value = int(str(text).strip())
    except ValueError:
        raise AapoError(f"{option} must be an integer >= {minimum} (got '{text}'); e.g. {option} {example}") from None
    if value < minimum:
        raise AapoError(f"{option} must be >= {minimum} (got {value}); e.g. {option} {example}")
    return value


def parse_algorithms(text: str) -> list[str]:
    from aapo_app.algorithms import ALGORITHMS

    names = [x.strip() for x in text.split(",") if x.strip()]
    if not names:
        raise AapoError(f"--algorithms is empty; give a comma list, e.g. --algorithms {','.join(DEFAULT_ALGORITHMS)}")
    for name in names:
        if name not in ALGORITHMS:
            raise AapoError(f"--algorithms: unknown algorithm '{name}'; choose from {', '.join(ALGORITHMS)}")
    if len(set(names)) != len(names):
        raise AapoError(f"--algorithms names one algorithm twice ({text}); give each once")
    return names


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise AapoError(f"--seeds must be a comma list of integers, e.g. --seeds 0,1,2 (got '{text}')") from None
    if len(set(seeds)) != len(seeds):
        raise AapoError(f"--seeds names one seed twice ({text}); give each once")
    if any(s < 0 for s in seeds):
        raise AapoError(f"--seeds must be >= 0 (got {text})")
    if len(seeds) < 2:
        raise AapoError(f"--seeds: a comparison needs at least 2 seeds for its confidence intervals and paired tests "
                        f"(got {len(seeds)}); give e.g. --seeds 0,1,2,3,4")
    return seeds


def parse_threshold(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 < value <= 1.0:
        raise AapoError(f"--threshold is a training accuracy in (0, 1] (got '{text}'); e.g. --threshold 0.9")
    return value


def split_overrides(overrides: list[str], algorithms: list[str]) -> None:
    """Check the KEY=VALUE arguments: each is for every run or, as ``ALGO:KEY=VALUE``, for one
    algorithm; none may set what each run sets itself."""
    for item in overrides:
        head, sep, _ = item.partition("=")
        if not sep:
            raise AapoError(f"'{item}' is not KEY=VALUE; give overrides as in aapo train, e.g. rollout.group_size=8 "
                            f"(or ALGO:KEY=VALUE for one algorithm)")
        algo, colon, key = head.partition(":")
        if colon and algo not in algorithms:
            raise AapoError(f"'{item}': '{algo}' is not one of the compared algorithms ({', '.join(algorithms)}); "
                            f"ALGO:KEY=VALUE gives KEY to one of them")
        key = (key if colon else head).strip()
        if key in PER_RUN_KEYS:
            option = {"algorithm.name": "--algorithms", "train.seed": "--seeds", "output_dir": "--out"}[key]
            raise AapoError(f"'{item}': each run's {key} is set by {option}; drop it")


def overrides_for(overrides: list[str], algorithm: str) -> list[str]:
    """The overrides that reach ``algorithm``'s runs, in order, without their ``ALGO:`` prefixes."""
    out = []
    for item in overrides:
        head, _, value = item.partition("=")
        algo, colon, key = head.partition(":")
        if not colon:
            out.append(item)
        elif algo == algorithm:
            out.append(f"{key}={value}")
    return out


def _file_sha(path: str | None, option: str) -> str | None:
    if path is None:
        return None
    try:
        return hashlib.sha256(Path(path).expanduser().read_bytes()).hexdigest()
    except OSError as exc:
        raise AapoError(f"{option}: cannot read '{path}' ({exc.strerror}); give an existing file") from None


def resolve_configs(config: str | None, overrides: list[str], algorithms: list[str]) -> dict[str, dict]:
    """Each algorithm's run config (the same load as aapo train's, so a bad key fails here, before any
    run), flattened, without the keys each run sets itself."""
    import dataclasses

    from aapo_app.algorithms import algorithm_params_class
    from aapo_app.config import flatten_config, load_run_config

    params = {a: {f.name for f in dataclasses.fields(algorithm_params_class(a))} for a in algorithms}
    for item in overrides:  # a parameter only some of the algorithms have must name them
        key = item.partition("=")[0]
        if ":" not in key and key.startswith("algorithm.") and "." not in key[len("algorithm."):]:
            have = [a for a in algorithms if key[len("algorithm."):] in params[a]]
            if have and len(have) < len(algorithms):
                raise AapoError(f"'{item}': {key} is a parameter of {', '.join(have)} only; give it to "
                                f"{'them' if len(have) > 1 else 'it'} as {have[0]}:{item}")
    resolved = {}
    for algo in algorithms:
        try:
            cfg = load_run_config(config, overrides_for(overrides, algo) + [f"algorithm.name={algo}"])
        except AapoError as exc:
            raise AapoError(f"{exc} (for {algo})" if len(algorithms) > 1 else str(exc)) from None
        flat = flatten_config(json.loads(json.dumps(cfg.to_dict())))
        resolved[algo] = {k: v for k, v in flat.items() if k not in PER_RUN_KEYS}
    return resolved


def make_plan(out: str, algorithms: str | None, seeds: str | None, baseline: str | None, threshold: str,
              window: str, config: str | None, ds_config: str | None, ref_ds_config: str | None,
              nproc: str | None, max_steps: str | None, overrides: list[str], report_only: bool) -> Plan:
    """Every check of the arguments, against OUT/compare.json when it exists; writes nothing."""
    root = Path(out)
    if root.exists() and not root.is_dir():
        raise AapoError(f"--out: '{out}' is a file; give a directory")
    manifest = read_manifest(root)
    algo_list = parse_algorithms(algorithms) if algorithms else list(manifest.get("algorithms") or DEFAULT_ALGORITHMS)
    seed_list = parse_seeds(seeds) if seeds else list(manifest.get("seeds") or DEFAULT_SEEDS)
    if baseline is None:
        baseline = "grpo" if "grpo" in algo_list else algo_list[0]
    elif baseline not in algo_list:
        raise AapoError(f"--baseline: '{baseline}' is not among the compared algorithms ({', '.join(algo_list)}); "
                        f"choose one of them or add it to --algorithms")
    plan = Plan(root, algo_list, seed_list, baseline, parse_threshold(threshold),
                _int(window, "--window", 1, "3"), report_only=report_only)
    if report_only:
        return plan
    if manifest and not any((config, ds_config, ref_ds_config, nproc, max_steps, overrides)):
        # `aapo compare --out DIR` alone continues a comparison with the settings it was started with
        config, ds_config, ref_ds_config = manifest.get("config"), manifest.get("ds_config"), manifest.get("ref_ds_config")
        nproc, overrides = str(manifest.get("nproc", 1)), list(manifest.get("overrides") or [])
    plan.config, plan.ds_config, plan.ref_ds_config = config, ds_config, ref_ds_config
    plan.nproc = _int(nproc, "--nproc", 1, "2") if nproc is not None else 1
    extra = list(overrides)
    if max_steps is not None:
        extra.append(f"train.max_steps={_int(max_steps, '--max-steps', 1, '12')}")
    split_overrides(extra, algo_list)
    plan.overrides = extra
    plan.shas = {"--ds-config": _file_sha(ds_config, "--ds-config"),
                 "--ref-ds-config": _file_sha(ref_ds_config, "--ref-ds-config")}
    plan.resolved = resolve_configs(config, extra, algo_list)
    check_manifest(manifest, plan)
    return plan


# ---------------------------------------------------------------------------------------------
# OUT/compare.json

def read_manifest(root: Path) -> dict:
    path = root / MANIFEST
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise AapoError(f"--out: {path} is not readable JSON ({exc}); restore it or move it away") from None
    return data if isinstance(data, dict) else {}


def _setting_differs(option: str, root: Path, old, new, how: str) -> AapoError:
    return AapoError(f"{option}: the runs in '{root}' were made with {old}, this command gives {new}{how}; every run "
                     f"of a comparison shares its settings: give the same ones to continue it, or choose another --out")


def check_manifest(manifest: dict, plan: Plan) -> None:
    """Refuse other settings than those the comparison in OUT was started with (algorithms and seeds
    may be added: each run is defined by the shared settings, its algorithm and its seed)."""
    if not manifest:
        return
    root = plan.out
    if manifest.get("nproc", 1) != plan.nproc:
        raise _setting_differs("--nproc", root, f"--nproc {manifest.get('nproc', 1)}", plan.nproc, "")
    for option, sha in plan.shas.items():
        old = (manifest.get("ds_configs") or {}).get(option)
        if old != sha:
            raise _setting_differs(option, root, _file_text(old), _file_text(sha), "")
    recorded = manifest.get("resolved") or {}
    shared_old = next(iter(recorded.values()), None)
    for algo, flat in plan.resolved.items():
        old = recorded.get(algo)
        if old is None:  # an algorithm added now: its settings outside algorithm.* must be the shared ones
            if shared_old is None:
                continue
            old = {k: v for k, v in shared_old.items() if not k.startswith("algorithm.")}
            flat = {k: v for k, v in flat.items() if not k.startswith("algorithm.")}
        for key in sorted(set(old) | set(flat)):
            if key in old and old.get(key) != flat.get(key):
                raise _setting_differs(key, root, f"{key}={old.get(key)!r}", repr(flat.get(key)),
                                       f" (for {algo}, from --config and KEY=VALUE)")


def _file_text(sha: str | None) -> str:
    return "the default" if sha is None else f"a file of sha256 {sha[:12]}…"


def write_manifest(plan: Plan, argv: list[str]) -> None:
    old = read_manifest(plan.out)
    algorithms = list(old.get("algorithms") or [])
    algorithms += [a for a in plan.algorithms if a not in algorithms]
    seeds = list(old.get("seeds") or [])
    seeds += [s for s in plan.seeds if s not in seeds]
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    data = {
        "version": 1,
        "algorithms": algorithms,
        "seeds": seeds,
        "config": plan.config,
        "ds_config": plan.ds_config,
        "ref_ds_config": plan.ref_ds_config,
        "ds_configs": plan.shas,  # option -> sha256 of the file (None: aapo train's default)
        "nproc": plan.nproc,
        "overrides": plan.overrides,
        "resolved": {**(old.get("resolved") or {}), **plan.resolved},
        "created": old.get("created", now),
        "invocations": [*old.get("invocations", []), {"time": now, "argv": argv}][-20:],
    }
    _write_json(plan.out / MANIFEST, data)


def _write_json(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


# ---------------------------------------------------------------------------------------------
# the state of one run directory

def run_state(run_dir: Path, max_steps: int | None = None) -> tuple[str, int]:
    """``("done", N)``, ``("resume", step of the newest checkpoint)``, ``("restart", 0)`` for a run
    that saved no checkpoint, or ``("new", 0)``. A run is done when its metrics hold the held-out
    accuracy before training (step 0) and after its last step (``max_steps``, else its config's)."""
    from aapo_app.checkpoint import checkpoint_dirs
    from aapo_app.rundir import holds_run

    if max_steps is None:
        max_steps = _run_config(run_dir).get("train", {}).get("max_steps")
    rows = {m["step"]: m for m in read_metrics(run_dir / "metrics.jsonl")}
    if max_steps and all("eval/accuracy" in rows.get(s, {}) for s in (0, max_steps)):
        return "done", max_steps
    saved = [s for s in checkpoint_dirs(run_dir) if not max_steps or s < max_steps]
    if saved:
        return "resume", max(saved)
    if holds_run(run_dir):
        return "restart", 0
    return "new", 0


def _run_config(run_dir: Path) -> dict:
    import yaml

    try:
        data = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def check_run_dir(plan: Plan, algo: str, seed: int) -> None:
    """A run directory that holds a run must hold this (algorithm, seed) with the plan's settings."""
    from aapo_app.config import flatten_config

    run_dir = plan.run_dir(algo, seed)
    saved = _run_config(run_dir)
    if not saved:
        return
    flat = flatten_config(saved)
    if flat.get("algorithm.name") != algo or flat.get("train.seed") != seed:
        raise AapoError(f"--out: '{run_dir}' holds a run of {flat.get('algorithm.name')} with seed "
                        f"{flat.get('train.seed')}, not {algo} with seed {seed}; move it away")
    want = plan.resolved.get(algo, {})
    for key in sorted(want):
        if key in flat and flat[key] != want[key]:
            raise AapoError(f"{key}: '{run_dir}' was trained with {key}={flat[key]!r}, this command gives "
                            f"{want[key]!r}; give the same settings to continue the comparison, or choose another --out")


# ---------------------------------------------------------------------------------------------
# running

class Stopped(Exception):
    """The comparison stopped on a signal; ``code`` is the exit status (128 + signal)."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_command(plan: Plan, algo: str, seed: int, action: str) -> list[str]:
    """The ``aapo train`` command line of one run (under torchrun on this machine when --nproc > 1)."""
    if plan.nproc == 1:
        launcher = [sys.executable, "-m", "aapo_app"]
    else:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(plan.nproc),
                    "--master_port", str(_free_port()), "-m", "aapo_app"]
    run_dir = str(plan.run_dir(algo, seed))
    if action == "resume":  # the run's own config and DeepSpeed configs, recorded in it
        return [*launcher, "train", "--resume", "latest", "--output-dir", run_dir]
    args = [*launcher, "train", "--output-dir", run_dir, "--seed", str(seed)]
    for option, value in (("--config", plan.config), ("--ds-config", plan.ds_config),
                          ("--ref-ds-config", plan.ref_ds_config)):
        if value is not None:
            args += [option, value]
    if action == "restart":
        args.append("--overwrite")
    return [*args, *overrides_for(plan.overrides, algo), f"algorithm.name={algo}"]


def _child_env(nproc: int) -> dict:
    env = dict(os.environ)
    if nproc > 1 and "OMP_NUM_THREADS" not in env:  # as launch/single_node.sh: the cores shared among the ranks
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    return env


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the comparison dies (even by SIGKILL), so the run
    finishes its step, saves a checkpoint and exits (Linux; elsewhere nothing)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class _Lock:
    """An exclusive flock on OUT/.compare.lock for the life of the comparison (freed however it dies)."""

    def __init__(self, root: Path):
        import fcntl

        root.mkdir(parents=True, exist_ok=True)
        self.file = open(root / LOCK, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            self.file.close()
            raise AapoError(f"--out: '{root}' is in use by another aapo compare ({holder}); wait for it to end or "
                            f"choose another --out") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        self.file.flush()

    def release(self) -> None:
        self.file.close()


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 90:
        return f"{seconds} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _last_error(log: Path) -> str:
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "no output"
    errors = [line for line in lines if line.startswith("error:")]
    return errors[-1] if errors else (lines[-1][-300:] if lines else "no output")


class _Signals:
    """SIGTERM/SIGINT while the comparison runs: the current run gets the signal (it finishes its step,
    saves and exits; a second one ends it at once) and no further run starts."""

    def __init__(self, echo: Callable[[str], None]):
        self.echo = echo
        self.signum: int | None = None
        self.child: subprocess.Popen | None = None
        self.previous = {sig: signal.signal(sig, self) for sig in (signal.SIGTERM, signal.SIGINT)}

    def __call__(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum
            self.echo(f"{signal.Signals(signum).name}: the current run finishes its step and saves a checkpoint; give "
                      f"the same command again to continue (send the signal again to stop at once)")
        self.forward()

    def forward(self) -> None:
        if self.signum is not None and self.child is not None and self.child.poll() is None:
            self.child.send_signal(self.signum)

    def stopped(self, where: str) -> Stopped:
        return Stopped(f"stopped by {signal.Signals(self.signum).name} {where}; give the same command again to "
                       f"continue", 128 + self.signum)

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def run_all(plan: Plan, argv: list[str], echo: Callable[[str], None]) -> None:
    """Train every (algorithm, seed) of the plan that is not finished, one after another."""
    lock = _Lock(plan.out)
    signals = _Signals(echo)
    try:
        runs = plan.runs()
        states = {}
        for algo, seed in runs:  # every check before any run starts or anything is written
            check_run_dir(plan, algo, seed)
            states[algo, seed] = run_state(plan.run_dir(algo, seed), plan.resolved[algo]["train.max_steps"])
        write_manifest(plan, argv)
        todo = sum(1 for st in states.values() if st[0] != "done")
        echo(f"aapo compare: {len(runs)} runs ({len(plan.algorithms)} algorithm(s) x {len(plan.seeds)} seeds) in "
             f"{plan.out}, {len(runs) - todo} finished already" + (f", {plan.nproc} ranks each" if plan.nproc > 1 else ""))
        durations: list[float] = []
        for k, (algo, seed) in enumerate(runs, 1):
            name = run_name(algo, seed)
            action, step = states[algo, seed]
            if action == "done":
                echo(f"[{k}/{len(runs)}] {name}: finished already")
                continue
            if signals.signum is not None:
                raise signals.stopped(f"before {name}")
            start = time.time()
            _train_one(plan, algo, seed, action, step, f"[{k}/{len(runs)}] {name}", echo, signals)
            durations.append(time.time() - start)
            todo -= 1
            rows = read_metrics(plan.run_dir(algo, seed) / "metrics.jsonl")
            held = (f"held-out {100 * rows[0]['eval/accuracy']:.1f}% -> {100 * rows[-1]['eval/accuracy']:.1f}%"
                    if rows and "eval/accuracy" in rows[0] and "eval/accuracy" in rows[-1] else "")
            eta = f"; about {_duration(statistics.fmean(durations) * todo)} left for {todo} run(s)" if todo else ""
            echo(f"[{k}/{len(runs)}] {name}: done in {_duration(durations[-1])}" + (f" ({held})" if held else "") + eta)
    finally:
        signals.restore()
        lock.release()


def _train_one(plan: Plan, algo: str, seed: int, action: str, step: int, tag: str, echo, signals: _Signals) -> None:
    name = run_name(algo, seed)
    logs = plan.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"{name}.log"
    cmd = train_command(plan, algo, seed, action)
    what = {"new": "training", "resume": f"resuming from its checkpoint step-{step}",
            "restart": "starting again (the interrupted run saved no checkpoint)"}[action]
    echo(f"{tag}: {what} (log: {log})")
    with open(log, "a") as f:
        f.write(f"=== {datetime.now(timezone.utc).isoformat(timespec='seconds')} {' '.join(cmd)}\n")
        f.flush()
        signals.child = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=_child_env(plan.nproc),
                                         start_new_session=True,  # a terminal's Ctrl-C reaches it once, through us
                                         preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
        signals.forward()  # a signal that came while it was starting
        code = signals.child.wait()
        signals.child = None
    if signals.signum is not None:
        raise signals.stopped(f"during {name}")
    if code == 0:
        return
    if code < 0 or code in (128 + signal.SIGTERM, 128 + signal.SIGINT):
        raise Stopped(f"{name} was stopped by a signal (exit {code}); give the same command again to continue",
                      code if code > 0 else 128 - code)
    raise AapoError(f"{name} failed (exit {code}): {_last_error(log)} (log: {log}); fix it and give the same command "
                    f"again: finished runs are kept")


# ---------------------------------------------------------------------------------------------
# the report

def _finite(values) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(v)]


#: a step is "mostly flat" when at least this fraction of its prompt groups has rewards all equal
MOSTLY_FLAT = 0.5


def _json_lines(path: Path):
    """The JSON objects of a ``.jsonl`` file, one a line; a line cut short by a kill is skipped."""
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict):
                yield row


def flat_group_signal(run_dir: Path) -> dict:
    """What the policy gradient gets from groups whose G rewards are all equal ("flat"), from the
    groups the run logged (``rollouts/rank*.jsonl``, ``train.log_rollouts``): a sample's policy-gradient
    term is A x grad log pi, so a flat group pushes the policy only through non-zero advantages.

    ``flat_group_frac`` (flat groups / groups), ``flat_with_signal_frac`` (flat groups with any
    |A| > 1e-6 / flat groups), ``flat_adv_abs`` and ``mixed_adv_abs`` (mean |A| over the samples of
    flat and of other groups); None where there is nothing to average."""
    flat = mixed = signal = 0
    flat_abs: list[float] = []
    mixed_abs: list[float] = []
    for path in sorted((run_dir / "rollouts").glob("rank*.jsonl")):
        for group in _json_lines(path):
            rewards, advantages = group.get("rewards") or [], group.get("advantages") or []
            if not rewards or len(advantages) != len(rewards):
                continue
            magnitudes = [abs(float(a)) for a in advantages]
            if max(rewards) - min(rewards) <= 1e-9:
                flat += 1
                signal += any(m > 1e-6 for m in magnitudes)
                flat_abs += magnitudes
            else:
                mixed += 1
                mixed_abs += magnitudes
    groups = flat + mixed
    return {"flat_group_frac": flat / groups if groups else None,
            "flat_with_signal_frac": signal / flat if flat else None,
            "flat_adv_abs": statistics.fmean(flat_abs) if flat_abs else None,
            "mixed_adv_abs": statistics.fmean(mixed_abs) if mixed_abs else None}


def summarize_run(run_dir: Path, threshold: float, window: int) -> dict | None:
    """Every per-run number of the report, from the run's files; None when the run has not started."""
    rows = read_metrics(run_dir / "metrics.jsonl")
    if not rows:
        return None
    cfg = _run_config(run_dir)
    try:
        info = json.loads((run_dir / "run_info.json").read_text())
    except (OSError, json.JSONDecodeError):
        info = {}
    by_step = {m["step"]: m for m in rows}
    max_steps = cfg.get("train", {}).get("max_steps") or max(by_step)
    train = [by_step[s] for s in sorted(by_step) if 1 <= s <= max_steps]
    done = all("eval/accuracy" in by_step.get(s, {}) for s in (0, max_steps))
    rollout = cfg.get("rollout", {})
    world = int(info.get("world_size") or 1)
    per_round = int(rollout.get("prompts_per_rank", 0)) * int(rollout.get("group_size", 0)) * world
    samples, total = {}, 0
    for m in train:
        total += per_round * (1 + int(round(m.get("resample_rounds", 0) or 0)))
        samples[m["step"]] = total
    reached = stats.steps_to_threshold([(m["step"], m["accuracy"]) for m in train if "accuracy" in m], threshold, window)
    grad = _finite(m.get("grad_norm") for m in train)
    mostly_flat = [(m.get("algo/zero_std_group_frac") or 0.0) >= MOSTLY_FLAT for m in train]
    grad_flat = _finite(m.get("grad_norm") for m, flat in zip(train, mostly_flat) if flat)
    grad_other = _finite(m.get("grad_norm") for m, flat in zip(train, mostly_flat) if not flat)
    loss = _finite(m.get("loss") for m in train)
    mean_abs_loss = statistics.fmean(abs(v) for v in loss) if loss else 0.0
    before = by_step.get(0, {}).get("eval/accuracy")
    after = by_step.get(max_steps, {}).get("eval/accuracy") if done else None
    return {
        "dir": str(run_dir),
        "status": "done" if done else "unfinished",
        "steps": max_steps,
        "last_step": max(by_step),
        "world_size": world,
        "samples_per_step": per_round,
        "eval_before": before,
        "eval_after": after,
        "improvement": after - before if after is not None and before is not None else None,
        "steps_to_threshold": reached,
        "samples_to_threshold": samples.get(reached) if reached is not None else None,
        "policy_samples": total,
        "grad_norm_mean": statistics.fmean(grad) if grad else None,
        "grad_norm_var": statistics.pvariance(grad) if grad else None,
        "grad_norm_flat_steps": statistics.fmean(grad_flat) if grad_flat else None,
        "grad_norm_other_steps": statistics.fmean(grad_other) if grad_other else None,
        "flat_steps": sum(mostly_flat),
        **flat_group_signal(run_dir),
        "loss_cv": statistics.pstdev(loss) / mean_abs_loss if loss and mean_abs_loss > 0 else None,
        "loss_var": statistics.pvariance(loss) if loss else None,
        **{name: (statistics.fmean(values) if values else None)
           for name, values in ((name, _finite(m.get(key) for m in train)) for name, key in STEP_MEANS.items())},
        "data": info.get("data"),
        "curves": {key: [(m["step"], m[key]) for m in train if key in m] for key in CURVES_KEYS},
    }


def _per_seed(runs: dict, key: str) -> dict:
    return {seed: r[key] for seed, r in runs.items() if r is not None and r["status"] == "done" and r[key] is not None}


def _pairing(per_run: dict, algorithms: list[str], seeds: list[int]) -> dict:
    """Per seed: do the algorithms' runs share the held-out set, the prompt order and the held-out
    accuracy before training?"""
    out, problems, fingerprints = {}, [], True
    for seed in seeds:
        runs = [per_run[(a, seed)] for a in algorithms if per_run.get((a, seed)) is not None]
        befores = {r["eval_before"] for r in runs if r["eval_before"] is not None}
        data = [r["data"] for r in runs]
        fingerprints = fingerprints and all(d for d in data)
        eval_sets = {d.get("eval_set") for d in data if d}
        orders = {d.get("train_order") for d in data if d}
        same = len(befores) <= 1 and len(eval_sets) <= 1 and len(orders) <= 1
        out[seed] = {"runs": len(runs), "same_before_accuracy": len(befores) <= 1, "same_eval_set": len(eval_sets) <= 1,
                     "same_train_order": len(orders) <= 1}
        if not same:
            what = [w for w, ok in (("held-out set", len(eval_sets) <= 1), ("prompt order", len(orders) <= 1),
                                    ("accuracy before training", len(befores) <= 1)) if not ok]
            problems.append(f"seed {seed}: {', '.join(what)} differ")
    if problems:
        text = "**Pairing broken**: " + "; ".join(problems) + " (the runs were not made with the same data settings)."
    elif fingerprints:
        text = ("Pairing checked: for every seed, all algorithms' runs had the same held-out set and training-prompt "
                "order (fingerprints in run_info.json) and the same held-out accuracy before training.")
    else:
        text = ("Pairing checked on the held-out accuracy before training only (identical across algorithms for every "
                "seed); some runs predate the data fingerprints in run_info.json.")
    return {"ok": not problems, "seeds": out, "text": text}


def _curve(runs: list[dict], key: str) -> dict:
    """Mean over the runs of a per-step metric, with its 95 % CI, on the steps every run has."""
    series = [dict(r["curves"][key]) for r in runs]
    steps = sorted(set.intersection(*(set(s) for s in series))) if series else []
    cis = [stats.mean_ci([s[step] for s in series]) for step in steps]
    return {"steps": steps, "mean": [c.mean for c in cis], "ci95_half": [c.half for c in cis], "n": len(series)}


def build_results(out: Path, algorithms: list[str], seeds: list[int], baseline: str, threshold: float,
                  window: int) -> dict:
    per_run = {(a, s): summarize_run(out / run_name(a, s), threshold, window) for a in algorithms for s in seeds}
    by_algo = {}
    base_after = _per_seed({s: per_run[(baseline, s)] for s in seeds}, "eval_after")
    for algo in algorithms:
        runs = {s: per_run[(algo, s)] for s in seeds}
        done = [r for r in runs.values() if r is not None and r["status"] == "done"]
        after = _per_seed(runs, "eval_after")
        entry = {"runs_done": len(done)}
        for key in ("eval_before", "eval_after", "grad_norm_var", "grad_norm_mean", "loss_cv", *STEP_MEANS,
                    *FLAT_KEYS):
            values = _per_seed(runs, key)
            entry[key] = {**stats.mean_ci(list(values.values())).as_dict(), "per_seed": values}
        improvement = _per_seed(runs, "improvement")
        entry["improvement"] = {**stats.paired(list(improvement.values())).as_dict(), "per_seed": improvement}
        for key in ("steps_to_threshold", "samples_to_threshold"):
            values = {s: r[key] for s, r in runs.items() if r is not None and r["status"] == "done"}
            entry[key] = {**stats.reach_summary(list(values.values())), "per_seed": values}
        if algo != baseline:
            common = [s for s in seeds if s in after and s in base_after]
            diffs = {s: after[s] - base_after[s] for s in common}
            entry["vs_baseline"] = {**stats.paired(list(diffs.values())).as_dict(), "per_seed": diffs}
        entry["curves"] = {key: _curve(done, key) for key in CURVES_KEYS}
        by_algo[algo] = entry
    unfinished = [run_name(a, s) + (" (not started)" if r is None else f" (step {r['last_step']} of {r['steps']})")
                  for (a, s), r in per_run.items() if r is None or r["status"] != "done"]
    runs_out = {}
    for (a, s), r in per_run.items():
        if r is not None:
            runs_out[run_name(a, s)] = {"algorithm": a, "seed": s, **{k: v for k, v in r.items() if k != "curves"}}
    return {
        "out": str(out), "algorithms": algorithms, "seeds": seeds, "baseline": baseline, "threshold": threshold,
        "window": window, "confidence": 0.95, "runs_done": len(per_run) - len(unfinished), "runs_expected": len(per_run),
        "unfinished": unfinished, "pairing": _pairing(per_run, algorithms, seeds), "by_algorithm": by_algo,
        "runs": runs_out, "definitions": DEFINITIONS,
    }


def _pct(entry: dict, signed: bool = False) -> str:
    if entry.get("mean") is None:
        return "–"
    sign = "+" if signed else ""
    text = f"{100 * entry['mean']:{sign}.1f}"
    return f"{text} ± {100 * entry['ci95_half']:.1f}" if entry.get("ci95_half") is not None else f"{text} (n=1)"


def _num(entry: dict) -> str:
    if entry.get("mean") is None:
        return "–"
    text = f"{entry['mean']:.3g}"
    return f"{text} ± {entry['ci95_half']:.2g}" if entry.get("ci95_half") is not None else f"{text} (n=1)"


def _p(value) -> str:
    return "–" if value is None else f"{value:.3g}"


def _reach(entry: dict, counts: bool = True) -> str:
    """"k/n reached; median M (min–max)" of a reach_summary (without "k/n reached" when not counts)."""
    if not entry["runs"] or not entry["reached"]:
        return (f"{entry['reached']}/{entry['runs']} reached" if counts else "–") if entry["runs"] else "–"
    span = f" ({entry['min']:,.0f}–{entry['max']:,.0f})" if entry["min"] != entry["max"] else ""
    median = f"median {entry['median']:,.4g}{span}"
    return f"{entry['reached']}/{entry['runs']} reached; {median}" if counts else median


def render_markdown(results: dict) -> str:
    base, thr = results["baseline"], results["threshold"]
    algos = results["by_algorithm"]
    lines = [f"# aapo compare: {', '.join(results['algorithms'])} × seeds {', '.join(map(str, results['seeds']))}", ""]
    lines.append(f"Runs finished: {results['runs_done']}/{results['runs_expected']}"
                 + (f"; not finished: {', '.join(results['unfinished'])}" if results["unfinished"] else "") + ".")
    lines += ["", results["pairing"]["text"], "", "## Held-out accuracy", "",
              f"| algorithm | seeds | before (%) | after (%) | after − before (pp) | after − {base} (pp) "
              f"| p, paired t | p, sign-flip |",
              "|---|---|---|---|---|---|---|---|"]
    for algo, e in algos.items():
        vs = e.get("vs_baseline")
        lines.append(f"| {algo} | {e['runs_done']} | {_pct(e['eval_before'])} | {_pct(e['eval_after'])} "
                     f"| {_pct(e['improvement'], True)} "
                     + (f"| {_pct(vs, True)} | {_p(vs['p_t_test'])} | {_p(vs['p_sign_flip'])} |" if vs
                        else "| (baseline) | | |"))
    lines += ["", "## Training", "",
              f"| algorithm | steps to train accuracy ≥ {100 * thr:g}% ({results['window']}-step mean) | policy samples by "
              f"then | grad-norm variance | mean grad norm | loss CV | zero-std groups |",
              "|---|---|---|---|---|---|---|"]
    for algo, e in algos.items():
        lines.append(f"| {algo} | {_reach(e['steps_to_threshold'])} | {_reach(e['samples_to_threshold'], counts=False)} "
                     f"| {_num(e['grad_norm_var'])} | {_num(e['grad_norm_mean'])} | {_num(e['loss_cv'])} "
                     f"| {_num(e['zero_std_frac'])} |")
    lines += ["", "Groups whose rewards are all equal (*flat*), from every logged group:", "",
              "| algorithm | flat groups | flat groups with a gradient | mean \\|A\\| flat / other groups "
              f"| grad norm, steps ≥ {100 * MOSTLY_FLAT:g} % flat / other steps |",
              "|---|---|---|---|---|"]
    for algo, e in algos.items():
        lines.append(f"| {algo} | {_num(e['flat_group_frac'])} | {_num(e['flat_with_signal_frac'])} "
                     f"| {_num(e['flat_adv_abs'])} / {_num(e['mixed_adv_abs'])} "
                     f"| {_num(e['grad_norm_flat_steps'])} / {_num(e['grad_norm_other_steps'])} |")
    lines += ["", "| algorithm | ratio-clipped tokens | extra rollout rounds / step | optimizer steps / step |",
              "|---|---|---|---|"]
    for algo, e in algos.items():
        lines.append(f"| {algo} | {_num(e['ratio_clip_frac'])} | {_num(e['resample_rounds'])} "
                     f"| {_num(e['optimizer_steps'])} |")
    lines += ["", "Per seed (held-out accuracy before → after, %):", ""]
    for algo, e in algos.items():
        before, after = e["eval_before"]["per_seed"], e["eval_after"]["per_seed"]
        parts = [f"seed {s}: {100 * before[s]:.1f} → {100 * after[s]:.1f}" for s in results["seeds"] if s in after]
        lines.append(f"* {algo}: " + ("; ".join(parts) if parts else "no finished run"))
    lines += ["", "---", "",
              "Values are mean ± the half-width of the 95 % confidence interval over seeds (Student t, n − 1 degrees "
              "of freedom). Paired by seed: seed S gives every algorithm the same held-out set and the same order of "
              "training prompts. *after − before*: each seed's improvement. *after − baseline*: each seed's "
              f"difference to {base}; *p, paired t* is the paired t-test's two-sided p-value and *p, sign-flip* the "
              "exact permutation test's (all 2^n sign assignments of the n differences; its smallest possible value is "
              "2/2^n). *Steps to train accuracy*: the first step whose trailing mean of the policy samples' training "
              "accuracy reaches the threshold, over the runs that reach it; *policy samples*: completions sampled by "
              "then, resampling rounds included (AAPO's reference completions not counted). *Grad-norm variance*: "
              "variance over steps of the gradient norm before clipping, in the same units for every algorithm "
              "(the training losses have algorithm-specific scales, so their raw variance is not compared; it is in "
              "results.json as loss_var). *Loss CV*: standard deviation of the loss over steps ÷ mean |loss|. "
              "*Zero-std groups*: mean fraction of prompt groups whose rewards are all equal. *Flat groups with a "
              "gradient*: of the groups whose rewards are all equal, the fraction with some non-zero advantage (a "
              "sample's policy-gradient term is A × ∇ log π, so a flat group whose advantages are all 0 pushes nothing); "
              "*mean |A|*: over the samples of flat groups and of the other groups; *grad norm*: mean gradient norm over "
              "the steps where at least half the groups are flat, and over the other steps. The last table: means over steps "
              "of the tokens whose ratio was clipped, DAPO's and GPG's extra rollout rounds and the optimizer steps "
              "per training step. Every number and each "
              "seed's value are in results.json; the definitions are in docs/algorithms.md."]
    return "\n".join(lines) + "\n"


def write_report(out: Path, algorithms: list[str], seeds: list[int], baseline: str, threshold: float,
                 window: int) -> dict:
    """compare.md, results.json and curves.png in ``out``; returns the results."""
    from aapo_app.plot import plot_comparison

    results = build_results(out, algorithms, seeds, baseline, threshold, window)
    out.mkdir(parents=True, exist_ok=True)
    (out / TABLE).write_text(render_markdown(results))
    _write_json(out / RESULTS, results)
    plot_comparison(results, str(out / CURVES))
    return results
