"""Seconds per training step: ``aapo train`` (grpo, and aapo) against TRL's ``GRPOTrainer``, same work.

Both trainers get the same model (the embedded SmolLM2-135M-Instruct by default), prompts from the
same pool (the embedded default's training problems, rendered with the same chat template), the
same group size, number of prompts per step, completion length, sampling settings, KL weight,
learning rate and one optimizer step per rollout; see ``bench/trl_grpo_step.py`` for how every
TRL setting is mapped. Runs one after another (never two at once), each with ``--warmup`` steps
that are not counted, and prints seconds per step with the ratio to TRL.

Identical work: by default EOS is never drawn on either side (TRL: ``generate``'s
``min_new_tokens``; aapo: ``rollout.ignore_eos``), so every completion has exactly
``--max-new-tokens`` tokens and both trainers generate, score and train on the same number of
tokens per step (``--eos`` stops at EOS instead: then the work follows the sampled lengths). In
each precision (``--precisions``; bf16 where the machine has bf16 matrix units): TRL's bf16 is
autocast over fp32 weights, aapo's is DeepSpeed bf16 with fp32 master weights.

``--length-check`` first samples the same prompts from the untrained model through TRL's generation
settings (``generate`` with the ``GenerationConfig`` GRPOTrainer builds) and through aapo's loop,
stopping at EOS, and prints both mean completion lengths: whether the two samplers differ.

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

from _common import cpu_flags_text, machine, write_results

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


def run_trl(args, model_dir: str, prompts: Path, out: Path, precision: str) -> dict:
    cmd = [sys.executable, str(ROOT / "bench" / "trl_grpo_step.py"), "--model", model_dir, "--prompts", str(prompts),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--prompts-per-step", str(args.prompts),
           "--group-size", str(args.group_size), "--max-new-tokens", str(args.max_new_tokens),
           "--temperature", str(args.temperature), "--beta", str(args.beta), "--learning-rate", str(args.learning_rate),
           "--seed", str(args.seed), "--out", str(out), "--bf16" if precision == "bf16" else "--no-bf16"]
    if args.ignore_eos:
        cmd.append("--ignore-eos")
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    res = json.loads(out.read_text())
    return {"step_seconds": res["step_seconds"], "rollout_seconds": res.get("rollout_seconds"),
            "completion_tokens": res.get("completion_tokens") or [], "tokens": res.get("tokens") or [],
            "warmup_completion_tokens": res.get("warmup_completion_tokens"), "version": res.get("trl_version")}


def run_aapo(args, algorithm: str, out_dir: Path, precision: str) -> dict:
    steps = args.steps + args.warmup
    cmd = [sys.executable, "-m", "aapo_app", "train", "--output-dir", str(out_dir), "--max-steps", str(steps),
           "--seed", str(args.seed), f"algorithm.name={algorithm}", f"rollout.group_size={args.group_size}",
           f"rollout.prompts_per_rank={args.prompts}", f"rollout.max_new_tokens={args.max_new_tokens}",
           f"rollout.temperature={args.temperature}", f"rollout.sampler={args.sampler}",
           f"train.learning_rate={args.learning_rate}", f"train.micro_batch_size={args.prompts * args.group_size}",
           "train.save_final=false", "train.log_samples_every=0", "data.eval_size=2", "train.eval_max_new_tokens=4",
           f"precision={precision}", f"rollout.ignore_eos={str(args.ignore_eos).lower()}"]
    if algorithm == "grpo":
        cmd.append(f"algorithm.beta={args.beta}")
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "step_seconds" in r]
    warm, rows = rows[:args.warmup], rows[args.warmup:]
    group = args.prompts * args.group_size
    return {"step_seconds": [r["step_seconds"] for r in rows], "rollout_seconds": [r["rollout_seconds"] for r in rows],
            "update_seconds": [r["update_seconds"] for r in rows],
            "completion_tokens": [round(r["completion_len/mean"] * group) for r in rows],
            # prompt + completion tokens of the policy's samples (the update's rows)
            "tokens": [round(r["update_tokens_per_s"] * r["update_seconds"]) for r in rows],
            "warmup_completion_tokens": [round(r["completion_len/mean"] * group) for r in warm]}


def length_check(model_dir: str, prompts_file: Path, n_prompts: int, group: int, max_new: int, temperature: float,
                 seeds: int = 3) -> dict:
    """Mean completion length (EOS included) of the same prompts sampled by ``generate`` with TRL's
    GenerationConfig and by aapo's loop, from the untrained model, fp32, ``seeds`` draws each."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    from aapo_app.generation import checkpoint_eos_ids, encode_prompts, finish_samples
    from aapo_app.models import load_tokenizer
    from aapo_app.sampler import decode

    tok = load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    eos = checkpoint_eos_ids(tok, model_dir)
    texts = [json.loads(line)["prompt"] for line in prompts_file.read_text().splitlines()[:n_prompts]]
    ids, mask = encode_prompts(tok, texts, add_special_tokens=False)
    # what GRPOTrainer 1.16 builds for generate (trl/trainer/grpo_trainer.py), no vLLM
    trl_config = GenerationConfig(max_new_tokens=max_new, do_sample=True, pad_token_id=tok.pad_token_id,
                                  bos_token_id=tok.bos_token_id, eos_token_id=eos, temperature=temperature, top_p=1.0,
                                  top_k=0, min_p=None, repetition_penalty=1.0, cache_implementation=None,
                                  disable_compile=True)
    rep_ids, rep_mask = ids.repeat_interleave(group, 0), mask.repeat_interleave(group, 0)
    lengths = {"TRL's generate settings": [], "aapo's loop": []}
    with torch.no_grad():
        for seed in range(seeds):
            torch.manual_seed(seed)
            out = model.generate(input_ids=rep_ids, attention_mask=rep_mask.long(), generation_config=trl_config)
            lengths["TRL's generate settings"] += finish_samples(tok, rep_ids, rep_mask, out[:, ids.shape[1]:], eos,
                                                                 max_new).lengths.tolist()
            out = decode(model, ids, mask, num_samples=group, max_new_tokens=max_new, temperature=temperature,
                         eos_ids=eos, pad_id=tok.pad_token_id, generator=torch.Generator().manual_seed(seed))
            lengths["aapo's loop"] += finish_samples(tok, rep_ids, rep_mask, out, eos, max_new).lengths.tolist()
    return {name: {"mean": statistics.fmean(v), "se": statistics.stdev(v) / len(v) ** 0.5, "n": len(v)}
            for name, v in lengths.items()}


