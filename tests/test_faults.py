"""The fault matrix (docs/checkpoints.md): what a careless or unlucky user does to a run, each
reproduced with real files, real processes and, where the case needs one, a real small filesystem.
Every case ends in one line and exit 2 with the run directory intact, or in a documented recovery."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO, run, subprocess_env
from test_cli import assert_one_line_error, run_cli

from aapo_app.errors import AapoError

pytestmark = pytest.mark.slow

FAST = ["rollout.group_size=4", "rollout.prompts_per_rank=2", "rollout.max_new_tokens=6", "train.micro_batch_size=4",
        "data.eval_size=2", "train.eval_max_new_tokens=4", "rewards.num_workers=1", "train.learning_rate=1e-3",
        "rewards.plugins=[plugin_rewards]"]
REWARD = "rewards.weights={test_char_length: 1.0, boxed_format: 0.5}"


def train_args(model_dir, out, steps=2, *extra, reward=REWARD):
    return ["train", "--max-steps", str(steps), "--output-dir", str(out), f"model.path={model_dir}", *FAST, reward,
            *extra]


def steps_logged(out):
    return [json.loads(line)["step"] for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def snapshot(root):
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(Path(root).rglob("*"))
            if p.name != ".aapo.lock"}


def checkpoints(out):
    return sorted(p.name for p in (Path(out) / "checkpoints").iterdir())


def test_a_busy_run_directory_and_one_left_without_a_checkpoint(tiny_model_dir, tmp_path):
    """(1) A second run on a directory another run holds is refused while the first lives; the lock
    goes with the process however it dies. (11) A run that died before its first checkpoint can be
    neither resumed nor restarted plainly: both messages name --overwrite, which starts it again."""
    out = tmp_path / "run"
    lock = out / ".aapo.lock"
    first = subprocess.Popen([sys.executable, "-m", "aapo_app", *train_args(tiny_model_dir, out, 3)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env(), cwd=REPO)
    deadline = time.time() + 300
    # the run locks its directory, then writes config.yaml, ds_config.json and ds_config_reference.json (in that
    # order): stop it only once the last is there, so that the run it leaves behind is the same on any machine load
    last_written = out / "ds_config_reference.json"
    while not (lock.is_file() and f"pid {first.pid} " in lock.read_text() and last_written.is_file()):
        assert first.poll() is None and time.time() < deadline, first.communicate()[1][-3000:]
        time.sleep(0.02)
    os.kill(first.pid, signal.SIGSTOP)  # the first run holds the directory (stopped, to be sure it is alive)
    try:
        assert_one_line_error(train_args(tiny_model_dir, out, 3), ["--output-dir", "in use by another aapo run",
                                                                    f"pid {first.pid}"])
        assert_one_line_error(train_args(tiny_model_dir, out, 3, "--overwrite"), ["in use by another aapo run"])
    finally:
        os.kill(first.pid, signal.SIGKILL)  # dies before its first checkpoint
        first.wait()
    assert not (out / "checkpoints").exists() and (out / "config.yaml").is_file()
    before = snapshot(out)
    assert_one_line_error(train_args(tiny_model_dir, out, 3), ["holds a run that saved no checkpoint", "--overwrite"])
    assert_one_line_error(["train", "--resume", "latest", "--output-dir", str(out)], ["has no checkpoint", "--overwrite"])
    assert snapshot(out) == before
    code, output, exc = run_cli(train_args(tiny_model_dir, out, 2, "--overwrite"))
    assert code == 0, (output, exc)
    assert steps_logged(out) == [0, 1, 2]  # the killed run's lines are gone, each step once
    assert_one_line_error(train_args(tiny_model_dir, out, 2), ["already holds a run", "--resume latest", "--overwrite"])


def _mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"needs a small tmpfs mount (root): {done.stderr.decode().strip()}")


@pytest.fixture
def small_disk(tmp_path):
    """A 300 MiB filesystem of its own (the tiny model's checkpoint is ~65 MiB, estimated ~115 MiB)."""
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "300m")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_full_disk_before_and_during_a_save(tiny_model_dir, small_disk, monkeypatch):
    """(2) The start-up check sizes every checkpoint that exists at once (with keep 3, three beside the
    one being written) and leaves no run behind when it refuses; a disk that fills up during the run
    makes the save fail with torch's RuntimeError, which ends in one line naming the intact previous
    checkpoint, with no half-written step-N.tmp; after space is freed --resume latest finishes."""
    refused = small_disk / "refused"
    assert_one_line_error(train_args(tiny_model_dir, refused, 4, "train.save_every=1", "train.keep_checkpoints=3"),
                          ["--output-dir", "this run needs about", "more checkpoint", "train.keep_checkpoints"])
    assert not refused.exists()

    out, filler = small_disk / "run", small_disk / "filler"
    monkeypatch.setenv("AAPO_TEST_RUN", str(out))
    monkeypatch.setenv("AAPO_TEST_FILL", str(filler))
    args = train_args(tiny_model_dir, out, 3, "train.save_every=1", "train.keep_checkpoints=1",
                      reward="rewards.weights={test_fill_disk: 1.0}")
    code, output, exc = run_cli(args)  # the run's progress lines, then the error
    lines = [line for line in output.strip().splitlines() if line.strip()]
    assert code == 2 and "Traceback" not in output, (output, exc)
    for word in ("checkpoint step-2 could not be written", "MiB free on the disk",
                 "the previous checkpoint step-1 is intact", "--resume latest"):
        assert word in lines[-1] and lines[-1].startswith("error: "), (word, lines[-1])
    assert filler.is_file() and checkpoints(out) == ["step-1"]
    filler.unlink()
    code, output, exc = run_cli(["train", "--resume", "latest", "--output-dir", str(out)])
    assert code == 0, (output, exc)
    assert steps_logged(out) == [0, 1, 2, 3] and checkpoints(out) == ["step-3"]


