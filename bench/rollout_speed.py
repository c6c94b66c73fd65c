"""Rollout throughput: aapo's decoding loop against plain Hugging Face ``generate``, same work.

Same model (the embedded SmolLM2-135M-Instruct by default), the same prompts (the embedded
default's training prompts, chat-templated), the same batches (``--batches``: 4 prompts x G=4, and
the embedded default's 2 x 4), lengths and sampling settings (temperature 0.7, no top-k/top-p, as ``aapo train``). Each
method runs ``--rounds`` times, interleaved with the others so that machine noise hits all of them
alike, with the same seeds. Two workloads:

* ``fixed``: exactly ``--max-new-tokens`` tokens per sequence (EOS ignored): per-token speed;
* ``eos``: sampling stops at EOS, as in training; tokens/s counts real tokens (EOS included).

It also checks that nothing changed what is sampled: greedy tokens must be identical to
``generate``'s in the same precision, and the mean completion length and mean per-token
log-probability of the sampled completions (scored by one fp32 forward pass) are printed with their
standard errors. The roofline of a precision at a batch is the lower of two bounds, both measured
here: compute (the peak matmul rate divided by the matmul FLOPs of one token, 2 x the weights of
every linear layer, lm_head included) and bandwidth (every weight read once per decoding step at the
measured memory read rate, the step serving the batch's rows).

    python bench/rollout_speed.py                      # writes bench/results/rollout_speed.{json,md}
    python bench/rollout_speed.py --rounds 5 --max-new-tokens 128

Runs unchanged on a GPU (the model goes to cuda:0); where bf16 matrix products are faster than
fp32 on the device (or with ``--bf16``) it also times both in bf16.
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

from _common import cpu_flags_text, machine, peak_matmul_gflops, read_gbps, sync, write_results  # noqa: E402

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


def weight_bytes(model) -> int:
    """Bytes of every weight one decoding step reads (each parameter once)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


PLAIN = dict(fuse_projections=False, fast_attention=False)  # the loop before the stacked products and attention


