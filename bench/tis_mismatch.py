"""Truncated importance sampling on the CPU, for real: sample with aapo's sampler from a bf16 copy of
the policy (an off-trainer sampler, as vLLM in bf16 is), score the same completions with the fp32
trainer, and print the mismatch (what the run logs as tis/*) and the check that the corrected
gradient is the importance-weighted policy gradient written out in plain torch.

    python bench/tis_mismatch.py [--model PATH] [--prompts 8] [--group 4] [--max-new-tokens 48]

On a CPU without bf16 matrix units the bf16 sampler is slow but the numbers mean the same.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import machine  # noqa: E402


def cpu_flags() -> str:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return "flags unknown"
    have = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f" {f}" in flags]
    return "CPU flags: " + (", ".join(have) or "none of avx2/avx512/bf16")


def main() -> None:
    from transformers import AutoModelForCausalLM

    from aapo_app.algorithms.base import tis_weights, weighted_token_sum
    from aapo_app.config import load_run_config
    from aapo_app.data import PromptStyle, load_examples
    from aapo_app.engine import completion_logprobs
    from aapo_app.generation import encode_prompts
    from aapo_app.models import load_tokenizer, resolve_model_path
    from aapo_app.sampler import decode

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded:smollm2-135m-instruct")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--cap", type=float, default=2.0)
    args = ap.parse_args()
    print(f"{machine(torch.device('cpu'))}; {cpu_flags()}; torch {torch.__version__}")
    path = resolve_model_path(args.model)
    tok = load_tokenizer(path)
    cfg = load_run_config(None, [])
    examples, _ = load_examples(cfg.data, 0)
    style = PromptStyle(tok, cfg.data)
    ids, mask = encode_prompts(tok, [style.render(e.problem) for e in examples[:args.prompts]],
                               style.add_special_tokens)
    trainer = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    sampler = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    eos = [tok.eos_token_id]
    t0 = time.perf_counter()
    with torch.no_grad():
        tokens, sampler_lp = decode(sampler, ids, mask, num_samples=args.group, max_new_tokens=args.max_new_tokens,
                                    temperature=args.temperature, top_p=args.top_p, eos_ids=eos,
                                    pad_id=tok.pad_token_id, generator=torch.Generator().manual_seed(0), logprobs=True)
    sample_s = time.perf_counter() - t0
    is_eos = torch.isin(tokens, torch.tensor(eos))
    ends = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, torch.full((tokens.shape[0],), tokens.shape[1]))
    cmask = torch.arange(tokens.shape[1])[None] < ends[:, None]
    seq = torch.cat([ids.repeat_interleave(args.group, 0), tokens], 1)
    attn = torch.cat([mask.repeat_interleave(args.group, 0), cmask], 1)
    P = ids.shape[1]
    logp = completion_logprobs(trainer, seq, attn, P, args.temperature)  # fp32, with gradients
    adv = torch.randn(seq.shape[0], generator=torch.Generator().manual_seed(1))
    weights = (1.0 / cmask.sum(1).clamp(min=1)).double() / seq.shape[0]  # seq_mean
    print(f"{seq.shape[0]} completions of {int(cmask.sum())} tokens, sampled in bf16 in {sample_s:.1f} s, "
          f"scored by the fp32 trainer; temperature {args.temperature}, top-p {args.top_p}, C = {args.cap}")
    print("| level | mode | ratio mean | ratio min | ratio max | cut frac | mean abs(log-prob diff) | corrected grad vs "
          "formula (rel. diff) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for level, mode in (("none", "-"), ("token", "truncate"), ("token", "mask"), ("sequence", "truncate"),
                        ("sequence", "mask")):
        if level == "none":  # no correction: how far the batched, padded pass is from the formula by itself
            factors = cmask.float()
            st = {"ratio_sum": float("nan"), "units": 1.0, "ratio_min": float("nan"), "ratio_max": float("nan"),
                  "cut": float("nan"), "abs_diff_sum": float("nan"), "tokens": 1.0}
        else:
            factors, st = tis_weights(logp, sampler_lp, cmask, level, args.cap, mode)
        trainer.zero_grad()
        loss = weighted_token_sum(-logp * adv[:, None], cmask, weights[:, None].float() * factors)
        loss.backward(retain_graph=True)
        got = {n: p.grad.clone() for n, p in trainer.named_parameters() if p.grad is not None}
        # the formula: full logits, unpadded sequences, ρ from the definition
        trainer.zero_grad()
        total = 0.0
        for i in range(seq.shape[0]):
            n = int(cmask[i].sum())
            row = seq[i][attn[i]]
            logits = trainer(input_ids=row[None]).logits[0, -n - 1:-1].float() / args.temperature
            lp = torch.log_softmax(logits, -1).gather(-1, row[-n:, None]).squeeze(-1)
            d = (lp.detach() - sampler_lp[i, :n]).double()
            rho = torch.exp(d) if level != "sequence" else torch.exp(d.sum()).expand(n)
            f = rho.clamp(max=args.cap) if mode == "truncate" else torch.where(
                (rho > args.cap) | (rho < 1 / args.cap), torch.zeros_like(rho), rho)
            if level == "none":
                f = torch.ones_like(rho)
            total = total + (float(weights[i]) * f.float() * -lp * float(adv[i])).sum()
        total.backward()
        want = {n: p.grad for n, p in trainer.named_parameters() if p.grad is not None}
        num = math.sqrt(sum(float(((got[k] - want[k]) ** 2).sum()) for k in want))
        den = math.sqrt(sum(float((want[k] ** 2).sum()) for k in want))
        print(f"| {level} | {mode} | {st['ratio_sum'] / st['units']:.4f} | {st['ratio_min']:.4f} | "
              f"{st['ratio_max']:.4f} | {st['cut'] / st['units']:.4f} | {st['abs_diff_sum'] / st['tokens']:.5f} | "
              f"{num / den:.1e} |")


if __name__ == "__main__":
    main()