DAMAGE = {  # what is done to checkpoints/step-2 -> words the one-line error must hold
    "truncate optimizer states": ("deepspeed/state/*optim_states.pt", "half", "optim_states.pt is truncated"),
    "delete optimizer states": ("deepspeed/state/*optim_states.pt", "delete", "optimizer-state files for 1 ranks"),
    "truncate model states": ("deepspeed/state/*model_states.pt", "half", "model_states.pt is truncated"),
    "delete model states": ("deepspeed/state/*model_states.pt", "delete", "no model states"),
    "empty rank state": ("ranks/rank0.pt", "empty", "ranks/rank0.pt is truncated"),
    "truncate weights": ("model.safetensors", "half", "model.safetensors is truncated"),
    "delete trainer state": ("trainer_state.json", "delete", "trainer_state.json is missing"),
}


def _damage(step_dir: Path, pattern: str, how: str) -> tuple[Path, bytes]:
    (path,) = step_dir.glob(pattern)
    data = path.read_bytes()
    if how == "delete":
        path.unlink()
    else:
        path.write_bytes(data[: len(data) // 2] if how == "half" else b"")
    return path, data


def test_damaged_checkpoints_then_an_older_one(tiny_model_dir, tmp_path):
    """(3) Each kind of damage to the newest checkpoint ends resume (and export) in one line naming it
    and the newest intact one, with the run untouched; (8) eval of a checkpoint whose weights are
    truncated too, before any model is loaded and leaving no result directory. (12) A checkpoint
    without trainer_state.json is reported, not skipped. (9) Resuming from an older checkpoint moves
    the newer ones aside so --resume latest never picks them again; (10) leftover .tmp saves go."""
    out = tmp_path / "run"
    code, output, exc = run_cli(train_args(tiny_model_dir, out, 2, "train.save_every=1", "train.keep_checkpoints=0"))
    assert code == 0, (output, exc)
    step2 = out / "checkpoints" / "step-2"
    for case, (pattern, how, words) in DAMAGE.items():
        path, data = _damage(step2, pattern, how)
        before = snapshot(out)
        assert_one_line_error(["train", "--resume", "latest", "--output-dir", str(out), "--max-steps", "3"],
                              ["--resume", "step-2 is damaged", words, "step-1 is intact", "--resume"])
        assert snapshot(out) == before, case
        assert_one_line_error(["export", str(out), "--out", str(tmp_path / "hf")], ["step-2", "is damaged", words])
        if case == "truncate weights":
            evals = out / "eval-weights"
            assert_one_line_error(["eval", "--run", str(out), "--output-dir", str(evals), "--benchmarks", "aime24"],
                                  ["--run", "step-2", "model.safetensors is truncated", "another --step"])
            assert not evals.exists()
        path.write_bytes(data)

    (out / "checkpoints" / "step-9.tmp").mkdir()  # a save killed part-way
    code, output, exc = run_cli(["train", "--resume", str(out / "checkpoints" / "step-1"), "--max-steps", "3"])
    assert code == 0, (output, exc)
    aside = out / "checkpoints" / "abandoned-from-step-1"
    assert checkpoints(out) == ["abandoned-from-step-1", "step-1", "step-2", "step-3"]  # step-2: the new line's
    assert sorted(p.name for p in aside.iterdir()) == ["step-2"]
    assert steps_logged(out) == [0, 1, 2, 3]
    code, output, exc = run_cli(["train", "--resume", "latest", "--output-dir", str(out), "--max-steps", "4"])
    assert code == 0, (output, exc)
    assert steps_logged(out) == [0, 1, 2, 3, 4]


def test_resume_uses_the_runs_own_deepspeed_config(tiny_model_dir, tmp_path):
    """(4) A run trained on ZeRO-2 resumes with plain --resume latest (its recorded config), and a
    different --ds-config is refused naming the key, the run untouched."""
    out = tmp_path / "zero2"
    zero2, zero3 = REPO / "ds_configs" / "zero2_cpu.json", REPO / "ds_configs" / "zero3_cpu.json"
    code, output, exc = run_cli(train_args(tiny_model_dir, out, 1, "--ds-config", str(zero2)))
    assert code == 0, (output, exc)
    recorded = (out / "ds_config.json").read_text()
    before = snapshot(out)
    assert_one_line_error(["train", "--resume", "latest", "--output-dir", str(out), "--max-steps", "2",
                           "--ds-config", str(zero3)], ["--ds-config", "zero_optimization.stage=2", "3",
                                                         "resume without --ds-config"])
    assert snapshot(out) == before
    code, output, exc = run_cli(["train", "--resume", "latest", "--output-dir", str(out), "--max-steps", "2"])
    assert code == 0, (output, exc)
    assert steps_logged(out) == [0, 1, 2] and (out / "ds_config.json").read_text() == recorded


def test_every_prompt_is_measured_and_conflicting_duplicates_are_noted(tiny_model_dir, tmp_path):
    """(5) A prompt past the first 512 that does not fit the context is found by check-config and
    train (one line naming its id). (12) The same problem with two answers gets a note."""
    rows = [{"problem": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(700)]
    rows[650]["problem"] = "Add these: " + " + ".join(["1"] * 300) + "?"  # ~600 tokens, the context is 512
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = [f"model.path={tiny_model_dir}", f"data.source={data}", "data.eval_size=2"]
    assert_one_line_error(["check-config", *common], ["rollout.max_new_tokens", "1 training prompt(s)", "512",
                                                      "remove prompts longer than"])
    assert_one_line_error(train_args(tiny_model_dir, tmp_path / "run", 1, f"data.source={data}"),
                          ["1 training prompt(s)", "exceed the model's context"])
    assert not (tmp_path / "run").exists()
    rows[650] = {"problem": "What is 3 + 1?", "answer": "5"}  # a duplicate of row 3 with another answer
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, output, exc = run_cli(["check-config", *common])
    assert code == 0, (output, exc)
    assert "1 problem(s) appear more than once with different answers" in output


def test_a_reward_returning_none_or_strings_is_named(tiny_model_dir, tmp_path):
    """(6) A plugin returning None (or strings) stops the run with one line naming the reward."""
    from aapo_app.config import load_run_config
    from aapo_app.rewards import RewardModel
    from aapo_app.trainer import Trainer

    cfg = load_run_config(None, train_args(tiny_model_dir, tmp_path / "none", 1,
                                           reward="rewards.weights={test_none: 1.0}")[5:] + [f"output_dir={tmp_path}/n",
                                                                                            "train.max_steps=1"])
    trainer = Trainer(cfg)
    try:
        with pytest.raises(AapoError, match=r"^reward 'test_none' returned None \(NoneType\) for completion 0; it must "
                                            r"return one float per completion$"):
            trainer.train()
    finally:
        trainer.close()

    model = RewardModel({"test_char_length": 1.0}, 5.0, 1)
    try:
        model.rewards["test_char_length"] = lambda c, a, n: ["0.5"] * len(c)  # a plugin returning strings
        with pytest.raises(AapoError, match=r"reward 'test_char_length' returned '0.5' \(str\) for completion 0"):
            model.score(["a", "b"], ["1", "2"], [1, 1])
    finally:
        model.close()


def test_an_empty_benchmark_file_is_refused(tiny_model_dir, tmp_path):
    """(7) An empty benchmark file averaged to NaN with exit 0; now one line, and nothing written."""
    (tmp_path / "bench" / "aime24").mkdir(parents=True)
    (tmp_path / "bench" / "aime24" / "test.jsonl").write_text("")
    out = tmp_path / "eval"
    assert_one_line_error(["eval", "--model", str(tiny_model_dir), "--data-dir", str(tmp_path / "bench"),
                           "--benchmarks", "aime24", "--output-dir", str(out)], ["aime24", "holds no problems"])
    assert not out.exists()


def test_a_signal_during_the_last_step_exits_143(tiny_model_dir, tmp_path):
    """(12) SIGTERM during the last step (here while its completions are graded, before the final
    evaluation) completes the run and exits 128 + 15 like any other stop."""
    out = tmp_path / "run"
    proc = run([sys.executable, "-m", "aapo_app", *train_args(tiny_model_dir, out, 1,
                                                               reward="rewards.weights={test_sigterm: 1.0}")],
               expect=128 + signal.SIGTERM)
    assert "came during the last step; the run is complete" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 1 and not summary["stopped_early"] and summary["eval_after"] is not None
    assert checkpoints(out) == ["step-1"]
    shutil.rmtree(out)
