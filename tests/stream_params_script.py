"""Run by tests/test_multirank.py under torchrun: stream a ZeRO-3 model's parameters one layer (or
one parameter) at a time and dump what arrived, plus what was gathered at the time of each yield.

    python -m torch.distributed.run --nproc_per_node N tests/stream_params_script.py MODEL_DIR OUT_DIR PER
"""

import sys
from pathlib import Path

import torch

from aapo_app.ds_config import DEFAULT_POLICY_CONFIG, fill_ds_config, read_ds_config
from aapo_app.config import load_run_config
from aapo_app.engine import ZeroModel, init_distributed, launched_world_size, stream_full_parameters
from aapo_app.models import load_causal_lm


def zero3_policy(model_dir: str) -> tuple[ZeroModel, int]:
    """The checkpoint as a trainable ZeRO-3 engine on this launcher's ranks, and this rank."""
    cfg = load_run_config(None, [f"model.path={model_dir}", "rollout.prompts_per_rank=1", "rollout.group_size=2",
                                 "train.micro_batch_size=2", "precision=fp32"])
    ds = fill_ds_config(read_ds_config(None, DEFAULT_POLICY_CONFIG), cfg, launched_world_size())
    rank, _ = init_distributed()
    return ZeroModel(load_causal_lm(model_dir, ds_config=ds), ds, trainable=True), rank


def main(model_dir: str, out_dir: str, per: str) -> None:
    model, rank = zero3_policy(model_dir)
    params = dict(model.module.named_parameters())
    got, most_gathered = {}, 0
    for name, tensor in stream_full_parameters(model.module, per=per):
        got[name] = tensor.clone()
        gathered = sum(p.numel() for p in params.values() if p.data.numel() > 0)  # unpartitioned right now
        most_gathered = max(most_gathered, gathered)
    torch.save({"params": got, "most_gathered": most_gathered,
                "total": sum(p.ds_numel for p in params.values())}, Path(out_dir) / f"rank{rank}.pt")


if __name__ == "__main__":
    main(*sys.argv[1:4])
