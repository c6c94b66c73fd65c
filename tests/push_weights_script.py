"""Run by tests/test_multirank.py under torchrun: push a trained ZeRO-3 policy's weights into
receivers the way rollout.backend=vllm pushes them into colocated vLLM engines, and dump the result.

    python -m torch.distributed.run --nproc_per_node N tests/push_weights_script.py MODEL_DIR OUT_DIR

The receivers are full transformers copies of the checkpoint exposing what aapo's push and checks use
of a vLLM engine (load_weights of (HF name, tensor) pairs, reset_prefix_cache, probe, storage_ids).
vLLM itself needs CUDA; this exercises aapo's side of the push on real ZeRO-3 partitions.
"""

import sys
from pathlib import Path

import torch

from aapo_app.vllm_engine import VLLMEngine, VLLMWeightsError, check_engines_apart, probe_slices, push_weights_checked
from stream_params_script import zero3_policy


class Receiver(VLLMEngine):
    """A full copy of the checkpoint that takes weights the way vLLM's ``load_weights`` does (a
    colocated engine's checks: its weights can be read)."""

    dtype = "float32"

    def __init__(self, model_dir: str, model=None, takes_weights: bool = True):
        from transformers import AutoModelForCausalLM

        super().__init__(tokenizer=None, eos_ids=[])
        self.model = model if model is not None else AutoModelForCausalLM.from_pretrained(model_dir)
        self.takes_weights = takes_weights
        self.loads, self.resets, self.most_in_one_load = 0, 0, 0

    def load_weights(self, named_tensors) -> None:
        params = dict(self.model.named_parameters())
        batch = list(named_tensors)
        self.loads += 1
        self.most_in_one_load = max(self.most_in_one_load, sum(t.numel() for _, t in batch))
        if self.takes_weights:
            with torch.no_grad():
                for name, tensor in batch:
                    params[name].copy_(tensor)

    def reset_prefix_cache(self) -> None:
        self.resets += 1

    def probe(self):
        return probe_slices(dict(self.model.named_parameters()))

    def storage_ids(self):
        return {p.data_ptr() for p in self.model.parameters()}


def error_of(fn) -> str:
    try:
        fn()
    except VLLMWeightsError as exc:
        return str(exc)
    return ""


def main(model_dir: str, out_dir: str) -> None:
    import deepspeed

    policy, rank = zero3_policy(model_dir)
    # "training": move every weight away from the checkpoint (rank 0 writes, the partitions follow)
    params = list(policy.module.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
        if rank == 0:
            with torch.no_grad():
                for i, p in enumerate(params):
                    p.add_(0.01 * (i + 1))
    policy_rx, reference_rx = Receiver(model_dir), Receiver(model_dir)
    reference_before = {n: p.detach().clone() for n, p in reference_rx.model.named_parameters()}
    apart = error_of(lambda: check_engines_apart(policy_rx, reference_rx))
    same = error_of(lambda: check_engines_apart(policy_rx, Receiver(model_dir, model=policy_rx.model)))
    pushed = push_weights_checked(policy.module, policy_rx, reference_rx)
    deaf = error_of(lambda: push_weights_checked(policy.module, Receiver(model_dir, takes_weights=False)))
    # a "reference" engine that is really the policy engine: the push moves it, and the check says so
    alias = Receiver(model_dir)
    shared = Receiver(model_dir, model=alias.model)
    shared.reference_probe = probe_slices(dict(Receiver(model_dir).model.named_parameters()))
    aliased = error_of(lambda: push_weights_checked(policy.module, alias, shared))
    torch.save({
        "pushed": pushed, "loads": policy_rx.loads, "resets": policy_rx.resets,
        "most_in_one_load": policy_rx.most_in_one_load,
        "policy": {n: p.detach().clone() for n, p in policy_rx.model.named_parameters()},
        "reference_unchanged": all(torch.equal(p, reference_before[n])
                                   for n, p in reference_rx.model.named_parameters()),
        "apart": apart, "same": same, "deaf": deaf, "aliased": aliased,
    }, Path(out_dir) / f"push-rank{rank}.pt")


if __name__ == "__main__":
    main(*sys.argv[1:3])
