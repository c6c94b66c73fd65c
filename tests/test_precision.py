"""``precision: auto | fp32 | bf16``: the choice for each kind of machine, what it does to the
DeepSpeed configs, and a bf16 ZeRO-3 update against the same update written out in plain torch."""

import math

import pytest
import torch

from aapo_app.errors import AapoError
from aapo_app.precision import bf16_hardware, resolve_precision

AUTO = {"bf16": {"enabled": "auto"}}


@pytest.mark.parametrize("flags, cuda, want", [
    ({"avx2", "avx512f"}, False, None),  # AVX2/AVX-512 without bf16 instructions: emulated, slower
    ({"avx2", "avx512f", "avx512_bf16"}, False, "avx512_bf16"),
    ({"avx512_bf16", "amx_bf16", "amx_tile"}, False, "amx_bf16"),  # AMX named first
    (set(), True, "cuda"),
])
def test_bf16_hardware_from_the_cpu_flags_or_a_gpu(flags, cuda, want):
    assert bf16_hardware(flags, cuda) == want


@pytest.mark.parametrize("choice, ds, hardware, want", [
    ("auto", AUTO, None, "fp32"),
    ("auto", AUTO, "avx512_bf16", "bf16"),
    ("auto", AUTO, "cuda", "bf16"),
    ("auto", {}, "amx_bf16", "bf16"),  # no bf16 section at all: the run decides
    ("fp32", AUTO, "cuda", "fp32"),
    ("bf16", AUTO, None, "bf16"),  # asked for: honoured, with a word on the cost
    ("auto", {"bf16": {"enabled": False}}, "cuda", "fp32"),  # the file (e.g. a resumed run's) decides
    ("auto", {"bf16": {"enabled": True}}, None, "bf16"),
    ("bf16", {"bf16": {"enabled": True}}, None, "bf16"),
    ("auto", {"fp16": {"enabled": True}}, "cuda", "fp16"),
])
def test_the_choice(choice, ds, hardware, want):
    got = resolve_precision(choice, ds, probe=False, hardware=hardware)
    assert got.name == want
    if choice == "bf16" and hardware is None and "auto" in str(ds):
        assert "slower than fp32" in got.reason


@pytest.mark.parametrize("choice, ds, words", [
    ("fp32", {"bf16": {"enabled": True}}, "precision=fp32 disagrees with the DeepSpeed config's bf16.enabled=true"),
    ("bf16", {"bf16": {"enabled": False}}, "precision=bf16 disagrees with the DeepSpeed config's bf16.enabled=false"),
    ("bf16", {"fp16": {"enabled": True}}, "precision=bf16 but the DeepSpeed config enables fp16"),
])
def test_a_conflict_with_the_deepspeed_config_is_one_line(choice, ds, words):
    with pytest.raises(AapoError, match=words) as err:
        resolve_precision(choice, ds, probe=False, hardware="cuda")
    assert "\n" not in str(err.value)


def test_the_probe_measures_both_formats():
    got = resolve_precision("fp32", AUTO, probe=True, hardware=None)
    assert got.fp32_gflops > 0 and got.bf16_gflops > 0
    assert "matmul probe: bf16" in got.describe() and got.as_dict()["name"] == "fp32"


def test_fill_ds_config_sets_bf16_from_the_precision(tiny_model_dir):
    from aapo_app.config import load_run_config
    from aapo_app.ds_config import fill_ds_config, fill_inference_ds_config, read_ds_config

    for precision, enabled in (("fp32", False), ("bf16", True)):
        cfg = load_run_config(None, [f"model.path={tiny_model_dir}", f"precision={precision}"])
        assert fill_ds_config(read_ds_config(None, "zero3_cpu.json"), cfg, 1)["bf16"]["enabled"] is enabled
        ref = fill_ds_config(read_ds_config(None, "zero3_inference_cpu.json"), cfg, 1, training=False)
        assert ref["bf16"]["enabled"] is enabled
        assert fill_inference_ds_config(read_ds_config(None, "zero3_inference_cpu.json"), 1,
                                        precision=precision)["bf16"]["enabled"] is enabled
    # a file that sets it keeps it (precision=auto)
    cfg = load_run_config(None, [f"model.path={tiny_model_dir}"])
    assert fill_ds_config(read_ds_config(None, "zero3_bf16.json"), cfg, 1)["bf16"]["enabled"] is True


