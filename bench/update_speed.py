"""Update throughput under ZeRO-3: fp32 against bf16 mixed precision, same batch, same steps.

One fixed rollout batch (``--prompts`` x ``--group-size`` completions of the embedded default's
prompts, sampled once with the policy, with fixed group-normalised advantages) is trained on for
``--steps`` GPG updates (forward, backward, optimizer step through the DeepSpeed ZeRO-3 engine,
exactly ``aapo_app.update.update``), once with ``ds_configs/zero3_cpu.json`` (fp32) and once with
the same config plus ``bf16.enabled`` (on a GPU: ``zero3_bf16.json``). It prints trained tokens/s
(prompt + completion tokens through forward and backward) for each, their ratio, and the two loss
curves side by side.

bf16 only pays off where the matrix units support it (AMX / AVX512-BF16 CPUs, GPUs). The script
measures the peak bf16 and fp32 matmul rates first; where bf16 is slower it times only
``--bf16-probe-steps`` bf16 steps, enough to give the ratio, and says so.

    python bench/update_speed.py                     # writes bench/results/update_speed.{json,md}
    python bench/update_speed.py --steps 20 --max-new-tokens 64
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _common import machine, peak_matmul_gflops, write_results  # noqa: E402

from aapo_app.ds_config import PERSIST_ALL  # noqa: E402



def build(args, bf16: bool, persist: bool = False):
    from aapo_app.config import load_run_config
    from aapo_app.ds_config import fill_ds_config, read_ds_config
    from aapo_app.engine import ZeroModel, init_distributed
    from aapo_app.models import load_causal_lm, resolve_model_path

    init_distributed()
    cfg = load_run_config(None, [f"rollout.prompts_per_rank={args.prompts}", f"rollout.group_size={args.group_size}",
                                 f"train.micro_batch_size={args.micro_batch_size}",
                                 f"rollout.max_new_tokens={args.max_new_tokens}", "algorithm.name=gpg"])
    name = ("zero3_bf16.json" if torch.cuda.is_available() else "zero3_cpu.json")
    ds = read_ds_config(None, name)
    ds["bf16"] = {"enabled": bf16}
    # persistent (one rank): every parameter stays gathered, ZeRO-3's hooks fetch and release nothing per
    # forward (what "auto" fills on one rank); else each forward gathers and releases every module
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = PERSIST_ALL if persist else 0
    ds = fill_ds_config(ds, cfg, 1)
    path = resolve_model_path(cfg.model.path)
    policy = ZeroModel(load_causal_lm(path, ds_config=ds), ds, trainable=True, learning_rate=args.learning_rate)
    return cfg, path, policy


def fixed_batch(args, cfg, path, policy):
    """One rollout of the policy (seeded) and group-normalised random advantages (seeded)."""
    from aapo_app.batches import RolloutBatch, ScoredBatch
    from aapo_app.data import load_examples, render_prompt
    from aapo_app.models import load_tokenizer
    from aapo_app.generation import DeepSpeedGenerator, Sampling, encode_prompts, eos_token_ids

    tok = load_tokenizer(path)
    train, _ = load_examples(cfg.data, 0)
    examples = train[:args.prompts]
    ids, mask = encode_prompts(tok, [render_prompt(tok, ex.problem, cfg.data) for ex in examples], False)
    generator = DeepSpeedGenerator(policy, tok, eos_token_ids(tok, policy.module))
    samples = generator.sample(ids, mask, num_samples=args.group_size, sampling=Sampling(args.max_new_tokens, 0.7),
                               seed=0)
    g = torch.Generator().manual_seed(0)
    adv = torch.randn(args.prompts, args.group_size, generator=g)
    adv = (adv - adv.mean(1, keepdim=True)) / adv.std(1, keepdim=True)
    rollout = RolloutBatch(examples=examples, group_size=args.group_size, policy=samples, reference=None,
                           ref_logprobs=None, seconds=0.0)
    return ScoredBatch(rollout=rollout, rewards=torch.zeros_like(adv), advantages=adv, reward_parts={},
                       ref_rewards=None, advantage_parts={})


def run_one(args, bf16: bool, steps: int, batch=None, persist: bool = False) -> tuple[dict, object]:
    """``steps`` updates on ``batch`` (sampled by this run's policy when None); returns the figures
    and the batch, so that the other precision trains on the same completions."""
    from aapo_app.algorithms import build_algorithm
    from aapo_app.update import update

    cfg, path, policy = build(args, bf16, persist)
    n_params = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in policy.module.parameters())
    torch.manual_seed(0)
    batch = batch if batch is not None else fixed_batch(args, cfg, path, policy)
    # GPG's loss, -A * log pi (no ratio to pi_old), moves as the policy trains on the fixed batch;
    # a clipped-ratio loss is exactly -mean(A) = 0 at every on-policy step
    algorithm = build_algorithm(cfg.algorithm.name, cfg.algorithm.params)
    tokens = int(batch.rollout.policy.attention_mask.sum())
    losses, seconds = [], []
    for step in range(steps):
        start = time.perf_counter()
        out = update(policy, batch, algorithm, micro_batch_size=args.micro_batch_size, temperature=0.7,
                     max_new_tokens=args.max_new_tokens)
        seconds.append(time.perf_counter() - start)
        losses.append(out["loss"])
        print(f"  {'bf16' if bf16 else 'fp32'} step {step + 1}/{steps}: {seconds[-1]:.2f} s, loss {losses[-1]:+.5f}",
              flush=True)
    timed = seconds[1:] or seconds  # the first step includes one-off allocations
    return {"losses": losses, "seconds": seconds, "tokens_per_step": tokens, "parameters": n_params,
            "tokens_per_s": tokens / statistics.fmean(timed)}, batch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--bf16-probe-steps", type=int, default=2)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--learning-rate", type=float, default=5e-6)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "update_speed"))
    args = p.parse_args()

    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    peaks = {"fp32": peak_matmul_gflops(torch.float32, device), "bf16": peak_matmul_gflops(torch.bfloat16, device)}
    bf16_pays = peaks["bf16"] > 1.2 * peaks["fp32"]
    runs = {}
    runs["fp32"], batch = run_one(args, False, args.steps)
    bf16_steps = args.steps if bf16_pays else max(1, args.bf16_probe_steps)
    runs["bf16"], _ = run_one(args, True, bf16_steps, batch)
    best = "bf16" if bf16_pays else "fp32"
    runs[f"{best}, parameters persistent"], _ = run_one(args, bf16_pays, args.steps, batch, persist=True)
    n = min(len(runs["fp32"]["losses"]), len(runs["bf16"]["losses"]))
    diffs = [abs(a - b) for a, b in zip(runs["fp32"]["losses"][:n], runs["bf16"]["losses"][:n])]
    res = {"machine": machine(device), "torch": torch.__version__, "peak_gflops": peaks, "bf16_pays": bf16_pays,
           "settings": {k: v for k, v in vars(args).items() if k != "out"}, "runs": runs,
           "bf16_vs_fp32": runs["bf16"]["tokens_per_s"] / runs["fp32"]["tokens_per_s"],
           "max_abs_loss_diff": max(diffs), "loss_std_fp32": statistics.pstdev(runs["fp32"]["losses"])}
    lines = [f"Machine: {res['machine']}; peak matmul fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.0f} GFLOP/s.",
             f"{runs['fp32']['tokens_per_step']} trained tokens per step ({args.prompts} prompts x G={args.group_size}, "
             f"micro-batch {args.micro_batch_size}), ZeRO-3, 1 rank.", "",
             "| precision | steps | trained tokens/s | vs fp32 | of the precision's peak matmul rate |",
             "|---|---:|---:|---:|---:|"]
    for name, r in runs.items():
        peak = peaks["bf16" if name.startswith("bf16") else "fp32"]
        r["peak_fraction"] = r["tokens_per_s"] * 6 * r["parameters"] / (peak * 1e9)
        lines.append(f"| {name} | {len(r['seconds'])} | {r['tokens_per_s']:.0f} | "
                     f"{r['tokens_per_s'] / runs['fp32']['tokens_per_s']:.2f}x | {100 * r['peak_fraction']:.0f}% |")
    lines += ["", f"Peak fraction: trained tokens/s x 6 x {runs['fp32']['parameters'] / 1e6:.0f}M parameters "
                  f"(forward 2, backward 4 FLOPs per parameter and token) / the peak matmul rate of the precision. "
                  f"'parameters persistent': stage3_param_persistence_threshold above every parameter, so on one "
                  f"rank ZeRO-3 gathers nothing per forward.",
              "", f"Loss curves over the first {n} steps: max |fp32 - bf16| = {res['max_abs_loss_diff']:.2e} "
                  f"(fp32 loss spread over its {args.steps} steps: std {res['loss_std_fp32']:.2e})."]
    if not bf16_pays:
        lines.append(f"bf16 matrix products are slower than fp32 on this device ({peaks['bf16']:.0f} vs "
                     f"{peaks['fp32']:.0f} GFLOP/s): only {len(runs['bf16']['seconds'])} bf16 steps were timed.")
    text = "\n".join(lines)
    write_results(args.out, res, text)


if __name__ == "__main__":
    main()
