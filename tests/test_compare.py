"""`aapo compare`: its statistics against hand-computed values, the state of a run directory, bad
input, and one end-to-end comparison on the tiny model that is killed and continued."""

import json
import math
import statistics
import sys

import pytest
import yaml
from helpers import REPO, run
from test_cli import assert_one_line_error, run_cli
from test_resume import kill_all, start_and_wait

from aapo_app import compare as C
from aapo_app import stats
from aapo_app.metrics import read_metrics

# ---------------------------------------------------------------------------------------------
# statistics


@pytest.mark.parametrize("df, expected", [(1, 12.706), (2, 4.303), (3, 3.182), (4, 2.776), (9, 2.262), (30, 2.042),
                                          (1000, 1.962)])
def test_student_t_quantiles_match_the_table(df, expected):
    """t_{0.975, df} from any statistics textbook's table (3 decimals)."""
    assert stats.t_quantile(0.975, df) == pytest.approx(expected, abs=5e-4)
    assert stats.t_quantile(0.025, df) == pytest.approx(-expected, abs=5e-4)
    assert stats.t_cdf(stats.t_quantile(0.975, df), df) == pytest.approx(0.975, abs=1e-12)


def test_student_t_p_values_in_closed_form():
    # df = 1 is the Cauchy distribution: P(|T| > 1) = 1 - 2 atan(1) / pi = 0.5
    assert stats.t_two_sided_p(1.0, 1) == pytest.approx(0.5, abs=1e-12)
    # df = 2: P(|T| > t) = 1 - t / sqrt(2 + t^2); t = 2: 1 - 2 / sqrt(6) = 0.183503
    assert stats.t_two_sided_p(2.0, 2) == pytest.approx(1 - 2 / math.sqrt(6), abs=1e-12)
    # I_0.4(2, 3) = sum_{j=2..4} C(4,j) 0.4^j 0.6^(4-j) = 0.3456 + 0.1536 + 0.0256 = 0.5248
    assert stats.betainc(2, 3, 0.4) == pytest.approx(0.5248, abs=1e-12)
    assert stats.t_two_sided_p(0.0, 5) == pytest.approx(1.0)


# The fixed table: held-out accuracy of 4 seeds (each seed: the same held-out set for both algorithms)
#   seed          0     1     2     3
#   before      0.40  0.50  0.45  0.50   (both algorithms: the same model and held-out set)
#   grpo after  0.50  0.60  0.55  0.70   (the baseline)
#   aapo after  0.60  0.65  0.55  0.85
TABLE = {"before": [0.40, 0.50, 0.45, 0.50], "grpo": [0.50, 0.60, 0.55, 0.70], "aapo": [0.60, 0.65, 0.55, 0.85]}
T3 = 3.182446  # t_{0.975, 3}