def full_params(zero_model) -> dict[str, torch.Tensor]:
    import deepspeed

    params = dict(zero_model.module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values())):
        return {name: p.data.clone() for name, p in params.items()}


def _fixed_batch(tok, examples, G, T, seed=0):
    """Prompts with G made-up completions each (token ids drawn at random) and fixed advantages."""
    from aapo_app.batches import RolloutBatch, ScoredBatch
    from aapo_app.generation import encode_prompts, samples_from_rows

    g = torch.Generator().manual_seed(seed)
    ids, mask = encode_prompts(tok, [ex.problem for ex in examples], add_special_tokens=False)
    lengths = [[3, T, 5, 2], [T, 1, 4, 6]]
    rows = [torch.randint(3, 200, (1, lengths[p][j]), generator=g) for p in range(len(examples)) for j in range(G)]
    samples = samples_from_rows(tok, ids, mask, rows, G, [-1], T)
    adv = torch.tensor([[1.0, -1.0, 0.5, -0.5], [-1.5, 0.5, 0.5, 0.5]])
    rollout = RolloutBatch(examples=examples, group_size=G, policy=samples, reference=None, ref_logprobs=None,
                           seconds=0.0)
    return ScoredBatch(rollout=rollout, rewards=torch.zeros_like(adv), advantages=adv, reward_parts={},
                       ref_rewards=None, advantage_parts={})


