"""``generate`` samples with our settings only: a model whose generation_config.json ships a repetition
penalty, top-k, min-p, typical-p and no-repeat n-grams (as several instruct models do) must still be
sampled from softmax(logits / T), the distribution the loss scores, on every sampling path."""

import contextlib
import json
import shutil

import pytest
import torch

from aapo_app.engine import position_ids
from aapo_app.generation import DeepSpeedGenerator, Sampling, encode_prompts, finish_samples
from aapo_app.rollout import Rollout, stream_seed

# settings that each change greedy tokens or the sampled distribution when generate merges them in
MODEL_FILE_SETTINGS = {"repetition_penalty": 5.0, "top_k": 5, "min_p": 0.5, "typical_p": 0.5,
                       "no_repeat_ngram_size": 1}
PROMPTS = ["What is 2 + 3?", "Hi", "Compute 7 times 8, then add one to it."]
NEW = 8


@pytest.fixture(scope="module")
def echo_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with its output layer set to its input embeddings: its greedy completion
    repeats a token it has seen, so a repetition penalty or a no-repeat rule would change it (on
    the random lm_head, the argmax is rarely a token already in the sequence). Default
    generation config."""
    from transformers import AutoModelForCausalLM

    path = tmp_path_factory.mktemp("echo") / "model"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model.lm_head.weight.data.copy_(model.model.embed_tokens.weight.data)
    model.save_pretrained(path)
    for name in tiny_model_dir.iterdir():  # the tokenizer files
        if not (path / name.name).exists():
            shutil.copy(name, path / name.name)
    return path


@pytest.fixture(scope="module")
def penalized_dir(echo_dir, tmp_path_factory):
    """The same weights with :data:`MODEL_FILE_SETTINGS` in their generation_config.json."""
    path = tmp_path_factory.mktemp("penalized") / "model"
    shutil.copytree(echo_dir, path)
    config_file = path / "generation_config.json"
    config = json.loads(config_file.read_text()) if config_file.exists() else {}
    config.update(MODEL_FILE_SETTINGS)
    config_file.write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def plain(penalized_dir, smollm2_tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(penalized_dir, dtype=torch.float32).eval()
    assert model.generation_config.repetition_penalty == 5.0  # the file was read
    ids, mask = encode_prompts(smollm2_tokenizer, PROMPTS, add_special_tokens=True)
    return model, smollm2_tokenizer, ids, mask


@torch.no_grad()
def plain_greedy(model, ids, mask, n):
    """argmax of the model's logits, n times, recomputing the whole sequence each step: no cache, no
    logits processor of any kind."""
    seq, m = ids, mask.long()
    for _ in range(n):
        logits = model(input_ids=seq, attention_mask=m, position_ids=position_ids(m)).logits[:, -1]
        seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
        m = torch.cat([m, torch.ones_like(m[:, :1])], dim=1)
    return seq[:, ids.shape[1]:]


@pytest.fixture(scope="module")
def want(plain):
    """The plain greedy completions; and proof that the model's file changes what generate picks
    when it is left to its own settings (else these tests would show nothing)."""
    model, tok, ids, mask = plain
    greedy = plain_greedy(model, ids, mask, NEW)
    with torch.no_grad():
        own = model.generate(input_ids=ids, attention_mask=mask.long(), max_new_tokens=NEW, do_sample=False,
                             pad_token_id=tok.pad_token_id, eos_token_id=[-1])[:, ids.shape[1]:]
    assert not torch.equal(own, greedy)
    return greedy


@pytest.fixture(scope="module")
def backend(penalized_dir, smollm2_tokenizer):
    """``aapo eval``'s hf generator: a ZeRO-3 inference engine on the penalized model."""
    from aapo_app.builder import ModelFiles, eval_generator
    from aapo_app.ds_config import DEFAULT_REFERENCE_CONFIG, fill_inference_ds_config, read_ds_config
    from aapo_app.engine import init_distributed
    from aapo_app.generation import checkpoint_eos_ids

    init_distributed()
    ds = fill_inference_ds_config(read_ds_config(None, DEFAULT_REFERENCE_CONFIG), 1)
    tok = smollm2_tokenizer
    files = ModelFiles(str(penalized_dir), tok, None, checkpoint_eos_ids(tok, str(penalized_dir)))
    return eval_generator("hf", files, ds, seed=0, sampler="hf")


@pytest.mark.parametrize("sampler,gather", [("hf", "full"), ("hf", "layerwise"), ("aapo", "full")])
def test_greedy_tokens_on_the_zero3_engine_ignore_the_models_generation_config(backend, plain, want, sampler,
                                                                               gather):
    _, tok, ids, mask = plain
    engine = backend.model
    engine.gather = gather
    try:
        s = DeepSpeedGenerator(engine, tok, [-1], sampler=sampler).sample(ids, mask, num_samples=1,
                                                                         sampling=Sampling(NEW), seed=0)
    finally:
        engine.gather = "full"
    assert torch.equal(s.sequences[:, ids.shape[1]:], want)


