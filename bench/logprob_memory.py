"""Peak memory and time of one loss forward + backward: completion log-probs from full logits
against :func:`aapo_app.engine.completion_logprobs` (the output layer works ``chunk`` completion
tokens at a time and never holds ``[n, T_c, V]`` logits).

Each measurement runs in a fresh child process (``python bench/logprob_memory.py --child ...``):

* The model is a Qwen2 or Llama model built from a config with the paper's vocabulary and hidden
  size, but one decoder layer, random weights, a small MLP (``--intermediate``, default 1024), bf16
  weights, ``attn_implementation="sdpa"`` and an untied ``lm_head``.
* Inputs: a prompt of ``--prompt`` (64) random tokens and a completion of T random tokens per row,
  no padding (every completion at full length: the worst case for memory).
* Right before the forward the child frees what it can (``gc``, ``malloc_trim``), resets its peak
  RSS (``/proc/self/clear_refs``, 5) and reads its RSS. It then runs
  ``loss = -(logp * mask).sum() / mask.sum()``, ``loss.backward()`` once (timed) and reads
  ``getrusage(RUSAGE_SELF).ru_maxrss``. "peak" is that figure; "increase" is peak minus the RSS
  right before the forward. The increase includes the parameters' ``.grad`` tensors (printed
  separately), which a training step holds anyway.
* The parent polls each child's RSS and kills it above ``--max-rss-gb``.

"full" is the previous implementation (``logits_to_keep=T_c + 1``, the bf16 logits cast to fp32,
divided by the temperature, gather - logsumexp). It needs ``n x T x V`` logits several times over,
so it runs only at a reduced shape (``--reduced-t``, ``--reduced-rows``); for the paper's shapes
its logits are computed analytically. The paper's shapes run "chunked" only, with the number of
rows cut to what fits ``--run-budget-s`` (estimated from the reduced-shape run) unless
``--rows``/``--real-rows`` says otherwise. The output says where a shape was reduced.

    python bench/logprob_memory.py                      # writes bench/results/logprob_memory.txt
    python bench/logprob_memory.py --real-rows          # the paper's n (over an hour on a 2-core CPU)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: the paper's shapes: name -> (architecture, rows n, completion tokens T, vocabulary V, hidden H,
#: attention heads, key/value heads, model it stands for)
SHAPES = {
    "a": ("qwen2", 6, 3584, 151_936, 1536, 12, 2, "DeepSeek-R1-Distill-Qwen-1.5B"),
    "b": ("qwen2", 8, 3072, 152_064, 3584, 28, 4, "Qwen2.5-Math-7B"),
    "c": ("llama", 16, 3072, 128_256, 3072, 24, 8, "Llama-3.2-3B recipe"),
}

GB = 1e9


# --------------------------------------------------------------------------------------------
# child: one measurement
# --------------------------------------------------------------------------------------------
def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def _full_logprobs(model, sequences, mask, prompt_width, temperature):
    """The previous implementation: full ``[n, T_c, V]`` logits."""
    import torch

    from aapo_app.engine import position_ids

    width_c = sequences.shape[1] - prompt_width
    out = model(input_ids=sequences, attention_mask=mask, position_ids=position_ids(mask), use_cache=False,
                logits_to_keep=width_c + 1)
    logits = out.logits[:, :-1, :]
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    logits = logits / temperature
    targets = sequences[:, prompt_width:]
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def child(spec: dict) -> dict:
    import ctypes
    import gc
    import resource

    import torch

    from aapo_app.engine import completion_logprobs

    arch, n, T, V, H, heads, kv_heads = (spec[k] for k in ("arch", "n", "T", "V", "H", "heads", "kv_heads"))
    P = spec["prompt"]
    torch.manual_seed(spec["seed"])
    if arch == "qwen2":
        from transformers import Qwen2Config as Config, Qwen2ForCausalLM as Model
    else:
        from transformers import LlamaConfig as Config, LlamaForCausalLM as Model
    config = Config(vocab_size=V, hidden_size=H, intermediate_size=spec["intermediate"], num_hidden_layers=1,
                    num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=H // heads,
                    max_position_embeddings=max(4096, P + T + 1), tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    model = Model(config).to(torch.bfloat16)
    model.train()
    sequences = torch.randint(0, V, (n, P + T))
    attention_mask = torch.ones_like(sequences)
    completion_mask = attention_mask[:, P:].float()
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
        peak_reset = True
    except OSError:
        peak_reset = False
    rss_before = _rss_bytes()
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    start = time.perf_counter()
    if spec["method"] == "full":
        logp = _full_logprobs(model, sequences, attention_mask, P, spec["temperature"])
    else:
        logp = completion_logprobs(model, sequences, attention_mask, P, spec["temperature"], chunk=spec["chunk"])
    loss = -(logp * completion_mask).sum() / completion_mask.sum()
    loss.backward()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    head = model.get_output_embeddings().weight
    return {
        "loss": loss.item(),
        "head_grad_norm": head.grad.float().norm().item(),
        "seconds": seconds,
        "peak_rss": peak,
        "rss_before": rss_before,
        "maxrss_before": maxrss_before,
        "peak_reset": peak_reset,
        "param_bytes": param_bytes,
        "grad_bytes": sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None),
        "threads": torch.get_num_threads(),
    }


# --------------------------------------------------------------------------------------------
# parent
# --------------------------------------------------------------------------------------------
def machine_facts() -> list[str]:
    import torch

    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    mem = ""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = f"{int(line.split()[1]) * 1024 / GB:.1f} GB RAM"
    except OSError:
        pass
    yes = lambda f: "yes" if f in flags else "no"  # noqa: E731
    return [
        f"CPU: {model}, {os.cpu_count()} logical CPUs, {mem}",
        f"flags: avx512f {yes('avx512f')}, avx512_bf16 {yes('avx512_bf16')}, amx_bf16 {yes('amx_bf16')}",
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"transformers {__import__('transformers').__version__}; python {platform.python_version()}",
    ]


def run_child(spec: dict, max_rss: float, timeout_s: float) -> dict:
    """Run one measurement in a fresh process; kill it above ``max_rss`` bytes or ``timeout_s``."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.Popen([sys.executable, __file__, "--child", json.dumps(spec)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    start, high, killed = time.monotonic(), 0, None
    while proc.poll() is None:
        try:
            for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    high = max(high, int(line.split()[1]) * 1024)
        except OSError:
            pass
        if high > max_rss:
            killed = f"killed: RSS {high / GB:.1f} GB > limit {max_rss / GB:.1f} GB"
        elif time.monotonic() - start > timeout_s:
            killed = f"killed: still running after {timeout_s:.0f} s"
        if killed:
            proc.kill()
            break
        time.sleep(0.1)
    out, err = proc.communicate()
    wall = time.monotonic() - start
    for line in out.splitlines():
        if line.startswith("RESULT "):
            return {**json.loads(line[len("RESULT "):]), "wall": wall}
    return {"error": killed or f"exit {proc.returncode}: {err.strip().splitlines()[-1:] or ''}", "wall": wall}