def test_comparison_statistics_on_a_fixed_table():
    # aapo after: mean 2.65 / 4 = 0.6625; deviations -0.0625 -0.0125 -0.1125 0.1875, squares sum 0.051875,
    # s^2 = 0.051875 / 3 = 0.0172917, s = 0.131498, s / sqrt 4 = 0.065749, half-width 3.182446 x 0.065749 = 0.209242
    ci = stats.mean_ci(TABLE["aapo"])
    assert (ci.mean, ci.half, ci.n) == (pytest.approx(0.6625), pytest.approx(0.209242, abs=1e-6), 4)
    assert stats.mean_ci([0.5]).half is None and stats.mean_ci([]).mean is None

    # paired difference aapo - grpo: 0.10 0.05 0.00 0.15; mean 0.075; deviations 0.025 -0.025 -0.075 0.075,
    # squares sum 0.0125, s^2 = 0.0125 / 3 = 0.0041667, s = 0.0645497, se = s / 2 = 0.0322749;
    # CI half-width 3.182446 x 0.0322749 = 0.102713; t = 0.075 / 0.0322749 = 2.32379 (3 dof);
    # two-sided p from the t_3 CDF in closed form, F(t) = 1/2 + (u / (1 + u^2) + atan u) / pi with u = t / sqrt 3
    # = 1.341641: u / (1 + u^2) = 1.341641 / 2.8 = 0.479157, atan u = 0.930274, F = 0.5 + 1.409431 / pi = 0.948636,
    # p = 2 (1 - F) = 0.102728.
    # Sign-flip: the observed |sum| is 0.30; of the 2^4 = 16 sign assignments only +++ and --- on (0.10, 0.05,
    # 0.15) reach |sum| 0.30 (the others give 0.20, 0.10 or 0), each twice (the 0.00 flips for free): 4 / 16 = 0.25.
    diffs = [a - b for a, b in zip(TABLE["aapo"], TABLE["grpo"])]
    test = stats.paired(diffs)
    assert test.mean == pytest.approx(0.075)
    assert test.half == pytest.approx(0.102713, abs=1e-6)
    assert test.t == pytest.approx(2.32379, abs=1e-5)
    assert test.p_t == pytest.approx(0.102728, abs=1e-6)
    assert test.p_sign_flip == 0.25

    # aapo's improvement after - before: 0.20 0.15 0.10 0.35; mean 0.20; deviations 0 -0.05 -0.10 0.15, squares sum
    # 0.035, s^2 = 0.0116667, s = 0.108012, se = 0.054006, half-width 3.182446 x 0.054006 = 0.171872;
    # t = 0.20 / 0.054006 = 3.70328, u = t / sqrt 3 = 2.138090, u^2 = 4.571429, u / (1 + u^2) = 0.383760,
    # atan u = 1.133315, F = 0.5 + 1.517075 / pi = 0.982900, p = 2 (1 - F) = 0.034200.
    # Sign-flip: every difference is positive, so only all-plus and all-minus reach |sum| 0.80: 2 / 16 = 0.125.
    improvement = stats.paired([a - b for a, b in zip(TABLE["aapo"], TABLE["before"])])
    assert improvement.mean == pytest.approx(0.20)
    assert improvement.half == pytest.approx(0.171872, abs=1e-6)
    assert improvement.p_t == pytest.approx(0.034200, abs=1e-5)
    assert improvement.p_sign_flip == 0.125

    # every difference equal: 0/0 -> p = 1 when they are all 0, t = inf -> p = 0 otherwise
    assert stats.paired([0.0, 0.0, 0.0]).p_t == 1.0
    assert stats.paired([0.1, 0.1, 0.1]).p_t == 0.0 and stats.paired([0.1, 0.1, 0.1]).p_sign_flip == 0.25


def _fake_run(root, algo, seed, before, after, accuracy, grad_norm=None, loss=None, rounds=None, data=None):
    """A finished run directory as aapo train leaves it (only what the report reads)."""
    run_dir = root / C.run_name(algo, seed)
    run_dir.mkdir(parents=True)
    n = len(accuracy)
    (run_dir / "config.yaml").write_text(yaml.safe_dump({
        "algorithm": {"name": algo}, "train": {"seed": seed, "max_steps": n},
        "rollout": {"prompts_per_rank": 2, "group_size": 4}}))
    (run_dir / "run_info.json").write_text(json.dumps({"world_size": 1, "data": data or {
        "eval_set": f"e{seed}", "train_order": f"o{seed}"}}))
    rows = [{"step": 0, "eval/accuracy": before}]
    for i, acc in enumerate(accuracy):
        rows.append({"step": i + 1, "accuracy": acc, "reward/mean": acc, "loss": (loss or [0.5] * n)[i],
                     "grad_norm": (grad_norm or [1.0] * n)[i], "algo/zero_std_group_frac": 0.25,
                     "resample_rounds": float((rounds or [0] * n)[i])})
    rows[-1]["eval/accuracy"] = after
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run_dir


