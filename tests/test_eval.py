"""`aapo eval` and `aapo grade`: pass@k, the results files, bad input, data parallelism, run checkpoints."""

import json
import os
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import free_port, run

from aapo_app.cli import main
from aapo_app.evaluate import benchmark_scores, markdown_table, pass_at_k, run_checkpoints, summarize
from aapo_app.errors import AapoError


def run_cli(args, input=None):
    result = CliRunner().invoke(main, args, input=input, catch_exceptions=True)
    return result.exit_code, result.output


# --------------------------------------------------------------------------- pass@k


def test_pass_at_k_by_hand():
    # n=4 samples, c=1 correct, k=2: 1 - C(3,2)/C(4,2) = 1 - 3/6 = 0.5
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)
    # n=5, c=2, k=3: 1 - C(3,3)/C(5,3) = 1 - 1/10 = 0.9
    assert pass_at_k(5, 2, 3) == pytest.approx(0.9)
    # k=1 is the fraction correct: 3/8
    assert pass_at_k(8, 3, 1) == pytest.approx(0.375)
    assert pass_at_k(4, 0, 4) == 0.0 and pass_at_k(4, 4, 1) == 1.0
    assert pass_at_k(4, 2, 3) == 1.0  # only 2 wrong samples: any 3 include a correct one
    with pytest.raises(ValueError):
        pass_at_k(2, 1, 3)


def _records(bench, verdicts):
    return [{"benchmark": bench, "problem_id": str(p), "sample": j, "correct": c, "status": "ok"}
            for p, row in enumerate(verdicts) for j, c in enumerate(row)]


def test_scores_and_table():
    # problem 0: 1 of 4 correct, problem 1: 4 of 4 -> pass@1 = (0.25 + 1) / 2 = 62.5 %,
    # pass@2 = (0.5 + 1) / 2 = 75 % (see test_pass_at_k_by_hand for 0.5)
    a = _records("aime24", [[True, False, False, False], [True] * 4])
    b = _records("amc23", [[False] * 4, [False] * 4])  # 0 % at every k
    scores = summarize(a + b, ["aime24", "amc23"], (1, 2))
    assert scores["aime24"]["pass@1"] == pytest.approx(62.5)
    assert scores["aime24"]["pass@2"] == pytest.approx(75.0)
    assert scores["amc23"]["pass@2"] == 0.0
    assert scores["average"]["pass@1"] == pytest.approx(31.25)  # unweighted mean of benchmarks
    assert scores["aime24"]["problems"] == 2 and scores["aime24"]["samples"] == 8
    table = markdown_table({"m": scores}, ["aime24", "amc23"], (1, 2))
    assert "| Model | AIME24 | AMC23 | Avg. |" in table
    assert "| m | 62.5 | 0.0 | 31.2 |" in table and "| m | 75.0 | 0.0 | 37.5 |" in table
    assert benchmark_scores([], (1,))["problems"] == 0


# --------------------------------------------------------------------------- aapo grade


def test_grade_command():
    code, out = run_cli(["grade", "\\frac{1}{2}", "so the answer is \\boxed{0.5}"])
    assert code == 0 and "verdict:   correct" in out and "protocol:  lighteval" in out
    code, out = run_cli(["grade", "--protocol", "simplerl", "--json", "7", "The answer is 8."])
    assert code == 0 and json.loads(out) == {"protocol": "simplerl", "gold": "7", "predicted": "8",
                                             "correct": False, "status": "ok"}
    code, out = run_cli(["grade", "--json", "42", "-"], input="long work ... \\boxed{42}\n")
    assert json.loads(out)["correct"] is True
    code, out = run_cli(["grade", " ", "x"])
    assert code == 2 and out.startswith("error: GOLD is empty")


def test_grade_python_function_is_the_reward_grader():
    from aapo_app.grader import grade
    from aapo_app.rewards import RewardModel

    assert grade("3", "\\boxed{3}", protocol="simplerl").correct
    reward = RewardModel({"accuracy": 1.0}, 5.0, 1)
    try:  # the training reward gives 1.0 exactly where grade() says correct
        texts, golds = ["\\boxed{0.5}", "\\boxed{0.6}"], ["\\frac{1}{2}", "\\frac{1}{2}"]
        assert reward.score(texts, golds, [3, 3]).total.tolist() == [float(grade(g, t).correct)
                                                                      for g, t in zip(golds, texts)] == [1.0, 0.0]
    finally:
        reward.close()


# --------------------------------------------------------------------------- bad input


