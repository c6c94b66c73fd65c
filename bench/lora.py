"""LoRA against a full fine-tune: memory per rank, step time, and a learning check (docs/lora.md).

Three measurements, each optional (``--parts``):

* ``memory``: for each model (the embedded SmolLM2-135M, and a randomly initialised model of
  Qwen2.5-1.5B's shape) and each rank count, ``torchrun`` starts that many CPU ranks; each builds
  the engines ``aapo train`` builds for AAPO under ZeRO-3, takes one optimizer step on a fixed
  batch and reports what it holds: **full** = the trainable policy plus the separate frozen
  reference engine; **lora** = the policy with rank-``--rank`` adapters (the defaults' target
  modules), whose base is the reference (no second engine). Per rank: parameters (policy and
  reference partitions), gradients (the trainable parameters' gradient partition: ZeRO-2/3 keep
  1/N of each gradient per rank; computed from the trainable count, fp32 here), optimizer state
  (fp32 master copies + Adam moments, measured), and peak RSS (measured, everything).
* ``speed``: ``aapo train`` on the embedded default (its default settings), full and LoRA, the
  mean step / rollout / update seconds over the steps after the first.
* ``learning``: LoRA on the embedded default over ``--seeds`` (held-out accuracy before/after each
  run, ``--steps`` steps at ``--lora-lr``), beside the full fine-tune's at the default learning rate.

    python bench/lora.py                          # everything (long on a CPU): bench/results/lora.{json,md}
    python bench/lora.py --parts memory --models smollm2 --ranks 1 2
    python bench/lora.py --smoke                  # tiny shapes, a few seconds per part: checks the script runs

Run from the repository root (CPU: DS_ACCELERATOR=cpu is set for the ranks).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._common import free_port, held_bytes, one_training_step, optimizer_bytes  # noqa: E402

# Qwen2.5-1.5B's shape (config.json of Qwen/Qwen2.5-1.5B), random weights
SHAPES = {
    "qwen1.5b-shape": dict(model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                           num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                           max_position_embeddings=4096, tie_word_embeddings=True),
    "tiny": dict(model_type="llama", vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False),
}


def model_dir(name: str) -> str:
    """The model's directory: the embedded default, or a random model of a named shape written once
    (bf16, e.g. 3 GB for the 1.5B shape) into aapo's cache with the embedded default's tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from aapo_app.models import cache_dir, load_tokenizer, resolve_model_path

    if name == "smollm2":
        return resolve_model_path("")
    path = cache_dir() / "bench-random" / name
    done = path / "written"  # the last file written: a directory without it is an interrupted write
    if not done.is_file():
        tok = load_tokenizer(resolve_model_path(""))
        shape = dict(SHAPES[name], pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        shape["vocab_size"] = max(shape["vocab_size"], len(tok))
        config = AutoConfig.for_model(shape.pop("model_type"), **shape)
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(path)
        tok.save_pretrained(path)
        done.write_text("")
    return str(path)


def counts(name: str, rank_r: int) -> tuple[int, int]:
    """(all parameters, LoRA adapter parameters) of the model, from its structure on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from aapo_app.lora import LoraSettings, apply_lora

    config = AutoConfig.from_pretrained(model_dir(name))  # written first, outside the meta device
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
        total = sum(p.numel() for p in model.parameters())
        apply_lora(model, LoraSettings(rank=rank_r))
    return total, sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)


def computed_mb(total: int, adapter: int, mode: str, ranks: int) -> float:
    """fp32 ZeRO-3 bytes per rank of parameters + gradients + optimizer state, each partitioned over the
    ranks. With fp32 weights DeepSpeed's fp32 partition is the master copy, so the optimizer state is
    the two Adam moments (8 bytes per trainable parameter, as measured). Full = the policy (4 + 4 + 8
    bytes per parameter) plus the reference engine (4); LoRA = the base and adapters (4 each) plus the
    adapters' gradients and moments (4 + 8)."""
    if mode == "full":
        per = total * (4 + 4 + 8) + total * 4
    else:
        per = total * 4 + adapter * (4 + 4 + 8)
    return per / ranks / 2**20


def _available_mb() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("inf")


def _model(name: str, ds: dict):
    """The model under the engines' (ZeRO-3 partitioned) loading."""
    from aapo_app.models import load_causal_lm

    return load_causal_lm(model_dir(name), ds_config=ds)


def memory_worker(model_name: str, mode: str, rank_r: int, out: str) -> None:
    """One rank: the engines of ``mode`` (full / lora), one optimizer step, then what this rank holds."""
    import resource

    import torch

    from aapo_app.config import load_run_config
    from aapo_app.ds_config import fill_ds_config, read_ds_config
    from aapo_app.engine import ZeroModel, init_distributed
    from aapo_app.lora import apply_lora

    rank, world = init_distributed()
    lora = [f"model.lora.rank={rank_r}"] if mode == "lora" else []
    cfg = load_run_config(None, ["rollout.prompts_per_rank=2", "rollout.group_size=2", "train.micro_batch_size=4",
                                 *lora])
    ds = fill_ds_config(read_ds_config(None, "zero3_cpu.json"), cfg, world)
    ds_ref = fill_ds_config(read_ds_config(None, "zero3_inference_cpu.json"), cfg, world, training=False)
    torch.manual_seed(0)
    model = _model(model_name, ds)
    if mode == "lora":
        apply_lora(model, cfg.model.lora)
    policy = ZeroModel(model, ds, trainable=True, learning_rate=1e-6)
    reference = ZeroModel(_model(model_name, ds_ref), ds_ref, trainable=False) if mode == "full" else None
    one_training_step(policy.engine, rank, policy.module.config.vocab_size)
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in policy.module.parameters() if p.requires_grad)
    total = sum(getattr(p, "ds_numel", p.numel()) for p in policy.module.parameters())
    master, moments = optimizer_bytes(policy.engine)
    Path(out, f"rank{rank}.json").write_text(json.dumps({
        "rank": rank, "world": world, "policy_params_mb": held_bytes(policy.module) / 2**20,
        "reference_params_mb": held_bytes(reference.module) / 2**20 if reference else 0.0,
        "grads_mb": trainable * 4 / world / 2**20, "optimizer_mb": (master + moments) / 2**20,
        "trainable": trainable, "total": total,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def measure_memory(models, ranks, rank_r: int, tmp_root: Path) -> list[dict]:
    rows = []
    for model in models:
        total, adapter = counts(model, rank_r)
        for n in ranks:
            for mode in ("full", "lora"):
                computed = computed_mb(total, adapter, mode, n)
                # every rank runs on this one machine; peak memory is about 1.5x the engines' own figure
                need = 1.5 * computed * n + 1024 * n
                if need > _available_mb():
                    print(f"+ memory {model} {mode}, {n} rank(s): not measured (needs about {need / 1024:.0f} GB, "
                          f"{_available_mb() / 1024:.0f} GB available)", flush=True)
                    rows.append({"model": model, "mode": mode, "ranks": n, "trainable": total if mode == "full"
                                 else adapter, "total": total, "computed_mb": computed, "measured": False})
                    continue
                tmp = Path(tempfile.mkdtemp(dir=tmp_root))
                env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
                           PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
                cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_port",
                       str(free_port()), __file__, "--memory-worker", model, mode, str(rank_r), str(tmp)]
                print(f"+ memory {model} {mode}, {n} rank(s)", flush=True)
                proc = subprocess.run(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                      text=True)
                if proc.returncode != 0:
                    sys.exit(f"memory {model} {mode} on {n} rank(s) failed:\n{proc.stderr[-3000:]}")
                per_rank = [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(n)]
                keys = ("policy_params_mb", "reference_params_mb", "grads_mb", "optimizer_mb", "peak_rss_mb")
                row = {"model": model, "mode": mode, "ranks": n, **{k: max(r[k] for r in per_rank) for k in keys},
                       "trainable": per_rank[0]["trainable"], "total": per_rank[0]["total"], "computed_mb": computed,
                       "measured": True}
                row["sum_mb"] = row["policy_params_mb"] + row["reference_params_mb"] + row["grads_mb"] + row["optimizer_mb"]
                rows.append(row)
    return rows


def _train(overrides: list[str], out: Path) -> dict:
    """``aapo train`` in this process; its summary and metrics."""
    from aapo_app.config import load_run_config
    from aapo_app.trainer import Trainer

    trainer = Trainer(load_run_config(None, [f"output_dir={out}", "train.save_final=false", *overrides]))
    try:
        summary = trainer.train()
    finally:
        trainer.close()
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {"summary": summary, "metrics": metrics}


def _mean(rows, key):
    values = [m[key] for m in rows if key in m]
    return sum(values) / len(values) if values else float("nan")


def measure_speed(base: list[str], steps: int, rank_r: int, lora_lr: float, tmp: Path) -> list[dict]:
    rows = []
    for mode, extra in (("full", []), ("lora", [f"model.lora.rank={rank_r}", f"train.learning_rate={lora_lr}"])):
        print(f"+ speed {mode}, {steps} steps", flush=True)
        res = _train([*base, f"train.max_steps={steps}", *extra], tmp / f"speed-{mode}")
        timed = [m for m in res["metrics"] if m.get("step", 0) >= 2] or res["metrics"][1:]
        rows.append({"mode": mode, "steps": steps, **{k: _mean(timed, k) for k in
                                                       ("step_seconds", "rollout_seconds", "update_seconds")}})
    return rows


def measure_learning(base: list[str], seeds, steps: int, rank_r: int, lora_lr: float, full: bool,
                     tmp: Path) -> list[dict]:
    rows = []
    modes = [("lora", [f"model.lora.rank={rank_r}", f"train.learning_rate={lora_lr}"])]
    if full:
        modes.append(("full", []))
    for mode, extra in modes:
        for seed in seeds:
            print(f"+ learning {mode}, seed {seed}, {steps} steps", flush=True)
            res = _train([*base, f"train.max_steps={steps}", f"train.seed={seed}", *extra],
                         tmp / f"learn-{mode}-{seed}")
            s = res["summary"]
            rows.append({"mode": mode, "seed": seed, "steps": steps, "before": s["eval_before"],
                         "after": s["eval_after"], "problems": s["eval_problems"],
                         "reward_first": res["metrics"][1].get("reward/mean"),
                         "reward_last": res["metrics"][-1].get("reward/mean")})
    return rows


def table(res: dict) -> str:
    out = [f"LoRA rank {res['rank']} (alpha 2 x rank, targets: the Llama/Qwen projections), CPU, {res['machine']}; "
           "memory rows at precision=auto (the computed column assumes fp32 weights)", ""]
    if res.get("memory"):
        out += ["| model | mode | ranks | trainable / total | policy params MB | reference params MB | grads MB | "
                "optimizer MB | sum MB / rank | computed MB / rank | peak RSS MB |",
                "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in res["memory"]:
            head = f"| {r['model']} | {r['mode']} | {r['ranks']} | {r['trainable'] / 1e6:.2f}M / {r['total'] / 1e6:.0f}M "
            if not r["measured"]:
                out.append(head + f"| not measured (memory) | | | | | {r['computed_mb']:.0f} | |")
                continue
            out.append(head + f"| {r['policy_params_mb']:.0f} | {r['reference_params_mb']:.0f} | {r['grads_mb']:.1f} | "
                       f"{r['optimizer_mb']:.1f} | {r['sum_mb']:.0f} | {r['computed_mb']:.0f} | {r['peak_rss_mb']:.0f} |")
        out.append("")
    if res.get("speed"):
        out += ["| mode | steps | step s | rollout s | update s |", "|---|---:|---:|---:|---:|"]
        out += [f"| {r['mode']} | {r['steps']} | {r['step_seconds']:.2f} | {r['rollout_seconds']:.2f} | "
                f"{r['update_seconds']:.2f} |" for r in res["speed"]]
        out.append("")
    if res.get("learning"):
        out += ["| mode | seed | steps | held-out before | after | reward first step | last step |",
                "|---|---:|---:|---:|---:|---:|---:|"]
        out += [f"| {r['mode']} | {r['seed']} | {r['steps']} | {100 * r['before']:.1f}% | {100 * r['after']:.1f}% | "
                f"{r['reward_first']:.3f} | {r['reward_last']:.3f} |" for r in res["learning"]]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", nargs="+", default=["memory", "speed", "learning"],
                        choices=["memory", "speed", "learning"])
    parser.add_argument("--models", nargs="+", default=["smollm2", "qwen1.5b-shape"],
                        choices=["smollm2", *SHAPES])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank")
    parser.add_argument("--speed-steps", type=int, default=6)
    parser.add_argument("--steps", type=int, default=40, help="learning check: steps per run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--lora-lr", type=float, default=2e-4, help="LoRA's learning rate (the full run keeps the default)")
    parser.add_argument("--no-full-learning", action="store_true", help="learning check: LoRA runs only")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes and 1-2 steps: checks that the script runs")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "lora"))
    parser.add_argument("--memory-worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_worker:
        model, mode, rank_r, out = args.memory_worker
        return memory_worker(model, mode, int(rank_r), out)

    import torch

    from bench._common import machine, write_results

    tmp = Path(tempfile.mkdtemp(prefix="aapo-bench-lora-"))
    base: list[str] = []
    if args.smoke:
        args.models, args.speed_steps, args.steps, args.seeds = ["tiny"], 2, 1, args.seeds[:1]
        base = [f"model.path={model_dir('tiny')}", "rollout.max_new_tokens=6", "data.eval_size=2",
                "train.eval_max_new_tokens=4", "rewards.num_workers=1"]
        if args.out == parser.get_default("out"):
            args.out = str(tmp / "lora")
    res = {"rank": args.rank, "machine": machine(torch.device("cpu")), "smoke": args.smoke}
    if "memory" in args.parts:
        res["memory"] = measure_memory(args.models, args.ranks, args.rank, tmp)
    if "speed" in args.parts:
        res["speed"] = measure_speed(base, args.speed_steps, args.rank, args.lora_lr, tmp)
    if "learning" in args.parts:
        res["learning"] = measure_learning(base, args.seeds, args.steps, args.rank, args.lora_lr,
                                           not args.no_full_learning, tmp)
    write_results(args.out, res, table(res))


if __name__ == "__main__":
    main()