def test_the_report_of_a_fixed_table(tmp_path):
    """build_results on hand-made runs of the table above gives the hand-computed numbers, and the
    markdown and JSON carry them."""
    for seed in range(4):
        for algo in ("aapo", "grpo"):
            _fake_run(tmp_path, algo, seed, TABLE["before"][seed], TABLE[algo][seed], [0.5, 0.5, 0.5],
                      grad_norm=[1.0, 2.0, 3.0], loss=[1.0, -1.0, 1.0])
    results = C.build_results(tmp_path, ["aapo", "grpo"], [0, 1, 2, 3], "grpo", 0.9, 3)
    aapo = results["by_algorithm"]["aapo"]
    assert aapo["eval_after"]["mean"] == pytest.approx(0.6625)
    assert aapo["eval_after"]["ci95_half"] == pytest.approx(0.209242, abs=1e-6)
    assert aapo["vs_baseline"]["mean"] == pytest.approx(0.075)
    assert aapo["vs_baseline"]["ci95_half"] == pytest.approx(0.102713, abs=1e-6)
    assert aapo["vs_baseline"]["p_t_test"] == pytest.approx(0.102728, abs=1e-6)
    assert aapo["vs_baseline"]["p_sign_flip"] == 0.25
    assert aapo["improvement"]["mean"] == pytest.approx(0.20)
    assert "vs_baseline" not in results["by_algorithm"]["grpo"]
    # grad norms 1, 2, 3: population variance ((-1)^2 + 0 + 1^2) / 3 = 2/3, in every seed, so a CI of 0;
    # losses 1, -1, 1: mean 1/3, population std sqrt(((2/3)^2 x 2 + (4/3)^2) / 3) = sqrt(8/9) = 0.942809, mean |loss|
    # 1, so loss CV 0.942809
    assert aapo["grad_norm_var"]["mean"] == pytest.approx(2 / 3)
    assert aapo["grad_norm_var"]["ci95_half"] == pytest.approx(0, abs=1e-12)
    assert aapo["grad_norm_mean"]["mean"] == pytest.approx(2.0)
    assert aapo["loss_cv"]["mean"] == pytest.approx(math.sqrt(8 / 9))
    assert aapo["zero_std_frac"]["mean"] == pytest.approx(0.25)
    assert results["pairing"]["ok"] and results["runs_done"] == 8
    md = C.render_markdown(results)
    assert "| aapo | 4 | 46.2 ± 7.6 | 66.2 ± 20.9 | +20.0 ± 17.2 | +7.5 ± 10.3 | 0.103 | 0.25 |" in md
    assert "| grpo | 4 | 46.2 ± 7.6 | 58.8 ± 13.6 | +12.5 ± " in md and "(baseline)" in md
    assert "Pairing checked" in md

    # a seed whose runs saw different held-out sets is reported, not silently paired
    (tmp_path / "grpo-seed3" / "run_info.json").write_text(json.dumps({"world_size": 1, "data": {
        "eval_set": "other", "train_order": "o3"}}))
    results = C.build_results(tmp_path, ["aapo", "grpo"], [0, 1, 2, 3], "grpo", 0.9, 3)
    assert not results["pairing"]["ok"] and "seed 3: held-out set differ" in results["pairing"]["text"]


