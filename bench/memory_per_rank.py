"""Per-rank memory of the policy engine under ZeRO-3 (and ZeRO-2 for contrast) for 1, 2 and 4 ranks.

For each (stage, ranks) it launches ``torchrun`` with that many CPU ranks; every rank loads the
embedded SmolLM2-135M into a DeepSpeed engine exactly as ``aapo train`` does (under ZeRO-3 the
weights are partitioned as they load), takes one optimizer step on a fixed batch so that the
optimizer states exist, and reports:

* params MB: the parameter storage this rank holds (ZeRO-3: its partition; ZeRO-2: the full model);
* optimizer MB: the optimizer's fp32 parameter copies and Adam moments held by this rank;
* peak RSS MB: the process's peak resident memory (everything: libraries, activations, buffers).

    python bench/memory_per_rank.py                 # prints the table, writes bench/results/memory_per_rank.json
    python bench/memory_per_rank.py --ranks 1 2     # fewer configurations

Run from the repository root (CPU: DS_ACCELERATOR=cpu is set for the ranks).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._common import free_port, held_bytes, one_training_step, optimizer_bytes  # noqa: E402

CONFIGS = {3: "zero3_cpu.json", 2: "zero2_cpu.json"}


def worker(stage: int, out: str) -> None:
    """One rank: build the policy engine, take one step, measure, write rank<r>.json."""
    import resource

    from aapo_app.config import load_run_config
    from aapo_app.ds_config import fill_ds_config, read_ds_config
    from aapo_app.engine import ZeroModel, init_distributed
    from aapo_app.models import load_causal_lm, resolve_model_path

    rank, world = init_distributed()
    cfg = load_run_config(None, ["rollout.prompts_per_rank=2", "rollout.group_size=2", "train.micro_batch_size=4"])
    ds = fill_ds_config(read_ds_config(None, CONFIGS[stage]), cfg, world)
    path = resolve_model_path(cfg.model.path)
    policy = ZeroModel(load_causal_lm(path, ds_config=ds), ds, trainable=True, learning_rate=1e-6)
    one_training_step(policy.engine, rank, policy.module.config.vocab_size)
    params = held_bytes(policy.module)
    master, moments = optimizer_bytes(policy.engine)
    opt = master + moments
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(out, f"rank{rank}.json").write_text(json.dumps(
        {"rank": rank, "world": world, "stage": stage, "params_mb": params / 2**20, "optimizer_mb": opt / 2**20,
         "master_mb": master / 2**20, "moments_mb": moments / 2**20,
         "peak_rss_mb": peak_mb}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--stages", type=int, nargs="+", default=[3, 2])
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "memory_per_rank.json"))
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        return worker(args.worker, args.worker_out)

    rows = []
    for stage in args.stages:
        for n in args.ranks:
            tmp = Path(args.out).parent / f".memory-{stage}-{n}"
            tmp.mkdir(parents=True, exist_ok=True)
            env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_port",
                   str(free_port()), __file__, "--worker", str(stage), "--worker-out", str(tmp)]
            print(f"+ ZeRO-{stage}, {n} rank(s): {' '.join(cmd)}", flush=True)
            proc = subprocess.run(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            if proc.returncode != 0:
                sys.exit(f"ZeRO-{stage} with {n} rank(s) failed:\n{proc.stderr[-3000:]}")
            ranks = [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(n)]
            rows.append({"stage": stage, "ranks": n, **{k: max(r[k] for r in ranks)
                                                        for k in ("params_mb", "optimizer_mb", "master_mb",
                                                                  "moments_mb", "peak_rss_mb")}})
            for r in range(n):
                (tmp / f"rank{r}.json").unlink()
            tmp.rmdir()
    Path(args.out).write_text(json.dumps(rows, indent=2))
    print("\n| ZeRO stage | ranks | params MB / rank | optimizer MB / rank | (params+optimizer) vs 1 rank | peak RSS MB / rank |")
    print("|---|---:|---:|---:|---:|---:|")
    for row in rows:
        one = next((r for r in rows if r["stage"] == row["stage"] and r["ranks"] == 1), None)
        ratio = ((row["params_mb"] + row["optimizer_mb"]) / (one["params_mb"] + one["optimizer_mb"])) if one else float("nan")
        print(f"| {row['stage']} | {row['ranks']} | {row['params_mb']:.0f} | {row['optimizer_mb']:.0f} | "
              f"{ratio:.2f} (1/N = {1 / row['ranks']:.2f}) | {row['peak_rss_mb']:.0f} |")
    print(f"\nwritten: {args.out}")


if __name__ == "__main__":
    main()