def full_logits_bytes(n: int, T: int, V: int) -> dict:
    """The logits "full" holds: bf16 logits and their fp32 copy, and a gradient of each."""
    bf16, fp32 = n * T * V * 2, n * T * V * 4
    return {"bf16": bf16, "fp32": fp32, "total": 2 * (bf16 + fp32)}


def main(argv=None) -> int:
    from aapo_app.engine import LOGITS_CHUNK_TOKENS

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chunk", type=int, default=LOGITS_CHUNK_TOKENS, help="completion tokens per chunk")
    ap.add_argument("--extra-chunk", type=int, default=1024,
                    help="also measure this chunk size at shape (a) if the time budget allows (0: no)")
    ap.add_argument("--shapes", default="abc", help="which of the paper's shapes to run (subset of 'abc')")
    ap.add_argument("--rows", type=int, default=None, help="rows n for every paper shape (default: by budget)")
    ap.add_argument("--real-rows", action="store_true", help="run the paper's n whatever the time")
    ap.add_argument("--run-budget-s", type=float, default=120.0,
                    help="estimated seconds one chunked paper-shape run may take; n is cut to fit")
    ap.add_argument("--total-budget-s", type=float, default=840.0,
                    help="skip the extra-chunk run if the script would pass this")
    ap.add_argument("--reduced-t", type=int, default=512, help="completion length of the full-vs-chunked shape")
    ap.add_argument("--reduced-rows", type=int, default=6, help="rows of the full-vs-chunked shape")
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens left of the completion")
    ap.add_argument("--intermediate", type=int, default=1024, help="MLP intermediate size of the one layer")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--max-rss-gb", type=float, default=18.0, help="kill a measurement above this RSS")
    ap.add_argument("--timeout-s", type=float, default=600.0, help="kill a measurement after this long")
    ap.add_argument("--out", default=str(ROOT / "bench/results/logprob_memory.txt"),
                    help="where to write everything printed ('' for nowhere)")
    args = ap.parse_args(argv)
    t_start = time.monotonic()
    lines: list[str] = []

    def say(text: str = "") -> None:
        print(text, flush=True)
        lines.append(text)

    say("# Completion log-probs: full logits against chunked (one loss forward + backward)")
    say()
    for fact in machine_facts():
        say(f"* {fact}")
    say(f"* model: 1 decoder layer (Qwen2 or Llama), random weights, bf16, sdpa attention, untied lm_head, "
        f"MLP intermediate size {args.intermediate}; prompt {args.prompt} tokens + completion T, no padding")
    say(f"* temperature {args.temperature}; chunked = aapo_app.engine.completion_logprobs, chunk {args.chunk} "
        f"(library default {LOGITS_CHUNK_TOKENS})")
    say("* peak = ru_maxrss of a fresh child process (peak reset right before the forward); "
        "increase = peak - RSS right before the forward; GB = 1e9 bytes")
    say()

    rows, checks, notes = [], [], []
    max_rss = args.max_rss_gb * GB

    def measure(label, key, n, T, method, chunk, note=""):
        arch, _, _, V, H, heads, kv, _ = SHAPES[key]
        spec = dict(arch=arch, n=n, T=T, V=V, H=H, heads=heads, kv_heads=kv, prompt=args.prompt,
                    intermediate=args.intermediate, temperature=args.temperature, method=method, chunk=chunk,
                    seed=0)
        name = method if method == "full" else f"chunked {chunk}"
        shown = f"{label} n={n}" + ("" if "T=" in label else f" T={T}")
        print(f"... {shown} {name}", file=sys.stderr, flush=True)
        res = run_child(spec, max_rss, args.timeout_s)
        rows.append(dict(label=label, n=n, T=T, V=V, H=H, method=name, note=note, **res))
        if "error" not in res and not res["peak_reset"]:
            notes.append(f"{label} {name}: peak RSS could not be reset; peak includes building the model")
        return res

    # 1. full against chunked at a reduced shape that fits both
    arch, _, _, Va, Ha, *_ = SHAPES["a"]
    rn, rT = args.reduced_rows, args.reduced_t
    reduced = f"(a) T={rT}"
    predicted_full = full_logits_bytes(rn, rT, Va)["total"]
    if predicted_full > max_rss:
        notes.append(f"full at {reduced} n={rn} skipped: its logits alone are {predicted_full / GB:.1f} GB")
        full = {"error": "skipped"}
    else:
        full = measure(reduced, "a", rn, rT, "full", 0)
    chunked = measure(reduced, "a", rn, rT, "chunked", args.chunk)

    # 2. the paper's shapes, chunked, with n cut to the time budget
    ms_per_token_vh = None  # chunked seconds per (token x V x H) at the reduced shape
    if "error" not in chunked:
        ms_per_token_vh = chunked["seconds"] / (rn * rT * Va * Ha)
    for key in args.shapes:
        _, n_real, T, V, H, _, _, what = SHAPES[key]
        label = f"({key}) {what}"
        n, note = n_real, ""
        if args.rows is not None:
            n = min(args.rows, n_real)
        elif not args.real_rows and ms_per_token_vh is not None:
            per_row = ms_per_token_vh * T * V * H
            n = max(1, min(n_real, int(args.run_budget_s // per_row)))
        if n < n_real:
            est = (ms_per_token_vh or 0) * n_real * T * V * H
            note = f"n cut from {n_real} to {n}" + (f" (estimated {est / 60:.0f} min at n={n_real})" if est else "")
            notes.append(f"{label}: {note}")
        measure(label, key, n, T, "chunked", args.chunk, note)

    # 3. another chunk size at shape (a)
    if args.extra_chunk and args.extra_chunk != args.chunk and "a" in args.shapes:
        done = [r for r in rows if r["label"].startswith("(a) DeepSeek") and "error" not in r]
        if done:
            n, T = done[0]["n"], done[0]["T"]
            left = args.total_budget_s - (time.monotonic() - t_start)
            if done[0]["wall"] * 1.2 < left:
                measure(done[0]["label"], "a", n, T, "chunked", args.extra_chunk, done[0]["note"])
            else:
                notes.append(f"chunk {args.extra_chunk} at (a) skipped: about {done[0]['wall']:.0f} s needed, "
                             f"{left:.0f} s of --total-budget-s left")

    # report
    say("| shape | n | T | V | H | method | peak RSS (GB) | increase (GB) | s | ms / completion token |")
    say("|---|---:|---:|---:|---:|---|---:|---:|---:|---:|")
    for r in rows:
        if "error" in r:
            say(f"| {r['label']} | {r['n']} | {r['T']:,} | {r['V']:,} | {r['H']:,} | {r['method']} | "
                f"{r['error']} | | | |")
            continue
        inc = r["peak_rss"] - r["rss_before"]
        say(f"| {r['label']} | {r['n']} | {r['T']:,} | {r['V']:,} | {r['H']:,} | {r['method']} | "
            f"{r['peak_rss'] / GB:.2f} | {inc / GB:.2f} | {r['seconds']:.1f} | "
            f"{1000 * r['seconds'] / (r['n'] * r['T']):.2f} |")
    say()
    say("Per measurement: RSS before the forward, of which parameters; parameter .grad after the backward "
        "(part of the increase); loss.")
    say()
    for r in rows:
        if "error" not in r:
            say(f"* {r['label']} n={r['n']} {r['method']}: before {r['rss_before'] / GB:.2f} GB "
                f"(parameters {r['param_bytes'] / GB:.2f} GB), .grad {r['grad_bytes'] / GB:.2f} GB, "
                f"loss {r['loss']:.6f}, {r['threads']} threads")
    say()

    say("Analytic logits of \"full\" (n*T*V*2 bf16 logits + n*T*V*4 fp32 copy, and the same again for their "
        "gradients):")
    say()
    say("| shape | n | T | V | bf16 logits (GB) | fp32 copy (GB) | with gradients (GB) |")
    say("|---|---:|---:|---:|---:|---:|---:|")
    shapes = [(reduced, rn, rT, Va)] + [(f"({k}) {SHAPES[k][7]}", SHAPES[k][1], SHAPES[k][2], SHAPES[k][3])
                                        for k in args.shapes]
    for label, n, T, V in shapes:
        b = full_logits_bytes(n, T, V)
        say(f"| {label} | {n} | {T:,} | {V:,} | {b['bf16'] / GB:.2f} | {b['fp32'] / GB:.2f} | {b['total'] / GB:.2f} |")
    say()

    if "error" not in full and "error" not in chunked:
        inc_f = full["peak_rss"] - full["rss_before"]
        inc_c = chunked["peak_rss"] - chunked["rss_before"]
        rel = abs(full["loss"] - chunked["loss"]) / abs(full["loss"])
        rel_g = abs(full["head_grad_norm"] - chunked["head_grad_norm"]) / full["head_grad_norm"]
        tok = rn * rT
        say(f"At {reduced}, n={rn}: full/chunked increase = {inc_f / GB:.2f} / {inc_c / GB:.2f} GB = "
            f"{inc_f / inc_c:.1f}x; time per completion token {1000 * full['seconds'] / tok:.2f} against "
            f"{1000 * chunked['seconds'] / tok:.2f} ms (chunked/full = {chunked['seconds'] / full['seconds']:.2f}x); "
            f"full's increase is {inc_f / full_logits_bytes(rn, rT, Va)['total']:.2f}x its analytic logits.")
        verdict = "OK" if rel < 1e-3 else "MISMATCH"
        say(f"Same loss: full {full['loss']:.6f}, chunked {chunked['loss']:.6f}, relative difference {rel:.2e} "
            f"(< 1e-3: {verdict}); lm_head gradient norm {full['head_grad_norm']:.6g} against "
            f"{chunked['head_grad_norm']:.6g} (relative difference {rel_g:.2e}).")
        checks.append(rel < 1e-3)
    else:
        say("Loss check not run: a reduced-shape measurement failed.")
        checks.append(False)
    for note in notes:
        say(f"Note: {note}.")
    say()
    say(f"Total runtime {time.monotonic() - t_start:.0f} s.")

    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("\n".join(lines) + "\n")
    return 0 if all(checks) else 1


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        print("RESULT " + json.dumps(child(json.loads(sys.argv[2]))), flush=True)
        sys.exit(0)
    sys.exit(main())