def summary(res: dict) -> dict:
    res["mean_step_seconds"] = statistics.fmean(res["step_seconds"])
    res["median_step_seconds"] = statistics.median(res["step_seconds"])
    if res.get("rollout_seconds"):
        res["mean_rollout_seconds"] = statistics.fmean(res["rollout_seconds"])
    # completions are sampled, so their lengths differ between runs: also per completion token
    res["completion_tokens_per_step"] = statistics.fmean(res["completion_tokens"]) if res["completion_tokens"] else None
    res["seconds_per_1k_tokens"] = (1000 * sum(res["step_seconds"]) / sum(res["completion_tokens"])
                                    if res["completion_tokens"] else None)
    res["tokens_per_step"] = statistics.fmean(res["tokens"]) if res.get("tokens") else None
    res["seconds_per_1k_all_tokens"] = (1000 * sum(res["step_seconds"]) / sum(res["tokens"])
                                        if res.get("tokens") else None)
    return res


def markdown(res: dict) -> str:
    s = res["settings"]
    work = ("fixed-length completions (EOS never drawn on either side: identical work)" if s["ignore_eos"]
            else "completions stop at EOS (the work differs with the sampled lengths)")
    lines = [f"Machine: {res['machine']} ({res['flags']}); TRL {res['trl_version']}; {s['prompts']} prompts x "
             f"G={s['group_size']} per step, {s['max_new_tokens']} new tokens, {work}; temperature {s['temperature']}, "
             f"beta {s['beta']}, {s['steps']} measured steps after {s['warmup']} warm-up.", ""]
    for precision, runs in res["precisions"].items():
        trl = runs["TRL GRPOTrainer"]
        lines += [f"**{precision}** (TRL: {'bf16 autocast over fp32 weights' if precision == 'bf16' else 'fp32'}; "
                  f"aapo: precision={precision})", "",
                  "| trainer | s/step (mean) | s/step (median) | rollout s | vs TRL | completion tokens/step "
                  "| prompt + completion tokens/step | s per 1k tokens | vs TRL |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name, r in runs.items():
            rollout = f"{r['mean_rollout_seconds']:.1f}" if r.get("mean_rollout_seconds") is not None else "–"
            per_k = r.get("seconds_per_1k_all_tokens")
            trl_k = trl.get("seconds_per_1k_all_tokens")
            lines.append(f"| {name} | {r['mean_step_seconds']:.2f} | {r['median_step_seconds']:.2f} | {rollout} | "
                         f"{r['mean_step_seconds'] / trl['mean_step_seconds']:.2f}x | {r['completion_tokens_per_step']:.0f} "
                         f"| {r['tokens_per_step'] or 0:.0f} | {per_k or 0:.1f} | "
                         f"{(per_k / trl_k) if per_k and trl_k else 0:.2f}x |")
        lines.append("")
    if res.get("length_check"):
        lines.append("Length check (the same 8 prompts x G from the untrained model, fp32, stopping at EOS): " + "; ".join(
            f"{name}: {v['mean']:.1f} ± {v['se']:.1f} tokens (n={v['n']})" for name, v in res["length_check"].items()))
        lines.append("")
    warm = {f"{name} ({p})": r.get("warmup_completion_tokens") for p, runs in res["precisions"].items()
            for name, r in runs.items()}
    lines.append("Completion tokens of the warm-up step(s), not counted: " +
                 "; ".join(f"{k}: {v}" for k, v in warm.items()) + ".")
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
    p.add_argument("--eos", dest="ignore_eos", action="store_false",
                   help="stop completions at EOS (default: fixed-length completions on both sides, identical work)")
    p.add_argument("--length-check", action="store_true",
                   help="first compare the completion lengths of TRL's generate settings and aapo's loop")
    p.add_argument("--precisions", default="auto",
                   help="fp32, bf16 or fp32,bf16 (auto: fp32, plus bf16 where the machine has bf16 matrix units)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "vs_trl"))
    args = p.parse_args()

    from aapo_app.models import resolve_model_path
    import torch

    version = ensure_trl()
    model_dir = resolve_model_path(args.model)
    from aapo_app.precision import bf16_hardware

    precisions = (["fp32", "bf16"] if bf16_hardware() else ["fp32"]) if args.precisions == "auto" \
        else args.precisions.split(",")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        prompts = tmp / "prompts.jsonl"
        write_prompts(prompts, model_dir, args.prompts * (args.steps + args.warmup) * 4, args.seed)
        lengths = None
        if args.length_check:
            lengths = length_check(model_dir, prompts, 8, args.group_size, args.max_new_tokens, args.temperature)
            print(json.dumps(lengths), flush=True)
        for precision in precisions:
            runs = results[precision] = {}
            runs["TRL GRPOTrainer"] = summary(run_trl(args, model_dir, prompts, tmp / f"trl-{precision}.json",
                                                      precision))
            runs["aapo train, grpo"] = summary(run_aapo(args, "grpo", tmp / f"aapo-grpo-{precision}", precision))
            if not args.skip_aapo_algorithm:
                runs["aapo train, aapo"] = summary(run_aapo(args, "aapo", tmp / f"aapo-aapo-{precision}", precision))
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    settings = {k: v for k, v in vars(args).items() if k != "out"}  # no machine paths in the results
    res = {"machine": machine(device), "flags": cpu_flags_text() if device.type == "cpu" else "",
           "trl_version": version, "settings": settings, "precisions": results, "length_check": lengths}
    write_results(args.out, res, markdown(res))


if __name__ == "__main__":
    main()