def bad_eval_inputs(tmp_path, shared_dir):
    bench = str(shared_dir / "benchmarks")
    no_ckpt = tmp_path / "run-without-checkpoints"
    no_ckpt.mkdir()
    partial = tmp_path / "partial"
    (partial / "aime24").mkdir(parents=True)
    (partial / "aime24" / "test.jsonl").write_text('{"problem": "1+1?", "answer": "2"}\n')
    badjson = tmp_path / "badjson"
    (badjson / "aime24").mkdir(parents=True)
    (badjson / "aime24" / "test.jsonl").write_text('{"problem": "1+1?", "answer": "2"}\n{oops\n')
    nogold = tmp_path / "nogold"
    (nogold / "aime24").mkdir(parents=True)
    (nogold / "aime24" / "test.jsonl").write_text('{"problem": "1+1?", "solution": "2"}\n')
    done = tmp_path / "done"
    done.mkdir()
    (done / "results.json").write_text("{}")
    bad_config = tmp_path / "eval.yaml"
    bad_config.write_text("tempreature: 0.5\n")
    return [
        (["--config", str(bad_config)], ["'tempreature' is not a known key", "temperature"]),
        (["temperature=hot"], ["temperature", "float"]),
        (["backend=sglang"], ["backend must be one of hf, vllm"]),
        (["protocol=gsm8k"], ["protocol", "lighteval or simplerl"]),
        (["--config", str(tmp_path / "missing.yaml")], ["--config", "no file"]),
        (["--benchmarks", "gsm8k"], ["--benchmarks", "gsm8k"]),
        (["--data-dir", str(tmp_path / "nope")], ["--data-dir", "not a directory"]),
        (["--data-dir", str(partial), "--benchmarks", "aime24,amc23"], ["--data-dir", "amc23/test.jsonl"]),
        (["--data-dir", str(badjson), "--benchmarks", "aime24"], ["line 2", "not JSON"]),
        (["--data-dir", str(nogold), "--benchmarks", "aime24"], ["aime24", "'answer' column"]),
        (["--model", "/nonexistent/model"], ["model.path", "does not exist"]),
        (["--run", str(tmp_path / "no-run")], ["--run", "not a directory"]),
        (["--run", str(no_ckpt)], ["--run", "no checkpoints"]),
        (["--k", "1,4"], ["--k 4", "--n-samples 4"]),
        (["--k", "a,b"], ["--k", "positive integers"]),
        (["--temperature", "0"], ["--temperature", "--greedy"]),
        (["--greedy", "--n-samples", "4"], ["--greedy"]),
        (["--top-p", "1.5"], ["--top-p"]),
        (["--limit", "0"], ["--limit", ">= 1"]),
        (["--batch-size", "0"], ["--batch-size", ">= 1"]),
        (["--prompt-template", "no placeholder"], ["--prompt-template", "{problem}"]),
        (["--backend", "vllm"], ["--backend vllm"]),
        (["--ds-config", str(tmp_path / "missing.json")], ["--ds-config"]),
        (["--resume"], ["--resume", "partial/"]),
        (["--output-dir", str(done), "--data-dir", bench, "--limit", "1", "--benchmarks", "aime24"],
         ["--output-dir", "already holds results"]),
    ]


def test_eval_bad_input_one_line_exit_2(tmp_path, shared_dir):
    for args, words in bad_eval_inputs(tmp_path, shared_dir):
        code, output = run_cli(["eval", *args])
        lines = [line for line in output.strip().splitlines() if line.strip()]
        assert code == 2, (args, output)
        assert len(lines) == 1 and lines[0].startswith("error: "), (args, output)
        for word in words:
            assert word in lines[0], (args, word, lines[0])
    assert json.loads((tmp_path / "done" / "results.json").read_text()) == {}  # not overwritten


def test_eval_settings_from_a_file_overrides_and_flags(tmp_path):
    """The protocol's defaults, then the --config file, then KEY=VALUE overrides, then the flags."""
    from aapo_app.evaluate import PROTOCOLS, eval_settings

    path = tmp_path / "eval.yaml"
    path.write_text("protocol: simplerl\ntemperature: 0.9\nn_samples: 4\nk: [1, 4]\ntop_p: 0.7\n")
    s = eval_settings(str(path), ["top_p=0.8", "seed=3"], temperature=0.5, n_samples=None)
    assert (s.protocol, s.temperature, s.top_p, s.n_samples, s.k, s.seed) == ("simplerl", 0.5, 0.8, 4, (1, 4), 3)
    assert s.max_new_tokens == PROTOCOLS["simplerl"].max_new_tokens  # the file's protocol's default
    assert eval_settings(str(path), [], protocol="lighteval").prompt_template == PROTOCOLS["lighteval"].prompt_template
    assert eval_settings(None, ["k=1,2", "n_samples=2"]).k == (1, 2)


