"""Runs that survive: SIGKILL after a checkpoint and --resume gives the uninterrupted run's metrics
(1 and 2 ranks); SIGTERM finishes the step, saves and exits; non-finite steps are skipped and
counted; a failed save leaves the previous checkpoint; resume refuses a changed config."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO, free_port, run, subprocess_env

def train_args(model_dir, out, steps=4):
    # a reward that varies on the random model (tests/plugin_rewards.py), so every step moves the weights
    return ["train", "--max-steps", str(steps), "--output-dir", str(out), f"model.path={model_dir}",
            "rollout.group_size=4", "rollout.prompts_per_rank=2", "rollout.max_new_tokens=8",
            "train.micro_batch_size=4", "data.eval_size=2", "train.eval_max_new_tokens=4", "rewards.num_workers=1",
            "train.learning_rate=1e-2", "train.save_every=2", "train.keep_checkpoints=0",
            "rewards.plugins=[plugin_rewards]", "rewards.weights={test_char_length: 1.0, boxed_format: 0.5}"]


def command(world, args):
    if world == 1:
        return [sys.executable, "-m", "aapo_app", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_port",
            str(free_port()), "-m", "aapo_app", *args]


def metrics(out):
    return {m["step"]: m for m in map(json.loads, (Path(out) / "metrics.jsonl").read_text().splitlines())}


def start_and_wait(cmd, ready, timeout=600):
    """Start ``cmd`` in its own process group and wait until ``ready()`` is true."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env(), cwd=REPO,
                            start_new_session=True)
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, "timed out"
        time.sleep(0.02)
    return proc


def descendants(pid):
    """Every process below ``pid`` (torchrun's workers may sit in process groups of their own)."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        for children in Path(f"/proc/{p}/task").glob("*/children"):
            try:
                kids = [int(c) for c in children.read_text().split()]
            except OSError:
                continue
            found += kids
            todo += kids
    return found


def kill_all(proc):
    """SIGKILL the launcher and every rank under it at once, as a job scheduler or the OOM killer would."""
    pids = [proc.pid, *descendants(proc.pid)]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def assert_same_steps(a, b, steps):
    for step in steps:
        for key in ("reward/mean", "advantage/mean", "algo/zero_std_group_frac", "completion_len/mean"):
            assert a[step][key] == b[step][key], (step, key)  # same samples, same rewards
        assert a[step]["lr"] == b[step]["lr"], step  # the schedule resumes where it was
        assert a[step]["loss"] == pytest.approx(b[step]["loss"], rel=1e-5, abs=1e-7), step
        assert a[step]["grad_norm"] == pytest.approx(b[step]["grad_norm"], rel=1e-4), step


pytestmark = pytest.mark.slow


@pytest.mark.parametrize("world", [1, 2])
def test_sigkill_then_resume_matches_an_uninterrupted_run(tiny_model_dir, tmp_path, world):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    schedule = ["train.lr_scheduler=cosine", "train.warmup_steps=1"]  # the lr scheduler's state resumes too
    run(command(world, train_args(tiny_model_dir, straight) + schedule))
    # the same run, killed (SIGKILL, every process) as soon as the step-2 checkpoint exists
    proc = start_and_wait(command(world, train_args(tiny_model_dir, killed) + schedule),
                          lambda: (killed / "checkpoints" / "step-2").is_dir())
    kill_all(proc)
    assert not (killed / "summary.json").exists()
    resumed = run(command(world, train_args(tiny_model_dir, killed) + schedule + ["--resume", "latest"]))
    assert "resumed from" in resumed.stderr
    a, b = metrics(straight), metrics(killed)
    assert sorted(b) == [0, 1, 2, 3, 4]  # steps the killed run logged after step 2 were cut
    assert_same_steps(a, b, [3, 4])
    # cosine over 4 steps after 1 warm-up step: 1, then 0.5(1 + cos(pi/3)) = 0.75, then 0.25 of 1e-2
    assert [a[s]["lr"] for s in (1, 2, 3, 4)] == pytest.approx([1e-2, 1e-2, 0.75e-2, 0.25e-2])
    assert json.loads((killed / "summary.json").read_text())["eval_after"] == a[4]["eval/accuracy"]
    from safetensors.torch import load_file

    wa = load_file(straight / "checkpoints" / "step-4" / "model.safetensors")
    wb = load_file(killed / "checkpoints" / "step-4" / "model.safetensors")
    import torch

    assert all(torch.allclose(wa[k], wb[k], rtol=1e-5, atol=1e-7) for k in wa)


def test_sigterm_finishes_the_step_saves_and_resumes(tiny_model_dir, tmp_path):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    run(command(1, train_args(tiny_model_dir, straight)))
    args = train_args(tiny_model_dir, stopped) + ["train.save_every=0"]
    proc = start_and_wait(command(1, args), lambda: (stopped / "metrics.jsonl").is_file()
                          and len((stopped / "metrics.jsonl").read_text().splitlines()) >= 2)  # step 0 and 1
    os.kill(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    summary = json.loads((stopped / "summary.json").read_text())
    k = summary["steps"]
    assert summary["stopped_early"] and 1 <= k < 4
    assert (stopped / "checkpoints" / f"step-{k}" / "trainer_state.json").is_file()
    assert "SIGTERM: finishing this step" in err and "resume with: aapo train --resume latest" in out
    run(command(1, args + ["--resume", "latest"]))
    assert_same_steps(metrics(straight), metrics(stopped), range(k + 1, 5))


def test_resume_refuses_a_changed_config_and_extends_max_steps(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    run(command(1, train_args(tiny_model_dir, out, steps=2)))
    changed = run(command(1, train_args(tiny_model_dir, out, steps=4) + ["rollout.group_size=8", "--resume", "latest"]),
                  expect=2)
    assert changed.stderr.strip().splitlines() == [
        "error: --resume: the run was trained with rollout.group_size=4 but this command gives 8; resume with the "
        "run's own config (only train.max_steps may change) or start a new run"]
    done = run(command(1, train_args(tiny_model_dir, out, steps=2) + ["--resume", "latest"]), expect=2)
    assert "raise train.max_steps" in done.stderr
    run(command(1, train_args(tiny_model_dir, out, steps=3) + ["--resume", "latest"]))  # one more step
    assert sorted(metrics(out)) == [0, 1, 2, 3]
    (out / "checkpoints" / "step-3" / "trainer_state.json").write_text("{not json")
    broken = run(command(1, train_args(tiny_model_dir, out, steps=4) + ["--resume", "latest"]), expect=2)
    assert "trainer_state.json" in broken.stderr and "damaged" in broken.stderr


def test_a_second_signal_exits_at_once(tiny_model_dir, tmp_path):
    """SIGTERM twice: the second one does not wait for the step or the save; the process dies of it."""
    out = tmp_path / "twice"
    args = train_args(tiny_model_dir, out, steps=50) + ["train.save_every=0", "rollout.max_new_tokens=64"]
    proc = start_and_wait(command(1, args), lambda: (out / "metrics.jsonl").is_file()
                          and len((out / "metrics.jsonl").read_text().splitlines()) >= 2)
    os.kill(proc.pid, signal.SIGTERM)
    time.sleep(0.2)
    os.kill(proc.pid, signal.SIGTERM)
    proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGTERM  # killed by the signal itself, not a clean 143 exit
    assert not (out / "summary.json").exists()
