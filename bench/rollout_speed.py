"""Rollout throughput: aapo's decoding loop against plain Hugging Face ``generate``, same work.

Same model (the embedded SmolLM2-135M-Instruct by default), the same prompts (the embedded
default's training prompts, chat-templated), the same batch (``--prompts`` x ``--group-size``
sequences), lengths and sampling settings (temperature 0.7, no top-k/top-p, as ``aapo train``). Each
method runs ``--rounds`` times, interleaved with the others so that machine noise hits all of them
alike, with the same seeds. Two workloads:

* ``fixed``: exactly ``--max-new-tokens`` tokens per sequence (EOS ignored): per-token speed;
* ``eos``: sampling stops at EOS, as in training; tokens/s counts real tokens (EOS included).

It also checks that nothing changed what is sampled: greedy tokens must be identical, and the mean
completion length and mean per-token log-probability of the sampled completions (scored by one
forward pass) are printed with their standard errors. The roofline is the measured peak matmul
rate of this machine divided by the matmul FLOPs of one token (2 x the weights of every linear
layer, lm_head included).

    python bench/rollout_speed.py                      # writes bench/results/rollout_speed.{json,md}
    python bench/rollout_speed.py --rounds 5 --max-new-tokens 128

Runs unchanged on a GPU (the model goes to cuda:0); where bf16 matrix products are faster than
fp32 on the device it also times aapo's loop with bf16 weights.
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

from _common import machine, peak_matmul_gflops, sync, write_results  # noqa: E402

from aapo_app.data import DataConfig, load_examples, render_prompt  # noqa: E402
from aapo_app.engine import completion_logprobs  # noqa: E402
from aapo_app.models import load_tokenizer, resolve_model_path  # noqa: E402
from aapo_app.generation import encode_prompts, eos_token_ids, finish_samples, generation_kwargs  # noqa: E402
from aapo_app.sampler import decode  # noqa: E402


def linear_flops_per_token(model) -> int:
    return 2 * sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def hf_generate(model, tok, ids, mask, *, group, max_new, temperature, eos_ids, seed, device):
    """The baseline: ``generate`` on the prompt batch repeated G times (what ``rollout.sampler=hf`` does)."""
    kwargs = generation_kwargs(tok, max_new_tokens=max_new, temperature=temperature, top_p=1.0, top_k=0,
                               eos_ids=eos_ids)
    torch.manual_seed(seed)
    rep_ids, rep_mask = ids.repeat_interleave(group, 0), mask.repeat_interleave(group, 0)
    out = model.generate(input_ids=rep_ids.to(device), attention_mask=rep_mask.long().to(device), **kwargs)
    return out[:, ids.shape[1]:].cpu()


def aapo_decode(model, tok, ids, mask, *, group, max_new, temperature, eos_ids, seed, device, **options):
    generator = torch.Generator(device=device).manual_seed(seed)
    return decode(model, ids, mask, num_samples=group, max_new_tokens=max_new, temperature=temperature,
                  eos_ids=eos_ids, pad_id=tok.pad_token_id, generator=generator, **options)


def run(args) -> dict:
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(args.model)
    tok = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
    eos_ids = eos_token_ids(tok, model)
    data_cfg = DataConfig()
    examples, _ = load_examples(data_cfg, seed=0)
    prompts = [render_prompt(tok, ex.problem, data_cfg) for ex in examples[:args.prompts]]
    ids, mask = encode_prompts(tok, prompts, add_special_tokens=False)

    peaks = {"fp32": peak_matmul_gflops(torch.float32, device), "bf16": peak_matmul_gflops(torch.bfloat16, device)}
    flops = linear_flops_per_token(model)
    methods = {
        "hf generate (fp32)": lambda **kw: hf_generate(model, tok, ids, mask, **kw),
        "aapo decode (fp32), x@Wt": lambda **kw: aapo_decode(model, tok, ids, mask, small_batch_matmul=False, **kw),
        "aapo decode (fp32)": lambda **kw: aapo_decode(model, tok, ids, mask, **kw),
    }
    if peaks["bf16"] > 1.2 * peaks["fp32"]:  # bf16 pays off on this device (AMX/AVX512-BF16 CPU, or a GPU)
        model_bf16 = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(device).eval()
        methods["aapo decode (bf16)"] = lambda **kw: aapo_decode(model_bf16, tok, ids, mask, **kw)

    common = dict(group=args.group_size, max_new=args.max_new_tokens, temperature=args.temperature, device=device)
    results: dict = {"workloads": {}}
    with torch.no_grad():
        # greedy: the same tokens
        greedy = {name: fn(**{**common, "group": 1, "temperature": None}, eos_ids=eos_ids, seed=0)
                  for name, fn in methods.items() if "bf16" not in name}
        reference = next(iter(greedy.values()))
        results["greedy_identical"] = {name: _same_tokens(reference, out, tok.pad_token_id, eos_ids)
                                       for name, out in greedy.items()}
        for workload in ("fixed", "eos"):
            stop_ids = [-1] if workload == "fixed" else eos_ids  # -1: no token ends a sequence
            seconds = {name: [] for name in methods}
            samples = {name: [] for name in methods}
            for r in range(args.rounds):
                for name, fn in methods.items():  # interleaved, same seed per round
                    sync(device)
                    start = time.perf_counter()
                    out = fn(**common, eos_ids=stop_ids, seed=1000 + r)
                    sync(device)
                    seconds[name].append(time.perf_counter() - start)
                    samples[name].append(finish_samples(tok, ids.repeat_interleave(args.group_size, 0),
                                                        mask.repeat_interleave(args.group_size, 0), out, stop_ids,
                                                        args.max_new_tokens))
                    print(f"  {workload} round {r + 1}/{args.rounds} {name}: {seconds[name][-1]:.2f} s", flush=True)
            rows = {}
            for name in methods:
                tokens = sum(int(s.lengths.sum()) for s in samples[name])
                lengths = [float(x) for s in samples[name] for x in s.lengths]
                logps = [_mean_logprob(model, s, args.temperature, device) for s in samples[name]] \
                    if workload == "eos" else []
                rows[name] = {
                    "seconds": seconds[name], "tokens": tokens, "tokens_per_s": tokens / sum(seconds[name]),
                    "mean_length": statistics.fmean(lengths), "length_se": statistics.stdev(lengths) / len(lengths) ** 0.5,
                    "mean_logprob": statistics.fmean([x for lp in logps for x in lp]) if logps else None,
                    "logprob_se": (statistics.stdev([x for lp in logps for x in lp]) / sum(len(lp) for lp in logps) ** 0.5
                                   if logps else None),
                }
            base = rows["hf generate (fp32)"]["tokens_per_s"]
            for name, row in rows.items():
                row["speedup"] = row["tokens_per_s"] / base
                peak = peaks["bf16"] if "bf16" in name else peaks["fp32"]
                row["roofline_fraction"] = row["tokens_per_s"] / (peak * 1e9 / flops)
            results["workloads"][workload] = rows
    results.update(
        machine=machine(device), model=args.model, prompts=args.prompts, group_size=args.group_size,
        batch=args.prompts * args.group_size, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        rounds=args.rounds, peak_gflops=peaks, linear_flops_per_token=flops,
        roofline_tokens_per_s={k: v * 1e9 / flops for k, v in peaks.items()},
        torch=torch.__version__, threads=torch.get_num_threads(),
    )
    return results


def _same_tokens(a, b, pad, eos_ids) -> bool:
    """Same tokens up to and including each row's first EOS."""
    width = min(a.shape[1], b.shape[1])
    for ra, rb in zip(a, b):
        for t in range(width):
            if ra[t] != rb[t]:
                return False
            if int(ra[t]) in eos_ids:
                break
        else:
            if a.shape[1] != b.shape[1] and not (ra[width:] == pad).all() and not (rb[width:] == pad).all():
                return False
    return True