def test_flat_groups_and_the_gradient_norm_on_mostly_flat_steps(tmp_path):
    """flat_group_signal and the grad-norm split, on hand-written rollouts and metrics."""
    run_dir = _fake_run(tmp_path, "aapo", 0, 0.5, 0.75, [0.5, 0.5, 0.5], grad_norm=[1.0, 2.0, 4.0])
    rows = read_metrics(run_dir / "metrics.jsonl")
    for row, frac in zip(rows[1:], (0.75, 0.5, 0.25)):  # steps 1 and 2 are mostly flat (>= 0.5), step 3 is not
        row["algo/zero_std_group_frac"] = frac
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    groups = [  # rank 0: a flat group with a momentum-like signal, a flat group without, a mixed group
        {"rewards": [0.0, 0.0], "advantages": [0.2, -0.4]},
        {"rewards": [1.0, 1.0], "advantages": [0.0, 0.0]},
        {"rewards": [1.0, 0.0], "advantages": [1.0, -1.0]},
    ]
    (run_dir / "rollouts").mkdir()
    (run_dir / "rollouts" / "rank0.jsonl").write_text("".join(json.dumps(g) + "\n" for g in groups))
    (run_dir / "rollouts" / "rank1.jsonl").write_text(json.dumps({"rewards": [0.5, 0.0], "advantages": [0.5, -0.5]})
                                                      + "\n" + '{"rewards": [1.0')  # a torn last line is skipped
    # 4 groups, 2 flat: 2/4; one of the 2 flat groups has a non-zero advantage: 1/2;
    # mean |A| flat: (0.2 + 0.4 + 0 + 0) / 4 = 0.15; mixed: (1 + 1 + 0.5 + 0.5) / 4 = 0.75
    assert C.flat_group_signal(run_dir) == pytest.approx(
        {"flat_group_frac": 0.5, "flat_with_signal_frac": 0.5, "flat_adv_abs": 0.15, "mixed_adv_abs": 0.75})
    run = C.summarize_run(run_dir, 0.9, 1)
    # grad norms 1, 2 on the mostly-flat steps (mean 1.5), 4 on the other one
    assert (run["grad_norm_flat_steps"], run["grad_norm_other_steps"], run["flat_steps"]) == (1.5, 4.0, 2)
    results = C.build_results(tmp_path, ["aapo"], [0], "aapo", 0.9, 1)
    entry = results["by_algorithm"]["aapo"]
    assert entry["flat_with_signal_frac"]["mean"] == 0.5
    assert entry["curves"]["algo/zero_std_group_frac"]["mean"] == [0.75, 0.5, 0.25]
    assert "| aapo | 0.5 (n=1) | 0.5 (n=1) | 0.15 (n=1) / 0.75 (n=1) | 1.5 (n=1) / 4 (n=1) |" in C.render_markdown(results)
    assert C.flat_group_signal(tmp_path / "none") == {"flat_group_frac": None, "flat_with_signal_frac": None,
                                                      "flat_adv_abs": None, "mixed_adv_abs": None}


def test_steps_and_samples_to_a_threshold(tmp_path):
    # trailing 3-step means of 0.5 0.8 0.9 1.0 0.7 1.0: step 3 (0.5 + 0.8 + 0.9) / 3 = 0.733, step 4
    # (0.8 + 0.9 + 1.0) / 3 = 0.9 >= 0.9 (up to rounding) -> step 4; with a window of 1 the first value >= 0.9 is step 3
    curve = [0.5, 0.8, 0.9, 1.0, 0.7, 1.0]
    points = list(enumerate(curve, 1))
    assert stats.steps_to_threshold(points, 0.9, 3) == 4
    assert stats.steps_to_threshold(points, 0.9, 1) == 3
    assert stats.steps_to_threshold(points, 0.95, 3) is None  # the best 3-step mean is 0.9
    assert stats.steps_to_threshold([(1, 1.0), (2, 1.0)], 0.9, 3) is None  # fewer steps than the window
    assert stats.reach_summary([4, None, 7, 5]) == {"reached": 3, "runs": 4, "median": 5.0, "min": 4, "max": 7}
    assert stats.reach_summary([None, None]) == {"reached": 0, "runs": 2, "median": None, "min": None, "max": None}
    # samples: 2 prompts x G 4 x 1 rank = 8 a round; step 2 took one extra (DAPO) round: 8 + 16 + 8 + 8 = 40 by step 4
    run_dir = _fake_run(tmp_path, "dapo", 0, 0.5, 0.6, curve, rounds=[0, 1, 0, 0, 2, 0])
    summary = C.summarize_run(run_dir, 0.9, 3)
    assert (summary["steps_to_threshold"], summary["samples_to_threshold"]) == (4, 40)
    assert summary["policy_samples"] == 8 * 6 + 8 * 3
    never = C.summarize_run(_fake_run(tmp_path, "grpo", 0, 0.5, 0.6, [0.1, 0.2, 0.3]), 0.9, 3)
    assert never["steps_to_threshold"] is None and never["samples_to_threshold"] is None
    results = C.build_results(tmp_path, ["dapo", "grpo"], [0], "grpo", 0.9, 3)
    md = C.render_markdown(results)
    assert "| dapo | 1/1 reached; median 4 | median 40 |" in md and "| grpo | 0/1 reached | – |" in md


