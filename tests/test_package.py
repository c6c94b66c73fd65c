"""aapo as an installed package: the default DeepSpeed configs ship inside it, and a wheel of this
checkout, installed outside it, trains from another directory with those defaults."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import aapo_app
from aapo_app.ds_config import (DEFAULT_EVAL_CONFIG_GPU, DEFAULT_POLICY_CONFIG, DEFAULT_REFERENCE_CONFIG,
                                PACKAGED_DS_CONFIGS)

from helpers import DIST_VARS

REPO = Path(__file__).resolve().parents[1]
# What a build of the package reads: setup.cfg names README.md as the long description and finds the
# aapo_app package (with its ds_configs/*.json package data) itself.
BUILD_INPUTS = ("setup.cfg", "pyproject.toml", "README.md", "aapo_app")


def test_packaged_ds_configs_are_the_repository_ones():
    """aapo_app/ds_configs/ (what an installed aapo reads) and ds_configs/ (the user-facing copy with
    its README) hold the same JSON files, byte for byte, and the defaults are among them."""
    user = {p.name: p.read_bytes() for p in (REPO / "ds_configs").glob("*.json")}
    packaged = {p.name: p.read_bytes() for p in PACKAGED_DS_CONFIGS.glob("*.json")}
    assert PACKAGED_DS_CONFIGS == REPO / "aapo_app" / "ds_configs"
    assert sorted(packaged) == sorted(user), "copy the JSON files of ds_configs/ to aapo_app/ds_configs/ (or back)"
    for name in user:
        assert packaged[name] == user[name], f"ds_configs/{name} and aapo_app/ds_configs/{name} differ"
    assert {DEFAULT_POLICY_CONFIG, DEFAULT_REFERENCE_CONFIG, DEFAULT_EVAL_CONFIG_GPU} <= set(packaged)


def _env(site: Path) -> dict:
    """This environment with only the installed copy on PYTHONPATH, no process-group variables, on
    DeepSpeed's CPU accelerator with one thread."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS and k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(site), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PIP_NO_INDEX="1",
               PIP_DISABLE_PIP_VERSION_CHECK="1")
    return env


def _run(cmd, cwd: Path, env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (cmd, proc.stdout[-2000:], proc.stderr[-4000:])
    return proc


def _leaves(node, prefix=()):
    """(path, value) of every non-dict value in a JSON object."""
    for key, value in node.items():
        if isinstance(value, dict):
            yield from _leaves(value, prefix + (key,))
        else:
            yield prefix + (key,), value


def test_wheel_installed_elsewhere_trains_with_its_default_configs(tmp_path, tiny_model_dir):
    """Build a wheel (no network, no build isolation: the environment's setuptools), install it into a
    folder outside the checkout, and run `python -m aapo_app train` from a third directory with only
    that folder on PYTHONPATH and no --ds-config: the run must find the packaged defaults."""
    src, dist, site, elsewhere = (tmp_path / name for name in ("src", "dist", "site", "elsewhere"))
    # Build from a copy: no build/ or egg-info left in the checkout, and none of its stale ones in the wheel.
    src.mkdir()
    for name in BUILD_INPUTS:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / name, src / name)
    elsewhere.mkdir()
    env = _env(site)
    pip = [sys.executable, "-m", "pip"]
    _run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "--no-cache-dir", "-w", dist, src],
         tmp_path, env)
    wheels = sorted(dist.glob("aapo-*.whl"))
    assert len(wheels) == 1, wheels
    _run([*pip, "install", "--no-deps", "--no-index", "--no-cache-dir", "--target", site, wheels[0]], tmp_path, env)
    assert sorted(p.name for p in (site / "aapo_app" / "ds_configs").glob("*.json")) == sorted(
        p.name for p in PACKAGED_DS_CONFIGS.glob("*.json"))

    # the installed copy, not the checkout (nor an editable install of some checkout), is what imports
    where = _run([sys.executable, "-c", "import aapo_app.ds_config as d; print(d.__file__); print(d.PACKAGED_DS_CONFIGS)"],
                 elsewhere, env).stdout.split()
    assert [Path(p).resolve().is_relative_to(site.resolve()) for p in where] == [True, True], where

    out = tmp_path / "run"
    proc = _run([sys.executable, "-m", "aapo_app", "train", "--max-steps", "1", "--output-dir", out,
                 f"model.path={tiny_model_dir}", "rollout.group_size=2", "rollout.prompts_per_rank=2",
                 "rollout.max_new_tokens=4", "train.micro_batch_size=2", "data.eval_size=2",
                 "train.eval_max_new_tokens=4", "rewards.num_workers=1"], elsewhere, env)
    assert f"run directory: {out}" in proc.stdout
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [0, 1]
    assert json.loads((out / "summary.json").read_text())["eval_problems"] == 2
    assert (out / "checkpoints" / "step-1" / "model.safetensors").is_file()
    # the code that ran is not a checkout: no git commit to report, the package version instead
    info = json.loads((out / "run_info.json").read_text())
    assert info["git_commit"] == "unknown" and info["aapo_version"] == aapo_app.__version__
    # the DeepSpeed configs the run used are the packaged defaults, their "auto" fields filled
    for written, default in (("ds_config.json", DEFAULT_POLICY_CONFIG),
                             ("ds_config_reference.json", DEFAULT_REFERENCE_CONFIG)):
        used = json.loads((out / written).read_text())
        for path, value in _leaves(json.loads((PACKAGED_DS_CONFIGS / default).read_text())):
            node = used
            for key in path:
                node = node[key]
            assert node != "auto" and (value == "auto" or node == value), (written, path, value, node)
