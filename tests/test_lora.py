"""LoRA (model.lora, aapo_app/lora.py): adapters on a frozen base under real ZeRO-2/3 engines (tiny
random Llama, CPU), the base with adapters disabled as the reference, adapter-only checkpoints,
resume, export, evaluation of adapter checkpoints, the reference cache, the vLLM adapter push
without vLLM, and bad input. 2 ranks through torchrun at the end (slow)."""

import json
import sys
from pathlib import Path

import deepspeed
import pytest
import torch
from safetensors.torch import load_file

from aapo_app.builder import open_model, reference_model
from aapo_app.config import load_run_config
from aapo_app.ds_config import PACKAGED_DS_CONFIGS
from aapo_app.errors import AapoError
from aapo_app.generation import DeepSpeedGenerator, Sampling, encode_prompts
from aapo_app.lora import (AdapterPublisher, BaseGenerator, BaseScorer, LoraSettings, adapter_parameters,
                           check_checkpoint_matches, gather_adapter_state, vllm_max_lora_rank)
from aapo_app.trainer import Trainer
from helpers import free_port, run
from test_cli import assert_one_line_error
from test_engine import full_params, tiny_overrides

LORA = ["model.lora.rank=4", "train.learning_rate=1e-2", "rewards.plugins=[plugin_rewards]"]


def lora_cfg(model_dir, out, *extra):
    return load_run_config(None, tiny_overrides(model_dir, out, *LORA, *extra))


def train(cfg, **kwargs) -> Trainer:
    trainer = Trainer(cfg, **kwargs)
    try:
        trainer.train()
    finally:
        trainer.close()
    return trainer


def make_adapter_nonzero(module, seed=1):
    """Every adapter B matrix (zero at start: the policy equals the base) set to random values."""
    named = adapter_parameters(module)
    with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=0):
        g = torch.Generator().manual_seed(seed)
        for name, p in named:
            if "lora_B" in name:
                p.data.copy_(torch.randn(p.shape, generator=g) * 0.5)


# --------------------------------------------------------------------------- the base as the reference


def test_reference_is_exactly_the_base_and_the_policy_is_not(tiny_model_dir, tmp_path):
    """The guard: with a non-zero adapter, the reference group (sampled by the policy's own generator
    with adapters off, also inside the policy's session as the rollout does) and the reference
    log-probs are bit-identical to those of a separate engine holding the base weights; the
    policy's samples and log-probs differ; and switching the adapters back on restores the policy."""
    trainer = Trainer(lora_cfg(tiny_model_dir, tmp_path / "run"))
    try:
        assert trainer.reference is None  # AAPO needs no log-probs: nothing built for the reference at all
        assert isinstance(trainer.rollout.reference, BaseGenerator)
        make_adapter_nonzero(trainer.policy.module)
        files = open_model(str(tiny_model_dir), 0)
        base = reference_model(files, trainer.ds_ref)
        base_gen = DeepSpeedGenerator(base, files.tokenizer, files.eos_ids, role="reference")
        ids, mask = encode_prompts(files.tokenizer, ["What is 2+3?", "Compute seven times six, please."], True)
        kw = dict(num_samples=4, sampling=Sampling(12, 1.0), seed=123)
        expected = base_gen.sample(ids, mask, **kw)
        with trainer.generator.session():  # as in a rollout: policy then reference in one session
            policy = trainer.generator.sample(ids, mask, **kw)
            reference = trainer.rollout.reference.sample(ids, mask, **kw)
        alone = trainer.rollout.reference.sample(ids, mask, **kw)
        again = trainer.generator.sample(ids, mask, **kw)
        for got in (reference, alone):
            assert torch.equal(got.sequences, expected.sequences)
            assert torch.equal(got.sampler_logprobs, expected.sampler_logprobs)
        assert not torch.equal(policy.sampler_logprobs, expected.sampler_logprobs)
        assert torch.equal(again.sequences, policy.sequences) and torch.equal(again.sampler_logprobs,
                                                                              policy.sampler_logprobs)
        # the KL baselines' reference log-probs, on the policy's own samples
        seqs, att, width = policy.sequences, policy.attention_mask, policy.prompt_width
        with torch.no_grad():
            want = base.completion_logprobs(seqs, att, width, 0.7)
            got = BaseScorer(trainer.policy).completion_logprobs(seqs, att, width, 0.7)
            pol = trainer.policy.completion_logprobs(seqs, att, width, 0.7)
        assert torch.equal(got, want)
        assert (pol - want).abs().max() > 1e-3
        assert all(p.requires_grad for _, p in adapter_parameters(trainer.policy.module))
        assert trainer.policy.engine.training  # back in training mode after scoring
    finally:
        trainer.close()


