"""Integration: the real DeepSpeed ZeRO-3 engines on CPU with a tiny random Llama, 1 rank in-process.

(2 ranks run through torchrun in tests/test_multirank.py.)
"""

import json
import math

import deepspeed
import pytest
import torch

from aapo_app.config import load_run_config
from aapo_app.metrics import glossary_key
from aapo_app.generation import DeepSpeedGenerator, Sampling, encode_prompts
from aapo_app.rollout import stream_seed
from aapo_app.trainer import Trainer


def tiny_overrides(model_dir, out_dir, *extra):
    return [
        f"model.path={model_dir}", f"output_dir={out_dir}", "rollout.group_size=4", "rollout.prompts_per_rank=2",
        "rollout.max_new_tokens=6", "train.micro_batch_size=4", "train.max_steps=2", "data.eval_size=4",
        "train.eval_max_new_tokens=6", "rewards.num_workers=1", "train.learning_rate=1e-3",
        "rewards.weights={test_char_length: 1.0, boxed_format: 0.5}", "precision=fp32", *extra,
    ]


def train_run(cfg) -> Trainer:
    """Build a Trainer, train it to the end and close it; returns it for its state and output dir."""
    trainer = Trainer(cfg)
    try:
        trainer.train()
    finally:
        trainer.close()
    return trainer


def last_metrics(trainer) -> dict:
    return json.loads((trainer.output_dir / "metrics.jsonl").read_text().splitlines()[-1])


def full_params(zero_model) -> dict[str, torch.Tensor]:
    """Unpartitioned copies of every parameter of a ZeRO-3 model."""
    params = dict(zero_model.module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values())):
        return {name: p.data.clone() for name, p in params.items()}


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    """Two AAPO steps on the tiny model; returns the trainer and parameter snapshots."""
    out = tmp_path_factory.mktemp("runs") / "aapo"
    trainer = Trainer(load_run_config(None, tiny_overrides(tiny_model_dir, out)))
    before_policy, before_ref = full_params(trainer.policy), full_params(trainer.reference)
    summary = trainer.train()
    yield trainer, summary, before_policy, before_ref
    trainer.close()


def test_two_steps_change_policy_not_reference(trained):
    trainer, summary, before_policy, before_ref = trained
    after_policy, after_ref = full_params(trainer.policy), full_params(trainer.reference)
    assert after_ref.keys() == before_ref.keys()
    for name in before_ref:  # the reference is frozen: bit-identical
        assert torch.equal(after_ref[name], before_ref[name]), name
    changed = [n for n in before_policy if not torch.equal(before_policy[n], after_policy[n])]
    assert len(changed) == len(before_policy), f"unchanged policy params: {set(before_policy) - set(changed)}"
    assert trainer.policy.engine.training and trainer.policy.module.training
    assert not trainer.reference.module.training
    assert summary["steps"] == 2 and 0.0 <= summary["eval_after"] <= 1.0
    # 8 sequences per rank in micro-batches of 4: 2 accumulation steps, one optimizer step per rollout
    assert trainer.policy.engine.gradient_accumulation_steps() == 2
    assert trainer.policy.engine.global_steps == 2