# ---------------------------------------------------------------------------------------------
# run directories, commands, bad input


def test_run_states_and_train_commands(tmp_path):
    """A run directory is new, finished, resumable from its newest checkpoint, or started again when it
    saved none; the train command of each (torchrun with --nproc 2)."""
    plan = C.Plan(tmp_path, ["aapo", "grpo"], [0, 1], "grpo", 0.9, 3, config="run.yaml", nproc=1,
                  overrides=["rollout.group_size=8", "aapo:algorithm.delta_low=-0.5", "train.max_steps=2"])
    assert C.run_state(tmp_path / "aapo-seed0", 2) == ("new", 0)
    done = _fake_run(tmp_path, "aapo", 1, 0.5, 0.6, [0.5, 0.5])
    assert C.run_state(done, 2) == ("done", 2) and C.run_state(done) == ("done", 2)
    started = tmp_path / "grpo-seed0"
    started.mkdir()
    (started / "config.yaml").write_text("train: {max_steps: 2}\n")
    (started / "metrics.jsonl").write_text('{"step": 0, "eval/accuracy": 0.5}\n{"step": 1, "accu')  # cut by a kill
    assert C.run_state(started, 2) == ("restart", 0)
    for step in (1, 2):  # step-2: the final save of a run killed before it logged its last line is not resumable
        (started / "checkpoints" / f"step-{step}").mkdir(parents=True)
    (started / "checkpoints" / "step-3.tmp").mkdir()
    assert C.run_state(started, 3) == ("resume", 2) and C.run_state(started, 2) == ("resume", 1)

    py = sys.executable
    assert C.train_command(plan, "aapo", 0, "new") == [
        py, "-m", "aapo_app", "train", "--output-dir", str(tmp_path / "aapo-seed0"), "--seed", "0", "--config",
        "run.yaml", "rollout.group_size=8", "algorithm.delta_low=-0.5", "train.max_steps=2", "algorithm.name=aapo"]
    assert C.train_command(plan, "grpo", 1, "restart")[-4:] == [
        "--overwrite", "rollout.group_size=8", "train.max_steps=2", "algorithm.name=grpo"]
    assert C.train_command(plan, "grpo", 0, "resume") == [
        py, "-m", "aapo_app", "train", "--resume", "latest", "--output-dir", str(tmp_path / "grpo-seed0")]
    plan.nproc = 2
    cmd = C.train_command(plan, "grpo", 0, "resume")
    assert cmd[:4] == [py, "-m", "torch.distributed.run", "--nproc_per_node"] and cmd[4] == "2"
    assert cmd[5] == "--master_port" and cmd[7:] == ["-m", "aapo_app", "train", "--resume", "latest", "--output-dir",
                                                     str(tmp_path / "grpo-seed0")]


