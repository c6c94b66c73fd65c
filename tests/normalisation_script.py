"""Run by tests/test_normalisation.py under torchrun with 1 or 2 ranks: the real update stage
(:func:`aapo_app.update.update`) on a real DeepSpeed ZeRO-3 engine with plain SGD, for every case
of tests/normalisation_cases.py and every micro-batch size, each from the same initial weights;
rank 0 saves the parameter changes (and the update metrics).

    python -m torch.distributed.run --nproc_per_node N tests/normalisation_script.py MODEL_DIR OUT_FILE LR MICRO...
"""

import sys

import deepspeed
import torch

import normalisation_cases as C
from aapo_app.algorithms import algorithm_params_class, build_algorithm
from aapo_app.batches import RolloutBatch, Samples, ScoredBatch
from aapo_app.engine import completion_logprobs, init_distributed
from aapo_app.models import load_causal_lm
from aapo_app.update import update

PAD = 0


class SGDPolicy:
    """What the update stage needs of a policy: a DeepSpeed engine and its log-prob scorer."""

    def __init__(self, engine):
        self.engine = engine

    def completion_logprobs(self, sequences, attention_mask, prompt_width, temperature, *, entropy=False):
        return completion_logprobs(self.engine, sequences, attention_mask, prompt_width, temperature, entropy=entropy)


def sampler_logprobs(model_dir: str, data, groups, width_c: int) -> torch.Tensor:
    """``[n, T_c]`` what a sampler that differs from the trainer by sampler_shift() reports: the initial
    model's log-probs minus δ."""
    model = load_causal_lm(model_dir)
    shifts = C.sampler_shift()
    rows = []
    with torch.no_grad():
        for g in groups:
            for j in range(C.G):
                lp = C.logprobs_unpadded(model, data[g][0], data[g][1][j]) - shifts[(g, j)].float()
                rows.append(torch.nn.functional.pad(lp, (0, width_c - lp.numel())))
    return torch.stack(rows)


def rank_batch(data, groups) -> ScoredBatch:
    """This rank's groups as the rollout stage lays them out: left-padded prompts, right-padded completions."""
    rows = [(data[g][0], data[g][1][j], data[g][3][j]) for g in groups for j in range(C.G)]
    width_p = max(len(p) for p, _, _ in rows)
    width_c = max(len(c) for _, c, _ in rows)
    n = len(rows)
    seq = torch.full((n, width_p + width_c), PAD)
    attn = torch.zeros(n, width_p + width_c, dtype=torch.bool)
    cmask = torch.zeros(n, width_c, dtype=torch.bool)
    ref = torch.zeros(n, width_c)
    for i, (p, c, r) in enumerate(rows):
        seq[i, width_p - len(p):width_p] = p
        seq[i, width_p:width_p + len(c)] = c
        attn[i, width_p - len(p):width_p + len(c)] = True
        cmask[i, :len(c)] = True
        ref[i, :len(c)] = r
    samples = Samples(sequences=seq, attention_mask=attn, completion_mask=cmask, prompt_width=width_p,
                      texts=[""] * n, lengths=cmask.sum(1),
                      truncated=torch.tensor([C.truncated(g, j) for g in groups for j in range(C.G)]))
    advantages = torch.stack([data[g][2] for g in groups])  # [P, G]
    rollout = RolloutBatch(examples=[None] * len(groups), group_size=C.G, policy=samples, ref_logprobs=ref)
    return ScoredBatch(rollout=rollout, rewards=torch.zeros_like(advantages), ref_rewards=None, reward_parts={},
                       advantages=advantages)


class Harness:
    """DeepSpeed ZeRO-3 engines with plain SGD, one per micro-batch layout, each reset to the same
    initial weights before every update."""

    def __init__(self, model_dir: str, lr: float, world: int):
        self.model_dir, self.lr, self.world, self.engines = model_dir, lr, world, {}

    def engine(self, rows: int, accumulation: int):
        key = (rows, accumulation)
        if key not in self.engines:
            torch.manual_seed(0)
            model = load_causal_lm(self.model_dir)
            config = {"train_micro_batch_size_per_gpu": rows, "gradient_accumulation_steps": accumulation,
                      "train_batch_size": rows * accumulation * self.world, "zero_optimization": {"stage": 3},
                      "zero_allow_untested_optimizer": True, "steps_per_print": 10**9,
                      "gradient_clipping": 0.0}  # DeepSpeed clips at 1.0 unless told otherwise
            engine, *_ = deepspeed.initialize(model=model, config=config,
                                              optimizer=torch.optim.SGD(model.parameters(), lr=self.lr))
            engine.train()
            params = list(engine.module.parameters())
            with deepspeed.zero.GatheredParameters(params):
                initial = [p.data.clone() for p in params]
            self.engines[key] = (engine, initial)
        return self.engines[key]

    def update(self, scored: ScoredBatch, name: str, overrides: dict, micro: int, tokens: int = 0):
        """(parameter changes, update metrics) of one update from the initial weights; with ``tokens``,
        micro-batches by that token budget instead of ``micro`` rows."""
        algorithm = build_algorithm(name, algorithm_params_class(name)(**overrides))
        n = scored.rollout.policy.sequences.shape[0]
        mini_batches, _ = algorithm.rollout_passes
        rows = min(micro, n // mini_batches)
        engine, initial = self.engine(rows, -(-(n // mini_batches) // rows))
        named = list(engine.module.named_parameters())
        with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=0):
            for (_, p), x in zip(named, initial):
                p.data.copy_(x)  # every update starts from the same weights
        engine.optimizer.refresh_fp32_params()  # ZeRO-3's fp32 master partitions too
        metrics = update(SGDPolicy(engine), scored, algorithm, micro_batch_size=micro,
                         temperature=C.TEMPERATURE, max_new_tokens=C.MAX_NEW, micro_batch_tokens=tokens,
                         tis=algorithm.tis_level(off_trainer_sampler=False))
        with deepspeed.zero.GatheredParameters([p for _, p in named]):
            delta = {k: p.data.clone() - x for (k, p), x in zip(named, initial)}
        return delta, metrics


def main(model_dir: str, out_file: str, lr: float, micros: list[int]) -> None:
    rank, world = init_distributed()
    data, groups = C.make_sequences(), C.rank_groups(world, rank)
    scored = rank_batch(data, groups)
    samples = scored.rollout.policy
    samples.sampler_logprobs = sampler_logprobs(model_dir, data, groups, samples.completion_mask.shape[1])
    harness, results = Harness(model_dir, lr, world), {}
    for name, overrides in C.cases():
        for micro in micros:
            delta, metrics = harness.update(scored, name, overrides, micro)
            results[C.case_key(name, overrides, micro, world)] = {"delta": delta, "metrics": metrics}
        if overrides.get("loss_aggregation") == "micro_batch_token_mean":
            continue  # that mode depends on the micro-batch layout by definition
        for budget in C.TOKEN_BUDGETS:  # micro-batches by tokens: a different number on each rank
            delta, metrics = harness.update(scored, name, overrides, max(micros), tokens=budget)
            results[C.case_key(name, overrides, f"tokens{budget}", world)] = {"delta": delta, "metrics": metrics}
    if rank == 0:
        torch.save(results, out_file)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], float(sys.argv[3]), [int(x) for x in sys.argv[4:]])