def run(args) -> dict:
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(args.model)
    tok = load_tokenizer(path)
    models = {"fp32": AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()}
    eos_ids = eos_token_ids(tok, models["fp32"])
    data_cfg = DataConfig()
    examples, _ = load_examples(data_cfg, seed=0)

    peaks = {"fp32": peak_matmul_gflops(torch.float32, device), "bf16": peak_matmul_gflops(torch.bfloat16, device)}
    read = read_gbps(device)
    flops = linear_flops_per_token(models["fp32"])
    precisions = ["fp32"]
    if peaks["bf16"] > 1.2 * peaks["fp32"] or args.bf16:  # bf16 pays off here (AMX/AVX512-BF16 CPU, or a GPU)
        models["bf16"] = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(device).eval()
        precisions.append("bf16")
    results: dict = {"batches": {}}
    for batch_spec in args.batches.split(","):
        n_prompts, group = (int(x) for x in batch_spec.lower().split("x"))
        prompts = [render_prompt(tok, ex.problem, data_cfg) for ex in examples[:n_prompts]]
        ids, mask = encode_prompts(tok, prompts, add_special_tokens=False)
        methods, same_as = {}, {}
        for prec in precisions:
            m = models[prec]
            methods[f"hf generate ({prec})"] = (prec, lambda m=m, **kw: hf_generate(m, tok, ids, mask, **kw))
            methods[f"aapo decode ({prec}), before"] = (
                prec, lambda m=m, **kw: aapo_decode(m, tok, ids, mask, **PLAIN, **kw))
            methods[f"aapo decode ({prec})"] = (prec, lambda m=m, **kw: aapo_decode(m, tok, ids, mask, **kw))
            same_as.update({name: f"hf generate ({prec})" for name in methods if prec in name and "aapo" in name})
        common = dict(group=group, max_new=args.max_new_tokens, temperature=args.temperature, device=device)
        res = {"workloads": {}}
        with torch.no_grad():
            # greedy: the same tokens as generate in the same precision
            greedy = {name: fn(**{**common, "group": 1, "temperature": None}, eos_ids=eos_ids, seed=0)
                      for name, (_, fn) in methods.items()}
            res["greedy_identical"] = {name: _same_tokens(greedy[ref], greedy[name], tok.pad_token_id, eos_ids)
                                       for name, ref in same_as.items()}
            for workload in ("fixed", "eos"):
                stop_ids = [-1] if workload == "fixed" else eos_ids  # -1: no token ends a sequence
                seconds = {name: [] for name in methods}
                samples = {name: [] for name in methods}
                for r in range(args.rounds):
                    for name, (_, fn) in methods.items():  # interleaved, same seed per round
                        sync(device)
                        start = time.perf_counter()
                        out = fn(**common, eos_ids=stop_ids, seed=1000 + r)
                        sync(device)
                        seconds[name].append(time.perf_counter() - start)
                        samples[name].append(finish_samples(tok, ids.repeat_interleave(group, 0),
                                                            mask.repeat_interleave(group, 0), out, stop_ids,
                                                            args.max_new_tokens))
                        print(f"  {batch_spec} {workload} round {r + 1}/{args.rounds} {name}: "
                              f"{seconds[name][-1]:.2f} s", flush=True)
                rows = {}
                for name, (prec, _) in methods.items():
                    tokens = sum(int(s.lengths.sum()) for s in samples[name])
                    lengths = [float(x) for s in samples[name] for x in s.lengths]
                    logps = [_mean_logprob(models["fp32"], s, args.temperature, device) for s in samples[name]] \
                        if workload == "eos" else []
                    # the roofline of this precision at this batch: the lower of the compute bound and the
                    # bandwidth bound (every weight read once per step, the step serving `batch` rows)
                    compute = peaks[prec] * 1e9 / flops
                    bandwidth = n_prompts * group * read * 1e9 / weight_bytes(models[prec])
                    rows[name] = {
                        "precision": prec, "seconds": seconds[name], "tokens": tokens,
                        "tokens_per_s": tokens / sum(seconds[name]),
                        "mean_length": statistics.fmean(lengths),
                        "length_se": statistics.stdev(lengths) / len(lengths) ** 0.5,
                        "mean_logprob": statistics.fmean([x for lp in logps for x in lp]) if logps else None,
                        "logprob_se": (statistics.stdev([x for lp in logps for x in lp])
                                       / sum(len(lp) for lp in logps) ** 0.5 if logps else None),
                        "roofline_tokens_per_s": min(compute, bandwidth),
                        "roofline_bound": "compute" if compute <= bandwidth else "bandwidth",
                    }
                base = rows["hf generate (fp32)"]["tokens_per_s"]
                for row in rows.values():
                    row["speedup"] = row["tokens_per_s"] / base
                    row["roofline_fraction"] = row["tokens_per_s"] / row["roofline_tokens_per_s"]
                res["workloads"][workload] = rows
        res.update(prompts=n_prompts, group_size=group, batch=n_prompts * group)
        results["batches"][batch_spec] = res
    results.update(
        machine=machine(device), flags=cpu_flags_text() if device.type == "cpu" else "", model=args.model,
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, rounds=args.rounds, peak_gflops=peaks,
        read_gbps=read, linear_flops_per_token=flops,
        weight_bytes={prec: weight_bytes(m) for prec, m in models.items()},
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
    wb = ", ".join(f"{p} {b / 1e6:.0f} MB" for p, b in res["weight_bytes"].items())
    lines = [f"Machine: {res['machine']} ({res['flags']}); torch {res['torch']}; peak matmul fp32 "
             f"{res['peak_gflops']['fp32']:.0f} GFLOP/s, bf16 {res['peak_gflops']['bf16']:.0f} GFLOP/s; memory reads "
             f"{res['read_gbps']:.1f} GB/s; {res['linear_flops_per_token'] / 1e6:.0f} MFLOP per token; weights {wb}.",
             f"{res['max_new_tokens']} new tokens, temperature {res['temperature']}, {res['rounds']} interleaved rounds. "
             f"Roofline per precision and batch: the lower of the compute bound (peak matmul / FLOP per token) and the "
             f"bandwidth bound (batch x read rate / weight bytes: every weight read once per decoding step).", ""]
    for spec, b in res["batches"].items():
        for workload, rows in b["workloads"].items():
            title = "exactly max_new_tokens per sequence" if workload == "fixed" else "stop at EOS (as in training)"
            lines += [f"**batch {b['batch']} ({b['prompts']} prompts x G={b['group_size']}), {workload}**: {title}", "",
                      "| method | tokens/s | vs HF generate (fp32) | roofline tokens/s (bound) | of roofline "
                      "| mean length | mean log-prob |", "|---|---:|---:|---:|---:|---:|---:|"]
            for name, r in rows.items():
                logp = f"{r['mean_logprob']:.3f} ± {r['logprob_se']:.3f}" if r["mean_logprob"] is not None else "–"
                lines.append(f"| {name} | {r['tokens_per_s']:.0f} | {r['speedup']:.2f}x | "
                             f"{r['roofline_tokens_per_s']:.0f} ({r['roofline_bound']}) | "
                             f"{100 * r['roofline_fraction']:.0f}% | {r['mean_length']:.1f} ± {r['length_se']:.1f} | "
                             f"{logp} |")
            lines.append("")
        same = ", ".join(f"{k}: {'same' if v else 'DIFFERENT'}" for k, v in b["greedy_identical"].items())
        lines += [f"Greedy tokens against generate in the same precision (batch {b['batch']}): {same}.", ""]
    lines.append("'before': aapo's loop without the stacked q/k/v and gate/up products and the one-query attention "
                 "(the previous version). Log-probs are scored in fp32.")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="embedded:smollm2-135m-instruct")
    p.add_argument("--batches", default="4x4,2x4",
                   help="prompts x G per batch, comma-separated (2x4: the embedded default's batch)")
    p.add_argument("--bf16", action="store_true", help="time bf16 too where it does not pay off")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "rollout_speed"))
    args = p.parse_args()
    res = run(args)
    write_results(args.out, res, markdown(res))


if __name__ == "__main__":
    main()
