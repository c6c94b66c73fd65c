"""The CLI: bad input gives one line, exit 2, no traceback; and a real end-to-end run on SmolLM2."""

import json
import os
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from aapo_app.cli import main

FAST = ["rollout.max_new_tokens=4", "data.eval_size=2", "rewards.num_workers=1"]


def run_cli(args):
    result = CliRunner().invoke(main, args, catch_exceptions=True)
    return result.exit_code, result.output, result.exception


def assert_one_line_error(args, words):
    """Exit 2, one line starting "error: " that contains every word, no traceback."""
    code, output, exc = run_cli(args)
    lines = [line for line in output.strip().splitlines() if line.strip()]
    assert code == 2, (args, output, exc)
    assert len(lines) == 1 and lines[0].startswith("error: "), (args, output)
    assert "Traceback" not in output
    for word in words:
        assert word in lines[0], (args, word, lines[0])


def _write(path, text):
    path.write_text(text)
    return str(path)


def bad_inputs(tmp_path):
    nocol = _write(tmp_path / "nocol.jsonl", '{"question": "1+1?", "answer": "2"}\n')
    empty = _write(tmp_path / "empty.jsonl", "")
    bad_yaml = _write(tmp_path / "bad.yaml", "rollout: [group_size: 4\n")
    cases = [
        # (args, words the one-line error must contain)
        (["model.path=/nonexistent/model"], ["model.path", "does not exist"]),
        (["algorithm.name=ppo2"], ["algorithm.name", "aapo"]),
        (["rollout.group_size=1"], ["rollout.group_size", "> 1"]),
        (["algorithm.name=dapo", "rollout.prompts_per_rank=3", "rollout.group_size=3", "algorithm.mini_batches=4"],
         ["algorithm.mini_batches", "divide"]),
        ([f"data.source={nocol}"], ["data.problem_column", "question"]),
        ([f"data.source={empty}"], ["data.source", "empty"]),
        (["rollout.group_sise=4"], ["rollout.group_sise", "valid keys"]),
        (["rollout.group_size=four"], ["rollout.group_size", "int"]),
        (["--config", bad_yaml], ["--config", "YAML"]),
        (["--config", str(tmp_path / "missing.yaml")], ["--config", "no file"]),
        (["--ds-config", str(tmp_path / "missing.json")], ["--ds-config"]),
        (["rewards.weights={nope: 1.0}"], ["rewards.weights", "nope"]),
        (["algorithm.delta_low=0.5"], ["algorithm.delta_low"]),
        (["train.learning_rate=-1"], ["train.learning_rate", "> 0"]),
        (["rollout.gather=sideways"], ["rollout.gather"]),
        (["rollout.sampler=fast"], ["rollout.sampler", "one of aapo, hf"]),
        (["rollout.vllm_mode=server"], ["rollout.vllm_mode", "renamed", "vllm.mode"]),
        (["vllm.sleep_level=3"], ["vllm.sleep_level", "one of 0, 1, 2"]),
        (["rollout.reference=later"], ["rollout.reference", "rollout.reference_cache"]),
        (["algorithm.name=dapo", "algorithm.max_resample_tries=-1"], ["algorithm.max_resample_tries", ">= 0"]),
        (["rewards.params={cosine: {max_len: 0}}"], ["rewards.params.cosine.max_len", "> 0"]),
        (["data.prompt_template=no placeholder"], ["data.prompt_template", "{problem}"]),
        (["precision=fp16"], ["precision", "one of auto, fp32, bf16"]),
        (["precision=fp32", "--ds-config", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ds_configs", "zero3_bf16.json")], ["precision=fp32", "bf16.enabled=true"]),
    ]
    if not torch.cuda.is_available():
        cases.append((["rollout.deepspeed_hybrid_engine=true"], ["rollout.deepspeed_hybrid_engine", "CUDA"]))
    return cases


def test_bad_input_one_line_exit_2(tmp_path):
    runs = tmp_path / "runs"
    for args, words in bad_inputs(tmp_path):
        assert_one_line_error(["train", "--output-dir", str(runs / "x"), *args, *FAST], words)
    assert not (runs / "x" / "metrics.jsonl").exists()


def test_help_lists_every_option():
    code, output, _ = run_cli(["train", "--help"])
    assert code == 0
    for opt in ("--config", "--ds-config", "--ref-ds-config", "--output-dir", "--max-steps", "--seed", "--help-config"):
        assert opt in output
    code, output, _ = run_cli(["train", "--help-config"])
    assert code == 0 and "rollout.group_size" in output and "algorithm.delta_low" in output


@pytest.mark.slow
def test_end_to_end_real_smollm2(tmp_path, smollm2_dir):
    """`aapo train` through the real CLI entry point on the embedded SmolLM2, one tiny step."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "aapo_app", "train", "--max-steps", "1", "--output-dir", str(out),
           "rollout.group_size=2", "rollout.prompts_per_rank=2", "rollout.max_new_tokens=12",
           "train.micro_batch_size=2", "data.eval_size=2", "train.eval_max_new_tokens=12", "rewards.num_workers=1"]
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "held-out accuracy:" in proc.stdout and f"run directory: {out}" in proc.stdout
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [0, 1]
    assert lines[1]["completion_len/mean"] > 0 and lines[1]["rollout_tokens_per_s"] > 0
    summary = json.loads((out / "summary.json").read_text())
    assert 0.0 <= summary["eval_before"] <= 1.0 and summary["eval_problems"] == 2
    groups = [json.loads(x) for x in (out / "rollouts" / "rank0.jsonl").read_text().splitlines()]
    assert len(groups) == 2 and all(len(g["ref_completions"]) == 2 for g in groups)
    # the final checkpoint: a complete HF directory of the real (tied-embedding) model
    ckpt = out / "checkpoints" / "step-1"
    assert f"checkpoint: {ckpt}" in proc.stdout and summary["checkpoint"] == str(ckpt)
    assert {"config.json", "model.safetensors", "tokenizer.json", "trainer_state.json", "deepspeed"} <= {
        p.name for p in ckpt.iterdir()}
    # export merges the ZeRO-3 partitions of the real, tied-embedding model: same logits as the
    # weights the engine gathered at the save. Under precision=bf16 (auto, on a CPU with bf16 units)
    # export writes the fp32 master weights and the checkpoint the engine's bf16 weights, which are
    # those master weights rounded to bf16
    proc = subprocess.run([sys.executable, "-m", "aapo_app", "export", str(out), "--out", str(tmp_path / "hf")],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    saved, exported = load_file(ckpt / "model.safetensors"), load_file(tmp_path / "hf" / "model.safetensors")
    assert saved.keys() == exported.keys()
    assert all(torch.equal(exported[k].to(saved[k].dtype), saved[k]) for k in saved)
    if all(t.dtype == torch.float32 for t in saved.values()):  # fp32: the same logits, too
        ids = torch.tensor([[1, 504, 3017, 28, 9]])
        with torch.no_grad():
            a = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")(input_ids=ids).logits
            b = AutoModelForCausalLM.from_pretrained(ckpt)(input_ids=ids).logits
        assert torch.equal(a, b)


def test_glossary_has_no_wildcard_for_algorithm_metrics_and_plot_panels_are_defined():
    from aapo_app.metrics import METRICS, glossary_key
    from aapo_app.plot import PANELS

    assert glossary_key("reward/cosine") == "reward/<name>"
    with pytest.raises(KeyError, match="algo/undefined"):
        glossary_key("algo/undefined")
    assert not [key for key in METRICS if key.startswith("algo/<")]
    keys = [key for key, _ in PANELS]
    assert len(set(keys)) == len(keys)
    for key in keys:  # one panel, one defined metric
        assert glossary_key(key) == key


def test_existing_run_directory_is_not_touched(tmp_path):
    run_dir = tmp_path / "old-run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n')
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    code, output, exc = run_cli(["train", "--output-dir", str(run_dir), *FAST])
    assert code == 2, (output, exc)
    assert output.strip().startswith("error: --output-dir") and "holds a run that saved no checkpoint" in output
    assert "--overwrite" in output
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before


def _snapshot(root):
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def test_bad_input_matrix_across_commands(tmp_path, tiny_model_dir, shared_dir):
    """Bad input to every command: one line naming the field and the fix, exit 2, no traceback, and
    the existing run directory untouched (file list, sizes and modification times)."""
    from aapo_app.config import load_run_config

    run = tmp_path / "existing_run"
    (run / "checkpoints" / "step-2" / "deepspeed").mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 0, "eval/accuracy": 0.5}\n')
    good = load_run_config(None, [f"output_dir={run}"]).to_dict()
    (run / "checkpoints" / "step-2" / "trainer_state.json").write_text(json.dumps(
        {"step": 2, "world_size": 1, "config": good}))
    damaged = tmp_path / "damaged_run"
    (damaged / "checkpoints" / "step-1" / "deepspeed").mkdir(parents=True)
    (damaged / "checkpoints" / "step-1" / "trainer_state.json").write_text("{not json")
    bad_ds = _write(tmp_path / "ds.json", json.dumps({"train_micro_batch_size_per_gpu": 3, "zero_optimization": {"stage": 3}}))
    bad_yaml = _write(tmp_path / "bad.yaml", "rollout: [group_size: 4\n")
    empty = _write(tmp_path / "empty.jsonl", "")
    nocol = _write(tmp_path / "nocol.jsonl", '{"question": "1+1?", "answer": "2"}\n')
    before = _snapshot(run)
    out = ["--output-dir", str(tmp_path / "new")]
    cases = [
        (["train", "--config", bad_yaml, *out], ["--config", "YAML"]),
        (["train", "rollout.group_sise=4", *out], ["rollout.group_sise", "valid keys"]),
        (["train", "train.max_steps=ten", *out], ["train.max_steps", "int"]),
        (["train", "--config", str(tmp_path / "missing.yaml"), *out], ["--config", "no file"]),
        (["eval", "--benchmarks", "aime24,gsm8k"], ["--benchmarks", "gsm8k"]),
        (["train", "rewards.weights={correctness: 1.0}", *out], ["rewards.weights", "correctness"]),
        (["train", "--ds-config", bad_ds, *out], ["train_micro_batch_size_per_gpu=3", "train.micro_batch_size"]),
        (["train", "rollout.group_size=1", *out], ["rollout.group_size", "> 1"]),
        (["check-config", f"model.path={tiny_model_dir}", "rollout.max_new_tokens=600"],
         ["rollout.max_new_tokens=600", "context of 512 positions", "lower"]),
        (["train", f"data.source={empty}", *out], ["data.source", "empty"]),
        (["train", f"data.source={nocol}", *out], ["data.problem_column", "question"]),
        (["train", "--resume", str(damaged)], ["trainer_state.json", "damaged"]),
        (["train", "--resume", str(run), "rollout.group_size=4"], ["--resume", "rollout.group_size=8", "own config"]),
        (["train", "--resume", "latest"], ["--resume latest", "--output-dir"]),
        (["train", "--output-dir", str(run)], ["already holds a run"]),
        (["train", "--report-to", "mlflow", *out], ["--report-to", "mlflow"]),
        (["export", str(tmp_path / "new"), "--out", str(tmp_path / "hf")], ["RUN_DIR", "not a directory"]),
        (["export", str(damaged), "--step", "9", "--out", str(tmp_path / "hf")], ["--step", "saved steps: 1"]),
        (["plot", str(tmp_path), "--out", str(tmp_path / "p.png")], ["RUN_DIR", "metrics.jsonl"]),
        (["eval", "--run", str(damaged), "--step", "3"], ["--run", "no checkpoints"]),  # none has HF weights
        (["eval", "--n-samples", "2", "--k", "4"], ["--k 4", "--n-samples 4"]),
        (["check-config", "--world-size", "4", "rollout.prompts_per_rank=30"], ["training prompts", "prompts_per_rank"]),
        (["grade", "", "\\boxed{1}"], ["GOLD is empty"]),
    ]
    for args, words in cases:
        assert_one_line_error(args, words)
    assert len(cases) >= 15
    assert _snapshot(run) == before
    assert not (tmp_path / "new" / "metrics.jsonl").exists() and not (tmp_path / "hf").exists()


def test_plot_overlays_runs(tmp_path):
    """Two runs' metrics.jsonl -> one PNG with every panel some run has; AAPO-only panels appear
    because one run has them."""
    for name, algo_keys in (("aapo-run", {"algo/momentum_clip_low_frac": 0.1, "algo/momentum_clip_high_frac": 0.2}), ("grpo-run", {})):
        run = tmp_path / name
        run.mkdir()
        rows = [{"step": 0, "eval/accuracy": 0.5}] + [
            {"step": s, "reward/mean": s / 10, "accuracy": s / 10, "loss": 1 / s, "completion_len/mean": 10 + s,
             "algo/zero_std_group_frac": 0.25, "grad_norm": 1.0, **algo_keys} for s in range(1, 6)]
        rows[-1]["eval/accuracy"] = 0.75
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    png = tmp_path / "out" / "curves.png"
    code, output, _ = run_cli(["plot", str(tmp_path / "aapo-run"), str(tmp_path / "grpo-run"), "--out", str(png),
                               "--smooth", "2"])
    assert code == 0, output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    for key in ("reward/mean", "eval/accuracy", "loss", "completion_len/mean", "algo/zero_std_group_frac",
                "algo/momentum_clip_low_frac", "algo/momentum_clip_high_frac"):
        assert key in output
    assert "algo/ratio_clip_frac" not in output  # no run has it: no empty panel
    from aapo_app.plot import smooth

    assert smooth([1.0, 3.0, 5.0], 2) == [1.0, 2.0, 4.0]  # trailing mean of 2: (1), (1+3)/2, (3+5)/2


def test_check_config_accepts_the_recipes_offline(shared_dir):
    math_train = shared_dir / "datasets" / "math_train" / "math_train.json"
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for recipe, world in (("1.5b-open-rs", 2), ("7b-simplelr", 8), ("llama-1b", 4)):
        code, output, exc = run_cli([
            "check-config", "--config", f"{repo}/launch/recipes/{recipe}.yaml",
            "--ds-config", f"{repo}/ds_configs/zero3_bf16.json",
            "--ref-ds-config", f"{repo}/ds_configs/zero3_inference_bf16.json", "--world-size", str(world),
            "data.preset=math_train_level3to5", f"data.source={math_train}"])
        assert code == 0, (recipe, output, exc)
        assert output.rstrip().endswith("config OK") and f"batch: {world} rank(s)" in output
    # a batch that does not divide the world's arithmetic is caught by the same checks
    code, output, _ = run_cli(["check-config", "algorithm.name=dapo", "rollout.prompts_per_rank=3",
                               "rollout.group_size=3"])
    assert code == 2 and "algorithm.mini_batches=4 does not divide the 9 sequences" in output


def _grade_json(args):
    code, output, exc = run_cli(["grade", "--json", *args])
    assert code == 0, (args, output, exc)
    return json.loads(output.strip().splitlines()[-1])


def test_grade_negative_answers():
    """Answers beginning with '-' are arguments, not options: `aapo grade -5 '\\boxed{-5}'`."""
    assert _grade_json(["-5", "\\boxed{-5}"])["correct"] is True
    assert _grade_json(["-5", "\\boxed{5}"])["correct"] is False
    assert _grade_json(["5", "-5"])["correct"] is False  # a negative prediction
    assert _grade_json(["-\\frac{1}{2}", "-0.5", "--protocol", "simplerl"]) == {
        "protocol": "simplerl", "gold": "-\\frac{1}{2}", "predicted": "-0.5", "correct": True, "status": "ok"}
    # letters of real short options inside an answer do not trigger them (-h is --help); an answer
    # that is exactly an option's name goes after "--"
    assert _grade_json(["-h^2", "\\boxed{-h^2}", "--protocol=simplerl"])["correct"] is True
    assert _grade_json(["--protocol=simplerl", "--", "-h", "\\boxed{-h}"])["correct"] is True
    # the real options still work, before, between and after the arguments, and "--" still ends options
    assert _grade_json(["--protocol", "simplerl", "-5", "--timeout", "5", "\\boxed{-5}"])["protocol"] == "simplerl"
    assert _grade_json(["--", "-5", "\\boxed{-5}"])["correct"] is True
    code, output, _ = run_cli(["grade", "-5", "\\boxed{-5}"])
    assert code == 0 and "verdict:   correct (status ok)" in output
    code, output, _ = run_cli(["grade", "-h"])
    assert code == 0 and "Usage:" in output and "--protocol" in output
    code, output, _ = run_cli(["grade", "-5", "-5", "--protocol", "nope"])
    assert code == 2 and "'nope' is not one of" in output


def test_grade_malformed_gold_reports_error():
    for protocol in ("lighteval", "simplerl"):
        out = _grade_json(["\\frac{1}{2", "\\boxed{0.5}", "--protocol", protocol])
        assert (out["correct"], out["status"]) == (False, "error"), out
    code, output, _ = run_cli(["grade", "\\frac{1}{2", "\\boxed{0.5}"])
    assert code == 0 and "verdict:   wrong (status error)" in output


def test_grade_bad_timeout_one_line():
    assert_one_line_error(["grade", "1", "\\boxed{1}", "--timeout", "0"], ["--timeout", "> 0"])
    assert_one_line_error(["grade", "1", "\\boxed{1}", "--timeout", "-3"], ["--timeout", "> 0"])