def _mean_logprob(model, samples, temperature, device) -> list[float]:
    """Per-token log-probs (at the sampling temperature) of every sampled completion token."""
    logp = completion_logprobs(model, samples.sequences.to(device), samples.attention_mask.to(device),
                               samples.prompt_width, temperature).float().cpu()
    return logp[samples.completion_mask].tolist()


def markdown(res: dict) -> str:
    lines = [f"Machine: {res['machine']}; torch {res['torch']}; peak matmul fp32 {res['peak_gflops']['fp32']:.0f} "
             f"GFLOP/s, bf16 {res['peak_gflops']['bf16']:.0f} GFLOP/s; {res['linear_flops_per_token'] / 1e6:.0f} MFLOP "
             f"per token -> roofline {res['roofline_tokens_per_s']['fp32']:.0f} tokens/s (fp32).",
             f"Batch {res['batch']} = {res['prompts']} prompts x G={res['group_size']}, {res['max_new_tokens']} new "
             f"tokens, temperature {res['temperature']}, {res['rounds']} interleaved rounds.", ""]
    for workload, rows in res["workloads"].items():
        title = "exactly max_new_tokens per sequence" if workload == "fixed" else "stop at EOS (as in training)"
        lines += [f"**{workload}**: {title}", "",
                  "| method | tokens/s | vs HF generate | of roofline | mean length | mean log-prob |",
                  "|---|---:|---:|---:|---:|---:|"]
        for name, r in rows.items():
            logp = f"{r['mean_logprob']:.3f} ± {r['logprob_se']:.3f}" if r["mean_logprob"] is not None else "–"
            lines.append(f"| {name} | {r['tokens_per_s']:.0f} | {r['speedup']:.2f}x | {100 * r['roofline_fraction']:.0f}% "
                         f"| {r['mean_length']:.1f} ± {r['length_se']:.1f} | {logp} |")
        lines.append("")
    same = ", ".join(f"{k}: {'same' if v else 'DIFFERENT'}" for k, v in res["greedy_identical"].items())
    lines.append(f"Greedy tokens: {same}.")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="embedded:smollm2-135m-instruct")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "rollout_speed"))
    args = p.parse_args()
    res = run(args)
    write_results(args.out, res, markdown(res))


if __name__ == "__main__":
    main()