def test_kl_baselines_score_the_reference_on_the_base_unless_an_engine_is_asked_for(tiny_model_dir, tmp_path):
    cfg = lora_cfg(tiny_model_dir, tmp_path / "a", "algorithm.name=grpo", "algorithm.beta=0.04", "train.max_steps=1")
    trainer = train(cfg)
    assert isinstance(trainer.reference, BaseScorer) and trainer.rollout.reference is None
    assert "kl" in json.dumps(json.loads((trainer.output_dir / "metrics.jsonl").read_text().splitlines()[1]))
    cfg = lora_cfg(tiny_model_dir, tmp_path / "b", "model.lora.reference=engine", "train.max_steps=1")
    trainer = train(cfg)
    assert isinstance(trainer.rollout.reference, DeepSpeedGenerator)  # a separate frozen engine
    assert trainer.rollout.reference.model is trainer.reference


# --------------------------------------------------------------------------- training, ZeRO-3 and ZeRO-2


@pytest.mark.parametrize("ds", ["zero3_cpu.json", "zero2_cpu.json"])
def test_only_the_adapters_train_and_only_they_have_optimizer_state(tiny_model_dir, tmp_path, ds):
    trainer = Trainer(lora_cfg(tiny_model_dir, tmp_path / "run"), ds_config=str(PACKAGED_DS_CONFIGS / ds))
    try:
        before = full_params(trainer.policy)
        trainer.train()
        after = full_params(trainer.policy)
    finally:
        trainer.close()
    adapters = {n for n, _ in adapter_parameters(trainer.policy.module)}
    assert adapters and all(".lora_A." in n or ".lora_B." in n for n in adapters)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed == adapters  # every adapter moved (A from step 2 on, once B is non-zero); the base did not
    adapter_numel = sum(before[n].numel() for n in adapters)
    total = sum(t.numel() for t in before.values())
    inner = trainer.policy.optimizer.optimizer  # DeepSpeed's ZeRO optimizer wraps torch's AdamW
    state = sum(s["exp_avg"].numel() for s in inner.state.values())
    assert adapter_numel <= state <= adapter_numel + 64, (state, adapter_numel)
    assert state < total / 20


# --------------------------------------------------------------------------- checkpoints, resume, export, eval


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    """A LoRA run of 4 steps (checkpoints at 2 and 4), and the same run stopped at step 2 and resumed."""
    root = tmp_path_factory.mktemp("lora-runs")
    common = ["train.save_every=2", "train.keep_checkpoints=0", "data.eval_size=2"]
    whole = train(lora_cfg(tiny_model_dir, root / "whole", "train.max_steps=4", *common))
    train(lora_cfg(tiny_model_dir, root / "parts", "train.max_steps=2", *common))
    step2 = root / "parts" / "checkpoints" / "step-2"
    resumed = train(lora_cfg(tiny_model_dir, root / "parts", "train.max_steps=4", *common), resume_from=step2)
    return whole.output_dir, resumed.output_dir


def test_a_checkpoint_holds_the_adapter_and_its_optimizer_state_only(runs):
    ckpt = runs[0] / "checkpoints" / "step-4"
    names = {p.name for p in ckpt.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "deepspeed", "trainer_state.json"} <= names
    assert not {"config.json", "model.safetensors"} & names
    adapter = load_file(ckpt / "adapter_model.safetensors")
    assert adapter and all(k.startswith("base_model.model.") and ".lora_" in k for k in adapter)
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["lora"]["rank"] == 4
    ds_bytes = sum(p.stat().st_size for p in (ckpt / "deepspeed").rglob("*") if p.is_file())
    assert ds_bytes < 300_000  # the tiny model's full fp32 weights alone are 3.3 MB