def test_bad_input_one_line_exit_2(tmp_path):
    """Each bad argument: one line naming it, exit 2, and an existing comparison left as it was.
    (model.path=/nonexistent: were a case accepted by mistake, its first run would stop at once.)"""
    out = tmp_path / "cmp"
    common = ["compare", "--out", str(out), "--max-steps", "1", "model.path=/nonexistent"]
    cases = [
        (["--algorithms", "aapo,ppo"], ["--algorithms", "unknown algorithm 'ppo'", "dr_grpo"]),
        (["--algorithms", "aapo,aapo"], ["--algorithms", "twice"]),
        (["--algorithms", "aapo,grpo", "--baseline", "dapo"], ["--baseline", "'dapo'", "--algorithms"]),
        (["--seeds", "0"], ["--seeds", "at least 2 seeds", "--seeds 0,1,2,3,4"]),
        (["--seeds", "0,one"], ["--seeds", "comma list of integers"]),
        (["--threshold", "1.5"], ["--threshold", "(0, 1]"]),
        (["--threshold", "high"], ["--threshold", "'high'"]),
        (["--nproc", "0"], ["--nproc", ">= 1"]),
        (["--window", "x"], ["--window", "integer"]),
        (["train.seed=3"], ["train.seed", "--seeds"]),
        (["--algorithms", "aapo,grpo", "dapo:algorithm.max_resample_tries=2"], ["'dapo'", "compared algorithms"]),
        (["--algorithms", "aapo,grpo", "algorithm.delta_low=-0.5"], ["algorithm.delta_low", "aapo only",
                                                                     "aapo:algorithm.delta_low=-0.5"]),
        (["--algorithms", "aapo,grpo", "algorithm.delta_lo=-0.5"], ["algorithm.delta_lo", "not a known key"]),
        (["rollout.group_size=1"], ["rollout.group_size", "> 1"]),
        (["--ds-config", str(tmp_path / "missing.json")], ["--ds-config", "cannot read"]),
    ]
    for args, words in cases:
        assert_one_line_error([*common, *args], words)
    assert not out.exists()

    # a comparison already under way: other settings are refused, naming the setting; its runs stay
    plan = C.make_plan(str(out), "aapo,grpo", "0,1", None, "0.9", "3", None, None, None, None, "1",
                       ["model.path=/nonexistent", "rollout.group_size=4"], False)
    out.mkdir()
    C.write_manifest(plan, ["compare"])
    finished = _fake_run(out, "aapo", 0, 0.5, 0.6, [0.5])
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    base = [*common, "--algorithms", "aapo,grpo", "--seeds", "0,1"]
    assert_one_line_error([*base, "rollout.group_size=8"], ["rollout.group_size", "rollout.group_size=4", "8",
                                                            "another --out"])
    assert_one_line_error([*base, "rollout.group_size=4", "--nproc", "2"], ["--nproc", "--nproc 1", "2"])
    assert_one_line_error([*base, "rollout.group_size=4", "--ds-config", str(REPO / "ds_configs" / "zero2_cpu.json")],
                          ["--ds-config", "the default", "sha256"])
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert (finished / "metrics.jsonl").is_file()
    # `aapo compare --out DIR` alone continues with the recorded settings; a seed may be added
    alone = C.make_plan(str(out), None, None, None, "0.9", "3", None, None, None, None, None, [], False)
    assert (alone.algorithms, alone.seeds, alone.nproc) == (["aapo", "grpo"], [0, 1], 1)
    assert alone.overrides == ["model.path=/nonexistent", "rollout.group_size=4", "train.max_steps=1"]
    more = C.make_plan(str(out), None, "0,1,2", None, "0.9", "3", None, None, None, None, "1",
                       ["model.path=/nonexistent", "rollout.group_size=4"], False)
    assert more.seeds == [0, 1, 2] and more.resolved == plan.resolved


# ---------------------------------------------------------------------------------------------
# end to end


