"""Run by tests/test_multirank.py under torchrun with 1 or 2 ranks: one SGD step of every algorithm's
loss on the same fixed micro-batches, through a real DeepSpeed ZeRO-3 engine, then dump the
parameters. With 1 rank the engine accumulates micro-batches A and B (2 accumulation steps); with
2 ranks rank r takes micro-batch r alone and DeepSpeed averages the gradients. Both must end with
the same parameters.

    python -m torch.distributed.run --nproc_per_node N tests/dp_equivalence_script.py MODEL_DIR OUT_DIR
"""

import sys
from pathlib import Path

import deepspeed
import torch

from aapo_app.algorithms import ALGORITHMS, build_algorithm
from aapo_app.engine import completion_logprobs, init_distributed
from aapo_app.models import load_causal_lm

MICRO = 4  # sequences per micro-batch
PROMPT, COMPLETION, T = 3, 5, 0.7


def micro_batches(vocab: int):
    """Two fixed micro-batches with different completion token counts (so token means differ)."""
    g = torch.Generator().manual_seed(1234)
    out = []
    for lengths in ([5, 2, 4, 1], [3, 5, 5, 2]):
        seq = torch.randint(3, vocab, (MICRO, PROMPT + COMPLETION), generator=g)
        attn = torch.ones_like(seq, dtype=torch.bool)
        cmask = torch.arange(COMPLETION).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)  # [n, T_c]
        attn[:, PROMPT:] = cmask
        adv = torch.randn(MICRO, generator=g)
        ref = -torch.rand(MICRO, COMPLETION, generator=g) * 3  # fixed "reference" log-probs
        out.append((seq, attn, cmask, adv, ref))
    return out


def main(model_dir: str, out_dir: str) -> None:
    rank, world = init_distributed()
    data = micro_batches(vocab=1000)
    mine = data if world == 1 else [data[rank]]
    results = {}
    for name in sorted(ALGORITHMS):
        algo = build_algorithm(name)
        torch.manual_seed(0)
        model = load_causal_lm(model_dir)
        config = {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": len(mine),
                  "train_batch_size": MICRO * len(mine) * world, "zero_optimization": {"stage": 3},
                  "zero_allow_untested_optimizer": True,
                  "steps_per_print": 10**9}
        # SGD, so that the parameter change is exactly -lr * gradient (Adam would normalise it away)
        engine, *_ = deepspeed.initialize(model=model, config=config,
                                          optimizer=torch.optim.SGD(model.parameters(), lr=1.0))
        engine.train()
        for seq, attn, cmask, adv, ref in mine:
            logp = completion_logprobs(engine, seq, attn, PROMPT, T)  # [n, T_c], the update stage's call
            out = algo.loss(logp, cmask, adv, None, ref if algo.uses_reference_logprobs else None, COMPLETION)
            engine.backward(out.loss)
            engine.step()
        params = dict(engine.module.named_parameters())
        with deepspeed.zero.GatheredParameters(list(params.values())):
            results[name] = {k: p.data.clone() for k, p in params.items()}
    if rank == 0:
        torch.save(results, Path(out_dir) / f"params_world{world}.pt")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