def test_a_bf16_update_is_adamw_on_fp32_master_weights_of_the_bf16_gradient(tiny_model_dir, tmp_path):
    """GPG, one optimizer step on a fixed batch on the bf16 ZeRO-3 engine. The formula, in plain torch
    on unpadded rows: the loss −Σ_i Σ_t A_i log π(o_it) / Σ_i |o_i| (GPG's token mean) of a bf16 copy of
    the model (log-softmax in fp32), its bf16 gradient, then one AdamW step (β = 0.9, 0.999, ε = 1e-8,
    no weight decay) on fp32 master weights: Δ = −lr · g / (|g| + ε) on the first step. The engine's
    weights must stay bf16, its master weights fp32, and its change must be that Δ rounded to bf16."""
    import copy

    from transformers import AutoModelForCausalLM

    from aapo_app.algorithms import build_algorithm
    from aapo_app.config import load_run_config
    from aapo_app.data import load_examples
    from aapo_app.ds_config import fill_ds_config, read_ds_config
    from aapo_app.engine import ZeroModel, init_distributed
    from aapo_app.models import load_causal_lm, load_tokenizer
    from aapo_app.update import update

    lr, G, T = 1e-2, 4, 7
    init_distributed()
    cfg = load_run_config(None, [f"model.path={tiny_model_dir}", "precision=bf16", "algorithm.name=gpg",
                                 "rollout.prompts_per_rank=2", f"rollout.group_size={G}", "train.micro_batch_size=8",
                                 f"rollout.max_new_tokens={T}", "rollout.temperature=1.0"])
    ds = fill_ds_config(read_ds_config(None, "zero3_cpu.json"), cfg, 1)
    assert ds["bf16"]["enabled"] is True
    policy = ZeroModel(load_causal_lm(str(tiny_model_dir), ds_config=ds), ds, trainable=True, learning_rate=lr)
    assert all(p.dtype == torch.bfloat16 for p in policy.module.parameters())
    masters = policy.engine.optimizer.fp32_partitioned_groups_flat
    assert masters and all(m.dtype == torch.float32 for m in masters)

    tok = load_tokenizer(str(tiny_model_dir))
    examples = load_examples(cfg.data, 0)[0][:2]
    batch = _fixed_batch(tok, examples, G, T)
    before = full_params(policy)
    algorithm = build_algorithm("gpg", cfg.algorithm.params)
    update(policy, batch, algorithm, micro_batch_size=8, temperature=1.0, max_new_tokens=T)
    after = full_params(policy)

    # the formula
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    plain.load_state_dict({k: v.float() for k, v in before.items()}, strict=False)
    master = {k: p.detach().clone() for k, p in plain.named_parameters()}
    model = copy.deepcopy(plain).to(torch.bfloat16)
    s = batch.rollout.policy
    total, loss = 0, 0.0
    for i in range(s.sequences.shape[0]):
        keep = s.attention_mask[i].bool()
        seq = s.sequences[i][keep]
        n_c = int(s.completion_mask[i].sum())
        logits = model(input_ids=seq[None]).logits[0, -n_c - 1:-1].float()
        logp = torch.log_softmax(logits, -1).gather(-1, seq[-n_c:, None]).squeeze(-1)
        loss = loss - float(batch.advantages.view(-1)[i]) * logp.sum()
        total += n_c
    (loss / total).backward()
    want = {}
    for k, p in model.named_parameters():
        if p.grad is None:
            continue
        g = p.grad.float()
        # AdamW's first step: m = (1-β1) g / (1-β1), v = (1-β2) g² / (1-β2)
        want[k] = (master[k] - lr * g / (g.abs() + 1e-8)).to(torch.bfloat16).float() - before[k].float()
    got = {k: after[k].float() - before[k].float() for k in want}
    assert all(after[k].dtype == torch.bfloat16 for k in want)
    num = math.sqrt(sum(float(((got[k] - want[k]) ** 2).sum()) for k in want))
    den = math.sqrt(sum(float((want[k] ** 2).sum()) for k in want))
    assert den > 0
    # the engine packs rows differently (other bf16 rounding of the same sums): elements whose tiny
    # gradient changes sign move by 2·lr the other way; measured 0.026 (twice the lr: 1.0, SGD: ~1)
    assert num / den < 0.1, num / den


def test_aapo_train_prints_and_records_the_precision(tiny_model_dir, tmp_path):
    """``precision=bf16`` on the CLI: the line on stderr, the filled DeepSpeed configs, run_info.json
    and the TIS metrics (bf16 rollouts on aapo's sampler turn algorithm.tis=auto on). The run also
    sets rollout.ignore_eos (the speed benchmarks' fixed-length completions): every completion of
    the policy has exactly rollout.max_new_tokens tokens."""
    import json
    import subprocess
    import sys

    from helpers import REPO, subprocess_env

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "aapo_app", "train", "--max-steps", "1", "--output-dir", str(out),
           f"model.path={tiny_model_dir}", "precision=bf16", "rollout.group_size=2", "rollout.prompts_per_rank=2",
           "rollout.max_new_tokens=4", "train.micro_batch_size=4", "data.eval_size=2", "train.eval_max_new_tokens=4",
           "rewards.num_workers=1", "train.save_final=false", "rollout.ignore_eos=true"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "precision: bf16 (asked for" in proc.stderr
    assert "truncated importance sampling: token level" in proc.stderr
    for name in ("ds_config.json", "ds_config_reference.json"):
        assert json.loads((out / name).read_text())["bf16"]["enabled"] is True
    info = json.loads((out / "run_info.json").read_text())
    assert info["precision"]["name"] == "bf16" and info["tis"] == "token"
    step = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert "tis/logprob_abs_diff" in step and step["tis/logprob_abs_diff"] >= 0
    assert step["completion_len/min"] == step["completion_len/max"] == 4