def test_metrics_written_and_defined(trained):
    trainer, *_ = trained
    lines = [json.loads(x) for x in (trainer.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [0, 1, 2]
    for m in lines[1:]:
        for key in m:
            glossary_key(key)  # raises if a logged key is not defined in metrics.METRICS
        for key in ("reward/mean", "ref_reward/mean", "accuracy", "format_rate", "advantage/mean",
                    "algo/zero_std_group_frac", "algo/momentum_clip_low_frac", "algo/momentum_clip_high_frac", "loss",
                    "grad_norm", "completion_len/mean", "truncated_frac", "rollout_tokens_per_s",
                    "update_tokens_per_s", "step_seconds"):
            assert key in m, key
    assert "eval/accuracy" in lines[0] and "eval/accuracy" in lines[-1]
    groups = [json.loads(x) for x in (trainer.output_dir / "rollouts" / "rank0.jsonl").read_text().splitlines()]
    assert len(groups) == 2 * 2 and all(len(g["completions"]) == 4 == len(g["ref_completions"]) for g in groups)


def test_generation_mode_returns_to_training_and_repartitions(trained):
    trainer, *_ = trained
    with trainer.policy.generation_mode() as gen:
        assert not gen.training
        assert all(p.numel() > 0 for p in gen.parameters())
    assert trainer.policy.module.training
    # one rank: the "auto" persistence threshold marks every parameter persistent (once a forward has
    # gathered it, ZeRO-3's hooks neither release nor fetch it again); with several ranks none is
    assert all(p.ds_persist for p in trainer.policy.module.parameters())
    assert trainer.ds_policy["zero_optimization"]["stage3_param_persistence_threshold"] == 10 ** 12


def test_reference_group_is_sampled_from_reference_weights(trained, tiny_model_dir):
    """Make the policy differ from the reference; each group must match its own model's samples."""
    from transformers import AutoModelForCausalLM

    trainer, *_ = trained
    lm_head = trainer.policy.module.lm_head.weight
    with deepspeed.zero.GatheredParameters([lm_head], modifier_rank=0):
        lm_head.data.mul_(25.0)  # a much sharper policy
    policy_weights = full_params(trainer.policy)
    ref_weights = full_params(trainer.reference)

    examples = trainer.train_examples[:2]
    prompts = trainer._prompts(examples)
    step, cfg = 7, trainer.cfg
    batch = trainer.rollout(examples, prompts, step)

    ids, mask = encode_prompts(trainer.tokenizer, prompts, add_special_tokens=False)
    G = cfg.rollout.group_size

    def plain_samples(weights, stream):
        """aapo's decoding loop (the default rollout.sampler) on a plain copy of ``weights``, seeded as
        the rollout seeds that stream."""
        from aapo_app.sampler import decode

        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        model.load_state_dict(weights)
        model.eval()
        with torch.no_grad():
            return decode(model, ids, mask, num_samples=G, max_new_tokens=cfg.rollout.max_new_tokens,
                          temperature=cfg.rollout.temperature, top_p=1.0, top_k=0, eos_ids=trainer.generator.eos_ids,
                          pad_id=trainer.tokenizer.pad_token_id,
                          generator=torch.Generator().manual_seed(stream_seed(cfg.train.seed, step, 0, stream)))

    width = ids.shape[1]
    ref_expected = plain_samples(ref_weights, "reference")
    pol_expected = plain_samples(policy_weights, "policy")
    got_ref = batch.reference.sequences[:, width:width + ref_expected.shape[1]]
    got_pol = batch.policy.sequences[:, width:width + pol_expected.shape[1]]
    assert torch.equal(got_ref, ref_expected)
    assert torch.equal(got_pol, pol_expected)
    # and the two groups really differ (not the policy's samples reused, not the prompt tokens)
    assert not torch.equal(got_ref, got_pol)
    assert not torch.equal(got_ref[:, : min(width, got_ref.shape[1])], ids.repeat_interleave(G, 0)[:, : got_ref.shape[1]])
    # undo for the other tests of this module
    with deepspeed.zero.GatheredParameters([lm_head], modifier_rank=0):
        lm_head.data.div_(25.0)


@pytest.mark.parametrize("name,extra", [("grpo", ["algorithm.beta=0.04"]), ("gpg", []), ("dr_grpo", []),
                                        ("dapo", []), ("dr_grpo", ["algorithm.beta=0.04"])])
def test_baselines_run(tiny_model_dir, tmp_path, name, extra):
    cfg = load_run_config(None, tiny_overrides(tiny_model_dir, tmp_path / name, f"algorithm.name={name}",
                                               "train.max_steps=1", *extra))
    trainer = Trainer(cfg)
    try:
        before = full_params(trainer.policy)
        trainer.train()
        after = full_params(trainer.policy)
    finally:
        trainer.close()
    # only a KL term (beta > 0) needs the reference; none of these samples it
    assert (trainer.reference is not None) == ("algorithm.beta=0.04" in extra)
    assert any(not torch.equal(before[n], after[n]) for n in before)
    last = last_metrics(trainer)
    assert "ref_reward/mean" not in last
    for key in last:
        glossary_key(key)  # raises if a logged key is not defined in metrics.METRICS
    assert {key[len("algo/"):] for key in last if key.startswith("algo/")} <= set(trainer.algorithm.metrics)


def test_deepspeed_hybrid_engine_is_refused_where_its_kernels_cannot_run(smollm2_dir):
    """On CPU there are no kernels at all; on CUDA, transformers 5 layers and SmolLM2's grouped-query
    attention (3 kv heads, 9 heads) both broke DeepSpeed 0.19.8's hybrid engine on an H100."""
    from transformers import AutoConfig

    from aapo_app.engine import check_hybrid_engine
    from aapo_app.errors import AapoError

    import transformers

    config = AutoConfig.from_pretrained(smollm2_dir)
    if not torch.cuda.is_available():
        with pytest.raises(AapoError, match="needs CUDA"):
            check_hybrid_engine(config)
        return
    expected = "transformers" if int(transformers.__version__.split(".")[0]) >= 5 else "grouped-query attention"
    with pytest.raises(AapoError, match=expected):
        check_hybrid_engine(config)


def test_layerwise_generation_matches_full_gather(trained):
    """rollout.gather=layerwise samples on the partitioned model through ZeRO-3's hooks; greedy
    completions must equal those of the full-gather view."""
    trainer, *_ = trained
    ids, mask = encode_prompts(trainer.tokenizer, trainer._prompts(trainer.eval_examples[:3]), add_special_tokens=False)
    kwargs = dict(num_samples=1, sampling=Sampling(6), seed=0)
    full = trainer.generator.sample(ids, mask, **kwargs)
    trainer.policy.gather = "layerwise"
    try:
        layerwise = trainer.generator.sample(ids, mask, **kwargs)
    finally:
        trainer.policy.gather = "full"
    assert torch.equal(full.sequences, layerwise.sequences)
    assert trainer.policy.module.training


def test_aapo_sampler_matches_generate_on_the_engine(trained):
    """rollout.sampler=aapo (one prefill per prompt, own cache and loop) on the engine's generation
    mode gives exactly generate's greedy samples: tokens, masks, lengths, texts, truncation."""
    trainer, *_ = trained
    ids, mask = encode_prompts(trainer.tokenizer, trainer._prompts(trainer.eval_examples[:3]), add_special_tokens=False)
    eos, kwargs = trainer.generator.eos_ids, dict(num_samples=2, sampling=Sampling(7), seed=0)
    ours = DeepSpeedGenerator(trainer.policy, trainer.tokenizer, eos, sampler="aapo", chunk=4).sample(ids, mask, **kwargs)
    hf = DeepSpeedGenerator(trainer.policy, trainer.tokenizer, eos, sampler="hf", chunk=4).sample(ids, mask, **kwargs)
    width = hf.sequences.shape[1]  # generate stops at the longest row, aapo's loop pads to max_new_tokens
    assert torch.equal(ours.sequences[:, :width], hf.sequences)
    assert not ours.completion_mask[:, hf.completion_mask.shape[1]:].any()
    assert torch.equal(ours.lengths, hf.lengths) and torch.equal(ours.truncated, hf.truncated)
    assert ours.texts == hf.texts
    assert trainer.policy.module.training


def test_local_dataset_with_columns_and_system_prompt(tiny_model_dir, shared_dir, tmp_path):
    """A real local file (MATH train) with configured columns and a system prompt, one step."""
    source = shared_dir / "datasets" / "math_train" / "math_train.json"
    cfg = load_run_config(None, tiny_overrides(
        tiny_model_dir, tmp_path / "math", f"data.source={source}", "data.problem_column=problem",
        "data.answer_column=answer", "data.system_prompt=Reason step by step.", "train.max_steps=1",
        "data.eval_size=2", "data.max_train_examples=64"))
    trainer = Trainer(cfg)
    try:
        assert "Reason step by step." in trainer._prompts(trainer.train_examples[:1])[0]
        trainer.train()
    finally:
        trainer.close()
    problems = {ex.problem for ex in trainer.train_examples}
    groups = [json.loads(x) for x in (trainer.output_dir / "rollouts" / "rank0.jsonl").read_text().splitlines()]
    assert len(groups) == 2 and all(g["problem"] in problems for g in groups)


@pytest.mark.parametrize("weights,keep_by,rounds", [
    ("{boxed_format: 1.0}", "reward", 2),        # the random model never boxes: every group is flat, all tries used
    ("{test_char_length: 1.0}", "reward", 0),    # character lengths always differ: nothing to refill
    # the paper's rule: the random model is never correct (0 of G), so different lengths do not make
    # a group worth keeping and every try is used
    ("{test_char_length: 1.0}", "accuracy", 2),
])
def test_dapo_dynamic_sampling_refills_flat_groups(tiny_model_dir, tmp_path, weights, keep_by, rounds):
    cfg = load_run_config(None, tiny_overrides(tiny_model_dir, tmp_path / "dapo", "algorithm.name=dapo",
                                               "algorithm.max_resample_tries=2", "train.max_steps=1",
                                               f"algorithm.keep_groups_by={keep_by}", f"rewards.weights={weights}"))
    trainer = train_run(cfg)
    last = last_metrics(trainer)
    assert last["resample_rounds"] == rounds
    assert last["resample_kept_frac"] == (1.0 if rounds == 0 else 0.0)
    assert trainer.sampler.step == 1 + rounds  # each round drew the next prompts of the sampler
    groups = [json.loads(x) for x in (trainer.output_dir / "rollouts" / "rank0.jsonl").read_text().splitlines()]
    assert len(groups) == 2 and all(len(g["completions"]) == 4 for g in groups)  # the batch stays P x G


def test_select_groups_pads_to_common_widths():
    from aapo_app.batches import RolloutBatch, Samples, select_groups
    from aapo_app.data import PromptExample

    def samples(prompt_w, comp_w, fill):
        n = 2  # one group of G = 2
        return Samples(sequences=torch.full((n, prompt_w + comp_w), fill), attention_mask=torch.ones(n, prompt_w + comp_w, dtype=torch.bool),
                       completion_mask=torch.ones(n, comp_w, dtype=torch.bool), prompt_width=prompt_w,
                       texts=[f"{fill}a", f"{fill}b"], lengths=torch.full((n,), comp_w), truncated=torch.zeros(n, dtype=torch.bool))

    a = RolloutBatch(examples=[PromptExample("a", "pa", "1")], group_size=2, policy=samples(3, 2, 7))
    b = RolloutBatch(examples=[PromptExample("b", "pb", "2")], group_size=2, policy=samples(1, 4, 9))
    merged = select_groups([(b, 0), (a, 0)], pad_id=0)
    assert [ex.id for ex in merged.examples] == ["b", "a"] and merged.policy.texts == ["9a", "9b", "7a", "7b"]
    assert merged.policy.prompt_width == 3 and merged.policy.sequences.shape == (4, 3 + 4)
    # b: prompt left-padded by 2, completion full; a: prompt full, completion right-padded by 2
    assert merged.policy.sequences[0].tolist() == [0, 0, 9, 9, 9, 9, 9]
    assert merged.policy.attention_mask[0].tolist() == [False, False, True, True, True, True, True]
    assert merged.policy.sequences[2].tolist() == [7, 7, 7, 7, 7, 0, 0]
    assert merged.policy.completion_mask[2].tolist() == [True, True, False, False]


def test_grpo_several_updates_per_rollout(tiny_model_dir, tmp_path):
    """num_iterations = 2: two optimizer steps on one rollout, the second with ratio != 1 to pi_old."""
    cfg = load_run_config(None, tiny_overrides(tiny_model_dir, tmp_path / "grpo2", "algorithm.name=grpo",
                                               "algorithm.beta=0.0", "algorithm.num_iterations=2",
                                               "train.max_steps=1", "train.learning_rate=2e-2"))
    trainer = train_run(cfg)
    assert trainer.policy.engine.global_steps == 2
    last = last_metrics(trainer)
    # pass 1 has ratio exactly 1 (nothing clipped); a large step makes pass 2's ratios leave [0.8, 1.2]
    assert 0.0 < last["algo/ratio_clip_frac"] < 1.0


def test_gpg_regeneration(tiny_model_dir, tmp_path):
    cfg = load_run_config(None, tiny_overrides(tiny_model_dir, tmp_path / "gpg", "algorithm.name=gpg",
                                               "algorithm.regenerate=true", "algorithm.max_regenerate_tries=1",
                                               "train.max_steps=1", "rewards.weights={boxed_format: 1.0}"))
    trainer = train_run(cfg)
    last = last_metrics(trainer)
    assert last["resample_rounds"] == 1 and last["algo/alpha"] == 0.0  # all flat on a random model


def test_nonfinite_steps_are_skipped_counted_and_stop_the_run(tiny_model_dir, tmp_path):
    """Rewards near float32's maximum (3e38, tests/plugin_rewards.py) with Dr. GRPO's unnormalised
    advantages r - mean make the loss overflow to inf and the gradient non-finite: DeepSpeed skips
    every optimizer step (weights untouched), each is counted in skipped_nonfinite, and after
    train.max_nonfinite_steps = 2 in a row the run stops with a message that says what to try."""
    from aapo_app.errors import AapoError

    cfg = load_run_config(None, tiny_overrides(tiny_model_dir, tmp_path / "overflow", "train.max_steps=6",
                                               "algorithm.name=dr_grpo", "train.max_nonfinite_steps=2",
                                               "train.save_final=false", "rewards.weights={test_huge: 1.0}"))
    trainer = Trainer(cfg)
    try:
        before = full_params(trainer.policy)
        with pytest.raises(AapoError, match="2 steps in a row had a non-finite loss or gradient.*learning_rate"):
            trainer.train()
        after = full_params(trainer.policy)
    finally:
        trainer.close()
    assert [m["skipped_nonfinite"] for m in trainer.history] == [1.0, 1.0]
    assert not all(map(math.isfinite, [trainer.history[0]["loss"]]))  # the loss really was inf/NaN
    assert all(torch.equal(before[k], after[k]) for k in before)  # skipped steps left the weights alone


def test_nan_reward_is_a_clear_error(tiny_model_dir, tmp_path):
    from aapo_app.errors import AapoError

    trainer = Trainer(load_run_config(None, tiny_overrides(tiny_model_dir, tmp_path / "nan", "train.save_final=false",
                                                           "rewards.weights={test_nan: 1.0}")))
    try:
        with pytest.raises(AapoError, match="reward 'test_nan' returned NaN or inf for 8 of 8 completions"):
            trainer.train()
    finally:
        trainer.close()


def test_failed_save_keeps_the_previous_checkpoint(tiny_model_dir, tmp_path, monkeypatch):
    """A save that fails (here: the disk is full while the weights are written) raises a one-line
    error naming the intact previous checkpoint, and leaves no half-written directory."""
    import errno

    from aapo_app.engine import ZeroModel
    from aapo_app.errors import AapoError

    out = tmp_path / "run"
    cfg = load_run_config(None, tiny_overrides(tiny_model_dir, out, "train.max_steps=2", "train.save_every=1"))
    trainer = Trainer(cfg)
    real_save, calls = ZeroModel.save_pretrained, []

    def full_disk(self, path, tokenizer=None):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(self, path, tokenizer)

    monkeypatch.setattr(ZeroModel, "save_pretrained", full_disk)
    try:
        with pytest.raises(AapoError) as info:
            trainer.train()
    finally:
        trainer.close()
    message = str(info.value)
    assert message.startswith("checkpoint step-2 could not be written (No space left on device; ")
    assert "MiB free on the disk); the previous checkpoint step-1 is intact" in message
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-1"]
    assert (out / "checkpoints" / "step-1" / "trainer_state.json").is_file()


def test_disk_space_is_checked_before_training(tiny_model_dir, tmp_path, monkeypatch):
    import shutil as sh
    from collections import namedtuple

    from aapo_app.errors import AapoError

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(sh, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(AapoError, match="GiB free on the run directory's disk; this run needs about .* for 1 more"):
        Trainer(load_run_config(None, tiny_overrides(tiny_model_dir, tmp_path / "full")))


@pytest.mark.slow
def test_wandb_offline_tensorboard_and_sample_tables(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """report_to wandb + tensorboard without an API key: wandb runs offline and the sync command is
    printed; TensorBoard gets every metric; the rollout sample table has AAPO's advantage terms, and
    the group term plus the momentum term is the advantage."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    out = tmp_path / "tracked"
    cfg = load_run_config(None, tiny_overrides(tiny_model_dir, out, "train.report_to=[wandb, tensorboard]",
                                               "train.log_samples_every=2", "train.tags=[test]",
                                               "train.save_final=false"))
    train_run(cfg)
    err = capsys.readouterr().err
    assert "wandb: offline (no wandb API key" in err and "upload it with: wandb sync" in err
    assert list((out / "wandb").glob("offline-run-*"))
    info = json.loads((out / "run_info.json").read_text())
    assert len(info["git_commit"]) >= 7
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert {"reward/mean", "loss", "algo/momentum_clip_high_frac", "eval/accuracy"} <= set(scalars)
    assert [e.step for e in events.Scalars("loss")] == [1, 2]
    table = (out / "samples" / "step-2.md").read_text()
    header = table.splitlines()[2]
    for col in ("prompt", "completion", "ref_completion", "reward/test_char_length", "advantage",
                "advantage/group_term", "advantage/momentum"):
        assert f" {col} " in header, col
    assert (out / "samples" / "step-1.md").is_file()


def test_advantage_parts_sum_to_the_advantage():
    """AAPO's parts by hand: rewards [1, 0], reference [0, 0]; mean 0.5, unbiased std 0.7071:
    group term ±0.5/(0.7071+1e-4) = ±0.70700; momentum clip([1, 0], -0.2, 0.28) = [0.28, 0]."""
    from aapo_app.algorithms import build_algorithm

    out = build_algorithm("aapo").advantages(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 0.0]]))
    g = 0.5 / (math.sqrt(0.5) + 1e-4)
    assert out.parts["group_term"].tolist()[0] == pytest.approx([g, -g], rel=1e-6)
    assert out.parts["momentum"].tolist()[0] == pytest.approx([0.28, 0.0], abs=1e-6)
    assert torch.allclose(out.parts["group_term"] + out.parts["momentum"], out.advantages)


def test_export_gives_the_training_engines_logits(tiny_model_dir, tmp_path):
    """`aapo export` merges the ZeRO-3 partitions of a checkpoint into a HF directory whose model
    gives exactly the trained engine's logits."""
    from click.testing import CliRunner
    from transformers import AutoModelForCausalLM

    from aapo_app.cli import main

    out = tmp_path / "run"
    trainer = Trainer(load_run_config(None, tiny_overrides(tiny_model_dir, out)))
    try:
        trainer.train()
        ids = torch.tensor([[1, 5, 9, 200, 3000, 17]])
        with trainer.policy.generation_mode() as module:
            engine_logits = module(input_ids=ids).logits.clone()
    finally:
        trainer.close()
    result = CliRunner().invoke(main, ["export", str(out), "--out", str(tmp_path / "hf")])
    assert result.exit_code == 0, result.output
    exported = tmp_path / "hf"
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= {
        p.name for p in exported.iterdir()}
    model = AutoModelForCausalLM.from_pretrained(exported)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, engine_logits)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        assert not torch.equal(base(input_ids=ids).logits, engine_logits)  # training changed it
    again = CliRunner().invoke(main, ["export", str(out), "--out", str(exported)])
    assert again.exit_code == 2 and "not empty" in again.output
    missing = CliRunner().invoke(main, ["export", str(out), "--step", "7", "--out", str(tmp_path / "x")])
    assert missing.exit_code == 2 and "saved steps: 2" in missing.output
