"""Seconds per training step: ``aapo train`` (grpo, and aapo) against TRL's ``GRPOTrainer``, same work.

Both trainers get the same model (the embedded SmolLM2-135M-Instruct by default), prompts from the
same pool (the embedded default's training problems, rendered with the same chat template), the
same group size, number of prompts per step, completion length, sampling settings, KL weight,
learning rate and one optimizer step per rollout; see ``bench/trl_grpo_step.py`` for how every
TRL setting is mapped. Runs one after another (never two at once), each with ``--warmup`` steps
that are not counted, and prints seconds per step with the ratio to TRL.

TRL is a benchmark-only extra: this script installs the pinned version (``pip install -e
'.[bench]'`` does the same) into the running environment when it is missing.

    python bench/vs_trl.py                                   # writes bench/results/vs_trl.{json,md}
    python bench/vs_trl.py --steps 5 --max-new-tokens 128 --group-size 8

Runs unchanged on a GPU (both trainers pick up CUDA).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import machine, write_results

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
TRL_REQUIREMENT = "trl==1.16.0"  # the version the mapping in trl_grpo_step.py was read from


def ensure_trl() -> str:
    try:
        import trl
    except ImportError:
        print(f"installing {TRL_REQUIREMENT} (benchmark-only)", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", TRL_REQUIREMENT], check=True)
        import trl
    return trl.__version__


def write_prompts(path: Path, model_dir: str, count: int, seed: int) -> None:
    from aapo_app.data import DataConfig, load_examples, render_prompt
    from aapo_app.models import load_tokenizer

    tok = load_tokenizer(model_dir)
    cfg = DataConfig()
    train, _ = load_examples(cfg, seed)
    with open(path, "w") as f:
        for ex in train[:count]:
            f.write(json.dumps({"prompt": render_prompt(tok, ex.problem, cfg), "answer": ex.answer}) + "\n")


def run_trl(args, model_dir: str, prompts: Path, out: Path) -> dict:
    cmd = [sys.executable, str(ROOT / "bench" / "trl_grpo_step.py"), "--model", model_dir, "--prompts", str(prompts),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--prompts-per-step", str(args.prompts),
           "--group-size", str(args.group_size), "--max-new-tokens", str(args.max_new_tokens),
           "--temperature", str(args.temperature), "--beta", str(args.beta), "--learning-rate", str(args.learning_rate),
           "--seed", str(args.seed), "--out", str(out)]
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    res = json.loads(out.read_text())
    tokens = res.get("completion_tokens") or []
    return {"step_seconds": res["step_seconds"], "rollout_seconds": res.get("rollout_seconds"),
            "completion_tokens": tokens, "version": res.get("trl_version")}


def run_aapo(args, algorithm: str, out_dir: Path) -> dict:
    steps = args.steps + args.warmup
    cmd = [sys.executable, "-m", "aapo_app", "train", "--output-dir", str(out_dir), "--max-steps", str(steps),
           "--seed", str(args.seed), f"algorithm.name={algorithm}", f"rollout.group_size={args.group_size}",
           f"rollout.prompts_per_rank={args.prompts}", f"rollout.max_new_tokens={args.max_new_tokens}",
           f"rollout.temperature={args.temperature}", f"rollout.sampler={args.sampler}",
           f"train.learning_rate={args.learning_rate}", f"train.micro_batch_size={args.prompts * args.group_size}",
           "train.save_final=false", "train.log_samples_every=0", "data.eval_size=2", "train.eval_max_new_tokens=4"]
    if algorithm == "grpo":
        cmd.append(f"algorithm.beta={args.beta}")
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "step_seconds" in r][args.warmup:]
    group = args.prompts * args.group_size
    return {"step_seconds": [r["step_seconds"] for r in rows], "rollout_seconds": [r["rollout_seconds"] for r in rows],
            "update_seconds": [r["update_seconds"] for r in rows],
            "completion_tokens": [round(r["completion_len/mean"] * group) for r in rows]}


def summary(res: dict) -> dict:
    res["mean_step_seconds"] = statistics.fmean(res["step_seconds"])
    res["median_step_seconds"] = statistics.median(res["step_seconds"])
    if res.get("rollout_seconds"):
        res["mean_rollout_seconds"] = statistics.fmean(res["rollout_seconds"])
    # completions are sampled, so their lengths differ between runs: also per completion token
    res["completion_tokens_per_step"] = statistics.fmean(res["completion_tokens"]) if res["completion_tokens"] else None
    res["seconds_per_1k_tokens"] = (1000 * sum(res["step_seconds"]) / sum(res["completion_tokens"])
                                    if res["completion_tokens"] else None)
    return res


def markdown(res: dict) -> str:
    s = res["settings"]
    trl = res["runs"]["TRL GRPOTrainer"]["mean_step_seconds"]
    lines = [f"Machine: {res['machine']}; TRL {res['trl_version']}; {s['prompts']} prompts x G={s['group_size']} per "
             f"step, {s['max_new_tokens']} new tokens, temperature {s['temperature']}, beta {s['beta']}, "
             f"{s['steps']} measured steps after {s['warmup']} warm-up.", "",
             "| trainer | s/step (mean) | s/step (median) | rollout s | vs TRL | completion tokens/step "
             "| s per 1k completion tokens | vs TRL |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    trl_k = res["runs"]["TRL GRPOTrainer"]["seconds_per_1k_tokens"]
    for name, r in res["runs"].items():
        rollout = f"{r['mean_rollout_seconds']:.1f}" if r.get("mean_rollout_seconds") is not None else "–"
        per_k = r["seconds_per_1k_tokens"]
        lines.append(f"| {name} | {r['mean_step_seconds']:.2f} | {r['median_step_seconds']:.2f} | {rollout} | "
                     f"{r['mean_step_seconds'] / trl:.2f}x | {r['completion_tokens_per_step']:.0f} | "
                     f"{per_k:.1f} | {per_k / trl_k:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="embedded:smollm2-135m-instruct")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--prompts", type=int, default=2, help="prompts per step (aapo: rollout.prompts_per_rank)")
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--beta", type=float, default=0.04, help="KL weight of both GRPOs")
    p.add_argument("--learning-rate", type=float, default=5e-5)
    p.add_argument("--sampler", default="aapo", choices=["aapo", "hf"], help="aapo's rollout.sampler")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-aapo-algorithm", action="store_true", help="time only grpo on the aapo side")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "vs_trl"))
    args = p.parse_args()

    from aapo_app.models import resolve_model_path
    import torch

    version = ensure_trl()
    model_dir = resolve_model_path(args.model)
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        prompts = tmp / "prompts.jsonl"
        write_prompts(prompts, model_dir, args.prompts * (args.steps + args.warmup) * 4, args.seed)
        runs["TRL GRPOTrainer"] = summary(run_trl(args, model_dir, prompts, tmp / "trl.json"))
        runs["aapo train, grpo"] = summary(run_aapo(args, "grpo", tmp / "aapo-grpo"))
        if not args.skip_aapo_algorithm:
            runs["aapo train, aapo"] = summary(run_aapo(args, "aapo", tmp / "aapo-aapo"))
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    settings = {k: v for k, v in vars(args).items() if k != "out"}  # no machine paths in the results
    res = {"machine": machine(device), "trl_version": version, "settings": settings, "runs": runs}
    write_results(args.out, res, markdown(res))


if __name__ == "__main__":
    main()