def test_resume_continues_exactly(runs):
    whole, parts = runs
    a = [json.loads(x) for x in (whole / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (parts / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in b] == [0, 1, 2, 3, 4]
    for ma, mb in zip(a[3:], b[3:]):
        for key in ("loss", "reward/mean", "grad_norm", "eval/accuracy"):
            if key in ma:
                assert ma[key] == mb[key], (key, ma[key], mb[key])
    wa = load_file(whole / "checkpoints" / "step-4" / "adapter_model.safetensors")
    wb = load_file(parts / "checkpoints" / "step-4" / "adapter_model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_export_writes_the_merged_model_or_the_adapter(runs, tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from aapo_app.export import export

    run_dir = runs[0]
    merged_dir = export(str(run_dir), str(tmp_path / "merged"), what="merged")
    adapter_dir = export(str(run_dir), str(tmp_path / "adapter"), what="adapter")
    assert (merged_dir / "config.json").is_file() and not (merged_dir / "adapter_config.json").exists()
    assert (adapter_dir / "adapter_config.json").is_file() and not (adapter_dir / "config.json").exists()
    # the adapter's weights are the checkpoint's (the fp32 master weights of the DeepSpeed state)
    exported = load_file(adapter_dir / "adapter_model.safetensors")
    saved = load_file(run_dir / "checkpoints" / "step-4" / "adapter_model.safetensors")
    assert exported.keys() == saved.keys() and all(torch.equal(exported[k], saved[k]) for k in saved)
    ids = torch.tensor([[1, 50, 60, 70, 80, 90]])
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        base_logits = base(ids).logits
        with_adapter = PeftModel.from_pretrained(base, str(adapter_dir))(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(merged_dir)(ids).logits
    assert torch.allclose(merged, with_adapter, atol=1e-5)
    assert (merged - base_logits).abs().max() > 1e-3


def test_eval_run_evaluates_an_adapter_checkpoint_as_the_merged_model(runs, tmp_path):
    from transformers import AutoModelForCausalLM

    from aapo_app.evaluate import run_checkpoints
    from aapo_app.export import export
    from aapo_app.lora import merge_for_eval

    specs = run_checkpoints(str(runs[0]), "all")
    assert [s.source["step"] for s in specs] == [2, 4] and all(s.base_model for s in specs)
    path = merge_for_eval(specs[-1], tmp_path / "merged", 0)
    ids = torch.tensor([[1, 50, 60, 70]])
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(path)(ids).logits
        want = AutoModelForCausalLM.from_pretrained(export(str(runs[0]), str(tmp_path / "x")))(ids).logits
    assert torch.allclose(got, want, atol=1e-5)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("extra, words", [
    (["model.lora.rank=4", "model.lora.target_modules=[q_proj,attn_proj]"], ["model.lora.target_modules", "attn_proj",
                                                                             "q_proj"]),
    (["model.lora.rank=-2"], ["model.lora.rank", ">= 1"]),
    (["model.lora.target_modules=[q_proj]"], ["model.lora.rank=0", "model.lora.target_modules"]),
    (["model.lora.rank=4", "model.lora.target_modules=[lm_head]"], ["lm_head"]),
    (["model.lora.rank=4", "rollout.backend=vllm", "vllm.mode=server", "vllm.server_url=http://h:1"],
     ["vllm.mode=server", "colocate"]),
])
def test_bad_lora_settings_stop_in_one_line(tiny_model_dir, extra, words):
    assert_one_line_error(["check-config", f"model.path={tiny_model_dir}", *extra], words)


def test_resuming_a_lora_run_without_lora_stops_in_one_line(runs):
    run_dir = runs[0]
    assert_one_line_error(["train", "--resume", "latest", "--output-dir", str(run_dir), "--max-steps", "6",
                           "model.lora.rank=0"], ["model.lora.rank=4", "0"])
    state = json.loads((run_dir / "checkpoints" / "step-4" / "trainer_state.json").read_text())
    with pytest.raises(AapoError, match="holds LoRA adapters"):
        check_checkpoint_matches(state, LoraSettings(), "--resume")
    with pytest.raises(AapoError, match="differ from model.lora"):
        check_checkpoint_matches(state, LoraSettings(rank=8), "--resume")
    with pytest.raises(AapoError, match="holds full weights"):
        check_checkpoint_matches({}, LoraSettings(rank=4), "--resume")
    assert (run_dir / "checkpoints" / "step-4" / "adapter_model.safetensors").is_file()  # nothing lost


def test_reference_cache_works_with_lora_and_refuses_other_base_weights(tiny_model_dir, tmp_path):
    """The cache's fingerprint is the base's weights: a cache built from the base serves a LoRA run
    (its reference is the base), and one built from other weights at the same path is refused."""
    import shutil

    from transformers import LlamaForCausalLM

    from aapo_app.reference_cache import build

    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    extra = ["data.max_train_examples=6", "train.max_steps=1", f"rollout.reference_cache={tmp_path / 'cache'}"]
    build(lora_cfg(base, tmp_path / "unused", *extra), tmp_path / "cache", log=lambda m: None)
    trainer = train(lora_cfg(base, tmp_path / "run", *extra))
    assert trainer.rollout.cache is not None and trainer.rollout.reference is None
    torch.manual_seed(7)  # the same architecture at the same path, other weights
    LlamaForCausalLM(LlamaForCausalLM.config_class.from_pretrained(base)).save_pretrained(base)
    assert_one_line_error(["train", *tiny_overrides(base, tmp_path / "run2", *LORA, *extra)],
                          ["rollout.reference_cache", "reference_model.weights_sha256"])


# --------------------------------------------------------------------------- vLLM's side, without vLLM


def test_vllm_adapter_sync_pushes_a_new_adapter_version_only_after_a_change(tiny_model_dir, tmp_path):
    """The policy engine's session (vllm_engine.VLLMEngine) pushes through _push only when the trainer's
    weights changed; with LoRA a push writes the adapter (peft format, a new id per version) and
    deletes the previous version's files. vLLM itself is not needed for this part."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from aapo_app.vllm_engine import VLLMEngine

    trainer = Trainer(lora_cfg(tiny_model_dir, tmp_path / "run"))
    try:
        settings = trainer.cfg.model.lora
        publisher = AdapterPublisher(tmp_path / "adapters", settings, str(tiny_model_dir))

        class AdapterOnlyEngine(VLLMEngine):  # the schedule and the push of the real engine, no vLLM
            requests = []

            def _push(self):
                self.requests.append(publisher.publish(self._trainer_module))

        engine = AdapterOnlyEngine(trainer.tokenizer, [0])
        engine.follow(trainer.policy.module)
        with engine.session():
            pass
        assert engine.requests == []  # the adapters start at zero: the base the engine loaded is the policy
        make_adapter_nonzero(trainer.policy.module)
        engine.weights_changed()
        with engine.session():
            pass
        with engine.session():
            pass
        make_adapter_nonzero(trainer.policy.module, seed=2)
        engine.weights_changed()
        with engine.session():
            pass
        assert [(name, i) for name, i, _ in engine.requests] == [("aapo-policy-v1", 1), ("aapo-policy-v2", 2)]
        path = Path(engine.requests[-1][2])
        assert sorted(p.name for p in (tmp_path / "adapters").iterdir()) == ["v2"]
        # what vLLM would load is the trainer's adapter: peft loads it and computes the trainer's logits
        state = gather_adapter_state(trainer.policy.module)
        assert all(torch.equal(load_file(path / "adapter_model.safetensors")[k], v) for k, v in state.items())
        ids = torch.tensor([[1, 50, 60, 70]])
        peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(path))
        with torch.no_grad():
            want = trainer.policy.completion_logprobs(ids, torch.ones_like(ids), 1, 1.0)
            logits = peft_model(ids).logits[0, :-1].log_softmax(-1)
        got = logits.gather(-1, ids[0, 1:, None]).squeeze(-1)
        assert torch.allclose(got, want[0], atol=1e-5)
    finally:
        trainer.close()
    assert [vllm_max_lora_rank(r) for r in (1, 8, 9, 64, 300)] == [8, 8, 16, 64, 320]


# --------------------------------------------------------------------------- 2 ranks


@pytest.mark.slow
@pytest.mark.parametrize("ds", ["zero3_cpu.json", "zero2_cpu.json"])
def test_two_ranks_train_lora(tiny_model_dir, tmp_path, ds):
    out = tmp_path / "run"
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         "-m", "aapo_app", "train", "--ds-config", str(PACKAGED_DS_CONFIGS / ds), "--max-steps", "2", "--output-dir",
         str(out), f"model.path={tiny_model_dir}", "rollout.group_size=4", "rollout.prompts_per_rank=2",
         "rollout.max_new_tokens=6", "train.micro_batch_size=4", "data.eval_size=4", "train.eval_max_new_tokens=6",
         "rewards.num_workers=1", "train.learning_rate=1e-2", "model.lora.rank=4", "rewards.plugins=[plugin_rewards]",
         "rewards.weights={test_char_length: 1.0, boxed_format: 0.5}"])
    ckpt = out / "checkpoints" / "step-2"
    assert (ckpt / "adapter_model.safetensors").is_file() and not (ckpt / "model.safetensors").exists()
    assert len(list((ckpt / "deepspeed" / "state").glob("*optim_states.pt"))) == 2
    for rank in (0, 1):
        groups = [json.loads(x) for x in (out / "rollouts" / f"rank{rank}.jsonl").read_text().splitlines()]
        assert groups and all(len(g["ref_completions"]) == 4 for g in groups)
    adapter = load_file(ckpt / "adapter_model.safetensors")
    assert any(float(v.abs().max()) > 0 for k, v in adapter.items() if "lora_B" in k)  # the adapters trained