def test_eval_hf_backend_ignores_the_models_generation_config(backend, plain, want):
    """``aapo eval``'s generator (greedy, the model's EOS tokens) samples what the plain model's
    greedy decoding gives, cut at the model's EOS."""
    _, tok, ids, mask = plain
    with backend.session():
        out = backend.sample(ids, mask, num_samples=1, sampling=Sampling(NEW), seed=0)
    expected = finish_samples(tok, ids, mask, want, backend.eos_ids, NEW)
    assert out.texts == expected.texts
    assert out.lengths.tolist() == expected.lengths.tolist()


@pytest.mark.parametrize("sampler", ["hf", "aapo"])
def test_first_token_frequencies_follow_softmax_of_logits_over_t(backend, plain, sampler):
    # 4,000 samples of one prompt at the temperature T that gives the most likely token (a prompt
    # token, which the model repeats) p = softmax(logits / T) of about 1/2, the rest spread thinly
    # over the vocabulary. Its frequency must be within 5 standard errors of p, and the rest must
    # not be cut to a few tokens (as many distinct tokens as expected): the model's repetition
    # penalty would push that token down, its top_k=5 / min_p=0.5 / typical_p=0.5 would keep at
    # most a handful of tokens.
    model, tok, ids, mask = plain
    n = 4000
    with torch.no_grad():
        logits = model(input_ids=ids[2:3], attention_mask=mask[2:3].long()).logits[0, -1].double()
    low, high = 1e-4, 10.0  # p_top(T) falls as T grows: bisect for p_top = 1/2
    for _ in range(60):
        T = (low * high) ** 0.5
        low, high = (T, high) if (logits / T).softmax(-1).max() > 0.5 else (low, T)
    p = (logits / T).softmax(-1)
    top = int(p.argmax())
    assert top in ids[2].tolist()  # the repetition penalty applies to it
    s = DeepSpeedGenerator(backend.model, tok, [-1], sampler=sampler).sample(
        ids[2:3], mask[2:3], num_samples=n, sampling=Sampling(1, float(T)), seed=1)
    first = s.sequences[:, ids.shape[1]]
    freq = float((first == top).double().mean())
    assert abs(freq - float(p[top])) < 5 * float((p[top] * (1 - p[top]) / n).sqrt()), (float(p[top]), freq)
    # the number of distinct tokens drawn, against its expectation sum_v 1 - (1 - p_v)^n (hundreds)
    expected_distinct = float((1 - (1 - p) ** n).sum())
    assert first.unique().numel() > expected_distinct / 2, (first.unique().numel(), expected_distinct)


class _Plain:
    """A plain Hugging Face model behind the engine interface :class:`DeepSpeedGenerator` samples on."""

    hybrid_engine = False
    synced_gpus = False

    def __init__(self, module):
        self.module = module

    @contextlib.contextmanager
    def generation_mode(self):
        yield self.module


def test_policy_and_reference_are_sampled_with_the_same_settings(echo_dir, penalized_dir, smollm2_tokenizer,
                                                                 monkeypatch):
    """The policy's checkpoint ships no sampling settings, the reference's (same weights) ships
    MODEL_FILE_SETTINGS. With rollout.sampler=hf both groups get the same effective generate
    settings, and the reference group is exactly what the policy's model samples from the
    reference stream's seed."""
    from transformers import AutoModelForCausalLM
    from transformers.generation.utils import GenerationMixin

    from aapo_app.config import load_run_config

    effective = []
    prepare = GenerationMixin._prepare_generation_config

    def spy(self, generation_config, **kwargs):
        config, model_kwargs = prepare(self, generation_config, **kwargs)
        effective.append(config.to_dict())
        return config, model_kwargs

    monkeypatch.setattr(GenerationMixin, "_prepare_generation_config", spy)
    tok = smollm2_tokenizer
    policy = DeepSpeedGenerator(_Plain(AutoModelForCausalLM.from_pretrained(echo_dir, dtype=torch.float32).eval()),
                                tok, [tok.eos_token_id], sampler="hf")
    reference = DeepSpeedGenerator(_Plain(AutoModelForCausalLM.from_pretrained(penalized_dir, dtype=torch.float32)
                                          .eval()), tok, [tok.eos_token_id], sampler="hf")
    assert policy.model.module.generation_config.repetition_penalty in (None, 1.0)
    cfg = load_run_config(None, ["rollout.sampler=hf", "rollout.group_size=4", "rollout.max_new_tokens=6",
                                 "train.micro_batch_size=4"]).rollout
    algorithm = type("Aapo", (), {"uses_reference_samples": True, "uses_reference_logprobs": False})()
    stage = Rollout(policy=policy, tokenizer=tok, rollout=cfg, algorithm=algorithm, seed=5, rank=0,
                    micro_batch_size=4, add_special_tokens=True, reference=reference)
    batch = stage([None, None], PROMPTS[:2], step=3)
    assert len(effective) == 2
    pol, ref = ({k: v for k, v in c.items() if k != "transformers_version"} for c in effective)
    assert pol == ref
    for key, value in MODEL_FILE_SETTINGS.items():
        assert ref.get(key) != value, key
    ids, mask = encode_prompts(tok, PROMPTS[:2], add_special_tokens=True)
    again = policy.sample(ids, mask, num_samples=cfg.group_size, sampling=Sampling.of_rollout(cfg),
                          seed=stream_seed(5, 3, 0, "reference"))
    assert torch.equal(batch.reference.sequences, again.sequences)