def test_run_checkpoints_selection(tmp_path):
    for step in (2, 10):
        d = tmp_path / "checkpoints" / f"step-{step}"
        d.mkdir(parents=True)
        (d / "config.json").write_text("{}")
    (tmp_path / "checkpoints" / "step-12.tmp").mkdir()  # an unfinished save is ignored
    assert [s.source["step"] for s in run_checkpoints(str(tmp_path))] == [10]  # latest is numeric, not 2 < 10 text
    assert [s.source["step"] for s in run_checkpoints(str(tmp_path), "all")] == [2, 10]
    assert run_checkpoints(str(tmp_path), "2")[0].path.endswith("step-2")
    with pytest.raises(AapoError, match="saved steps: 2, 10"):
        run_checkpoints(str(tmp_path), "3")


# --------------------------------------------------------------------------- end to end


def check_results(out: Path, benchmarks, ks, n_samples, limit):
    """The three files agree: every table figure is recomputed from samples.jsonl."""
    payload = json.loads((out / "results.json").read_text())
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    table = (out / "results.md").read_text()
    assert payload["benchmarks"] == benchmarks and payload["settings"]["n_samples"] == n_samples
    for label, scores in payload["results"].items():
        mine = [s for s in samples if s["model"] == label]
        assert len(mine) == len(benchmarks) * limit * n_samples
        for s in mine:
            assert {"problem_id", "prompt", "completion", "extracted", "gold", "correct"} <= s.keys()
        for b in benchmarks:
            rows = [s for s in mine if s["benchmark"] == b]
            assert len({s["problem_id"] for s in rows}) == limit
            for k in ks:
                assert 0.0 <= scores[b][f"pass@{k}"] <= 100.0
            by_problem = {}
            for s in rows:
                by_problem.setdefault(s["problem_id"], []).append(s["correct"])
            pass1 = 100 * sum(sum(v) / len(v) for v in by_problem.values()) / len(by_problem)
            assert scores[b]["pass@1"] == pytest.approx(pass1)
        cells = " | ".join(f"{scores[b]['pass@1']:.1f}" for b in benchmarks)
        assert f"| {label} | {cells} | {scores['average']['pass@1']:.1f} |" in table
    return payload, samples


@pytest.mark.slow
def test_end_to_end_real_smollm2_every_benchmark(tmp_path, shared_dir, smollm2_dir):
    """The real SmolLM2-135M on the first 2 problems of each of the five real benchmark files."""
    out = tmp_path / "eval"
    proc = run([sys.executable, "-m", "aapo_app", "eval", "--benchmarks", "all", "--data-dir",
                str(shared_dir / "benchmarks"), "--limit", "2", "--max-new-tokens", "48", "--output-dir", str(out)],
               timeout=1200)
    assert "| Model | AIME24 | MATH-500 | AMC23 | Minerva | OlympiadBench | Avg. |" in proc.stdout
    assert "ETA" in proc.stderr or "<" in proc.stderr  # tqdm's remaining-time field
    payload, samples = check_results(out, ["aime24", "math500", "amc23", "minerva", "olympiadbench"], (1,), 1, 2)
    assert payload["settings"]["protocol"] == "lighteval" and payload["settings"]["temperature"] == 0.6
    assert all("Think step by step" in s["prompt"] and "<|im_start|>assistant" in s["prompt"] for s in samples)
    assert all(s["tokens"] <= 48 for s in samples)


@pytest.mark.slow
def test_two_ranks_give_the_one_rank_samples(tiny_model_dir, tmp_path, shared_dir):
    """Problems sharded over 2 ranks (deepspeed launcher) give the 1-rank run's samples exactly."""
    import shutil

    args = ["eval", "--model", str(tiny_model_dir), "--benchmarks", "aime24,amc23", "--data-dir",
            str(shared_dir / "benchmarks"), "--limit", "3", "--batch-size", "2", "--n-samples", "2", "--k", "1,2",
            "--max-new-tokens", "6", "--protocol", "simplerl", "--seed", "7"]
    run([sys.executable, "-m", "aapo_app", *args, "--output-dir", str(tmp_path / "one")], timeout=1200)
    launcher = shutil.which("deepspeed", path=os.path.dirname(sys.executable)) or shutil.which("deepspeed")
    run([launcher, "--num_gpus", "2", "--master_port", str(free_port()), "--module", "aapo_app", *args,
         "--output-dir", str(tmp_path / "two")], timeout=1200)
    one, s1 = check_results(tmp_path / "one", ["aime24", "amc23"], (1, 2), 2, 3)
    two, s2 = check_results(tmp_path / "two", ["aime24", "amc23"], (1, 2), 2, 3)
    assert one["results"] == two["results"]
    strip = lambda rows: [{k: v for k, v in r.items() if k != "model"} for r in rows]  # noqa: E731
    assert strip(s1) == strip(s2)
    assert len({s["completion"] for s in s1}) > 1  # sampling happened: not one repeated text
    # within a problem the two samples differ (seeded once per batch, not once per row)
    assert any(a["completion"] != b["completion"] for a, b in zip(s1[::2], s1[1::2]))