@pytest.mark.slow
def test_compare_end_to_end_killed_and_continued(tiny_model_dir, tmp_path):
    """2 algorithms x 2 seeds x 2 steps on the tiny model. The comparison and its run are killed
    (SIGKILL, every process) once the second run saved its step-1 checkpoint; --report-only then covers
    the finished run; the same command again skips the finished run, resumes the interrupted one from
    step 1, trains the last two, and writes a report whose numbers are the metrics files'."""
    out = tmp_path / "cmp"
    args = ["compare", "--out", str(out), "--algorithms", "aapo,grpo", "--seeds", "0,1", "--max-steps", "2",
            f"model.path={tiny_model_dir}", "rollout.group_size=4", "rollout.prompts_per_rank=2",
            "rollout.max_new_tokens=6", "train.micro_batch_size=4", "data.eval_size=2", "train.eval_max_new_tokens=4",
            "rewards.num_workers=1", "train.learning_rate=1e-2", "train.save_every=1", "train.keep_checkpoints=1",
            "train.log_rollouts=false", "rewards.plugins=[plugin_rewards]",
            "rewards.weights={test_char_length: 1.0, boxed_format: 0.5}"]
    command = [sys.executable, "-m", "aapo_app", *args]
    interrupted = out / "grpo-seed0"
    proc = start_and_wait(command, lambda: (interrupted / "checkpoints" / "step-1").is_dir())
    kill_all(proc)
    assert (out / "aapo-seed0" / "summary.json").is_file() and not (interrupted / "summary.json").exists()
    finished_files = {p: p.read_bytes() for p in (out / "aapo-seed0").rglob("*") if p.is_file()}
    step1 = (interrupted / "metrics.jsonl").read_text().splitlines()[1]

    code, partial, exc = run_cli(["compare", "--out", str(out), "--report-only"])
    assert code == 0, (partial, exc)
    assert "Runs finished: 1/4" in partial and "grpo-seed0 (step 1 of 2)" in partial
    partial_run = json.loads((out / C.RESULTS).read_text())["runs"]["aapo-seed0"]

    done = run(command)
    assert "[1/4] aapo-seed0: finished already" in done.stderr
    assert "[2/4] grpo-seed0: resuming from its checkpoint step-1" in done.stderr
    assert "[4/4] grpo-seed1: done in" in done.stderr
    assert "resumed from" in (out / "logs" / "grpo-seed0.log").read_text()
    assert {p: p.read_bytes() for p in (out / "aapo-seed0").rglob("*") if p.is_file()} == finished_files
    lines = (interrupted / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [0, 1, 2] and lines[1] == step1

    for name in (C.TABLE, C.RESULTS, C.CURVES, C.MANIFEST):
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    assert (out / C.TABLE).read_text() in done.stdout
    results = json.loads((out / C.RESULTS).read_text())
    assert results["runs_done"] == 4 and results["unfinished"] == [] and results["pairing"]["ok"]
    assert results["runs"]["aapo-seed0"] == partial_run  # the finished run's numbers did not change
    after = {}
    for algo in ("aapo", "grpo"):
        for seed in (0, 1):
            rows = [json.loads(x) for x in (out / f"{algo}-seed{seed}" / "metrics.jsonl").read_text().splitlines()]
            assert [m["step"] for m in rows] == [0, 1, 2]
            r = results["runs"][f"{algo}-seed{seed}"]
            assert r["eval_before"] == rows[0]["eval/accuracy"] and r["eval_after"] == rows[2]["eval/accuracy"]
            assert r["grad_norm_var"] == pytest.approx(statistics.pvariance([m["grad_norm"] for m in rows[1:]]))
            assert r["grad_norm_mean"] == pytest.approx(statistics.fmean([m["grad_norm"] for m in rows[1:]]))
            assert r["zero_std_frac"] == pytest.approx(statistics.fmean(
                [m["algo/zero_std_group_frac"] for m in rows[1:]]))
            assert r["policy_samples"] == 2 * 2 * 4 and r["steps_to_threshold"] is None  # 2 steps < the 3-step window
            after[algo, seed] = rows[2]["eval/accuracy"]
    aapo = results["by_algorithm"]["aapo"]
    assert aapo["eval_after"]["mean"] == pytest.approx((after["aapo", 0] + after["aapo", 1]) / 2)
    assert aapo["vs_baseline"]["per_seed"] == {str(s): pytest.approx(after["aapo", s] - after["grpo", s]) for s in (0, 1)}
    assert aapo["steps_to_threshold"]["reached"] == 0 and aapo["steps_to_threshold"]["runs"] == 2
    manifest = json.loads((out / C.MANIFEST).read_text())
    assert manifest["algorithms"] == ["aapo", "grpo"] and manifest["seeds"] == [0, 1] and manifest["nproc"] == 1

    code, again, exc = run_cli(["compare", "--out", str(out), "--report-only"])  # the same report
    assert code == 0 and again.split("\ntable:")[0] == done.stdout.split("\ntable:")[0], (again, exc)
    assert json.loads((out / C.RESULTS).read_text()) == results