@pytest.mark.slow
def test_eval_of_a_training_runs_checkpoints(tiny_model_dir, tmp_path, shared_dir):
    """Training saves checkpoints holding the policy's trained weights; `aapo eval --run DIR --step all`
    makes one table row per saved step."""
    import deepspeed
    import torch
    from transformers import AutoModelForCausalLM

    from aapo_app.config import load_run_config
    from aapo_app.trainer import Trainer

    run_dir = tmp_path / "run"
    cfg = load_run_config(None, [
        f"model.path={tiny_model_dir}", f"output_dir={run_dir}", "rollout.group_size=4", "rollout.prompts_per_rank=2",
        "rollout.max_new_tokens=6", "train.micro_batch_size=4", "train.max_steps=2", "data.eval_size=2",
        "train.eval_max_new_tokens=6", "rewards.num_workers=1", "train.learning_rate=1e-2", "train.save_every=1",
        "rewards.weights={test_char_length: 1.0}"])  # a reward that varies on a random model (conftest)
    trainer = Trainer(cfg)
    try:
        trainer.train()
        params = dict(trainer.policy.module.named_parameters())
        with deepspeed.zero.GatheredParameters(list(params.values())):
            final = {name: p.data.clone() for name, p in params.items()}
    finally:
        trainer.close()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-1", "step-2"]
    meta = json.loads((run_dir / "checkpoints" / "step-2" / "trainer_state.json").read_text())
    assert meta["step"] == 2 and meta["algorithm"] == "aapo"
    base = dict(AutoModelForCausalLM.from_pretrained(tiny_model_dir).named_parameters())
    saved = dict(AutoModelForCausalLM.from_pretrained(run_dir / "checkpoints" / "step-2").named_parameters())
    assert saved.keys() == final.keys()
    assert all(torch.equal(saved[n], final[n]) for n in final)  # exactly the policy after step 2
    assert any(not torch.equal(saved[n], base[n]) for n in final)  # which training changed

    out = tmp_path / "eval"
    run([sys.executable, "-m", "aapo_app", "eval", "--run", str(run_dir), "--step", "all", "--benchmarks", "amc23",
         "--data-dir", str(shared_dir / "benchmarks"), "--limit", "2", "--max-new-tokens", "4", "--greedy",
         "--output-dir", str(out)], timeout=1200)
    payload, _ = check_results(out, ["amc23"], (1,), 1, 2)
    assert list(payload["results"]) == ["run@step-1", "run@step-2"]
    assert [m["step"] for m in payload["models"]] == [1, 2]


def test_interrupted_eval_resumes_without_resampling(tiny_model_dir, tmp_path, shared_dir, monkeypatch):
    """A run killed after its first batch resumes with --resume: the journaled batch is read back
    (not sampled again), and the result equals an uninterrupted run's, sample for sample."""
    from aapo_app.generation import DeepSpeedGenerator

    args = ["eval", "--model", str(tiny_model_dir), "--benchmarks", "aime24,amc23", "--data-dir",
            str(shared_dir / "benchmarks"), "--limit", "2", "--batch-size", "1", "--max-new-tokens", "5"]
    real_generate, calls = DeepSpeedGenerator.sample, []

    def failing_generate(self, *a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated crash")
        return real_generate(self, *a, **kw)

    monkeypatch.setattr(DeepSpeedGenerator, "sample", failing_generate)
    out = tmp_path / "interrupted"
    result = CliRunner().invoke(main, [*args, "--output-dir", str(out)])
    assert isinstance(result.exception, RuntimeError) and not (out / "results.json").exists()
    assert len(list((out / "partial").rglob("rank0.jsonl"))) == 1  # batch 1 of 4 was journaled

    code, output = run_cli([*args, "--output-dir", str(out)])  # without --resume: refused, journal kept
    assert code == 2 and "--resume" in output and (out / "partial").is_dir()

    def counting_generate(self, *a, **kw):
        calls.append(1)
        return real_generate(self, *a, **kw)

    monkeypatch.setattr(DeepSpeedGenerator, "sample", counting_generate)
    calls.clear()
    code, output = run_cli([*args, "--output-dir", str(out), "--resume"])
    assert code == 0, output
    assert len(calls) == 3  # 4 batches (2 benchmarks x 2 problems, 1 per batch) minus the journaled one
    assert not (out / "partial").exists()
    code, output = run_cli([*args, "--output-dir", str(tmp_path / "straight")])
    assert code == 0, output
    resumed = (out / "samples.jsonl").read_text().splitlines()
    straight = (tmp_path / "straight" / "samples.jsonl").read_text().splitlines()
    assert len(resumed) == 4 and resumed == straight
