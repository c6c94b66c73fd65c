"""rollout.backend=vllm: the parts that run without vLLM (configuration, the weight-sync schedule, the
conversion of vLLM's completions) on CPU, and the GPU path itself where vLLM and CUDA exist.

The 2-rank weight push into inference engines is in test_multirank.py."""

import importlib.util
import sys

import pytest
import torch

from aapo_app.config import load_run_config
from aapo_app.errors import AapoError
from aapo_app.generation import samples_from_rows
from aapo_app.vllm_engine import WeightSync, completion_rows, request_seeds
from test_cli import assert_one_line_error
from test_engine import tiny_overrides, train_run

HAS_VLLM_GPU = importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()


# --------------------------------------------------------------------------- configuration


@pytest.mark.parametrize("override, message", [
    ("rollout.backend=sglang", "rollout.backend must be one of deepspeed, vllm"),
    ("vllm.mode=remote", "vllm.mode must be one of colocate, server"),
    ("vllm.gpu_memory_utilization=1.5", "vllm.gpu_memory_utilization must be in (0, 1)"),
    ("vllm.sleep_level=3", "vllm.sleep_level must be one of 0, 1, 2"),
    ("vllm.dtype=int8", "vllm.dtype must be one of auto, bfloat16, float16, float32"),
])
def test_bad_vllm_settings_are_refused(override, message):
    with pytest.raises(AapoError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_run_config(None, [override])


def test_vllm_settings_that_contradict_each_other_are_refused():
    with pytest.raises(AapoError, match="rollout.gather=layerwise and rollout.deepspeed_hybrid_engine do not apply"):
        load_run_config(None, ["rollout.backend=vllm", "rollout.gather=layerwise"])
    with pytest.raises(AapoError, match="needs vllm.server_url"):
        load_run_config(None, ["rollout.backend=vllm", "vllm.mode=server"])
    with pytest.raises(AapoError, match="must be an http"):
        load_run_config(None, ["rollout.backend=vllm", "vllm.mode=server", "vllm.server_url=host:8000"])
    with pytest.raises(AapoError, match="is the policy's server"):
        load_run_config(None, ["rollout.backend=vllm", "vllm.mode=server",
                               "vllm.server_url=http://h:8000", "vllm.reference_url=http://h:8000/"])
    with pytest.raises(AapoError, match="port number"):
        load_run_config(None, ["rollout.backend=vllm", "vllm.mode=server",
                               "vllm.server_url=http://h:99999"])
    # a server URL is only required when vLLM generates
    assert load_run_config(None, ["vllm.mode=server"]).rollout.backend == "deepspeed"


@pytest.mark.skipif(HAS_VLLM_GPU, reason="this machine can run vLLM")
def test_a_vllm_run_without_vllm_or_a_gpu_stops_in_one_line(tiny_model_dir, tmp_path):
    """Refused before anything is built or written (aapo eval --backend vllm: test_eval.py)."""
    assert_one_line_error(["train", *tiny_overrides(tiny_model_dir, tmp_path / "run", "rollout.backend=vllm")],
                          ["rollout.backend=vllm", "rollout.backend=deepspeed"])
    assert not (tmp_path / "run").exists()


def test_a_server_run_for_aapo_needs_a_reference_server_or_a_cache():
    from aapo_app.algorithms import build_algorithm
    from aapo_app.vllm_engine import check_vllm_run

    server = ["rollout.backend=vllm", "vllm.mode=server", "vllm.server_url=http://h:8000"]
    aapo, grpo = build_algorithm("aapo", None), build_algorithm("grpo", None)
    with pytest.raises(AapoError, match="vllm.reference_url: aapo samples a reference group"):
        check_vllm_run(load_run_config(None, server), aapo)
    # GRPO samples no reference group; AAPO with a cache needs no reference server: next comes vLLM itself
    for cfg, algorithm in ((load_run_config(None, server), grpo),
                           (load_run_config(None, [*server, "rollout.reference_cache=somewhere"]), aapo)):
        if HAS_VLLM_GPU:
            check_vllm_run(cfg, algorithm)
        else:
            with pytest.raises(AapoError, match="rollout.backend=vllm"):
                check_vllm_run(cfg, algorithm)


SERVER = ["rollout.backend=vllm", "vllm.mode=server"]


@pytest.mark.parametrize("policy, reference", [
    ("http://localhost:8000", "http://127.0.0.1:8000"),
    ("http://localhost:8000/", "http://[::1]:8000"),
    ("http://LOCALHOST:8000", "http://0.0.0.0:8000"),
    ("https://gpu-box", "https://GPU-box:443/"),
])
def test_spellings_of_one_server_are_one_server_in_the_configuration(policy, reference):
    with pytest.raises(AapoError, match="vllm.reference_url is the policy's server"):
        load_run_config(None, [*SERVER, f"vllm.server_url={policy}",
                               f"vllm.reference_url={reference}"])


@pytest.mark.parametrize("policy, reference", [
    ("http://localhost:8000", "http://localhost:8001"),
    ("https://gateway/policy", "https://gateway/reference"),  # a proxy routing by path: the servers decide
    ("http://box-a:8000", "http://box-b:8000"),
])
def test_different_servers_pass_the_configuration(policy, reference):
    cfg = load_run_config(None, [*SERVER, f"vllm.server_url={policy}",
                                 f"vllm.reference_url={reference}"])
    assert cfg.vllm.reference_url == reference


# --------------------------------------------------------------------------- server mode, faked at the VLLMClient


class FakeServer:
    """A `vllm serve` stand-in: a Hugging Face model answering what ServerVLLM asks TRL's VLLMClient
    (completions of token-id prompts with the sampled tokens' log-probs, weight pushes)."""

    def __init__(self, model, takes_pushes: bool = True):
        self.model = model
        self.takes_pushes = takes_pushes
        self.pushes = 0
        self.requests = []

    @torch.no_grad()
    def generate(self, prompts, n=1, repetition_penalty=1.0, temperature=1.0, top_p=1.0, top_k=0, min_p=0.0,
                 max_tokens=16, logprobs=0, generation_kwargs=None):
        kw = generation_kwargs or {}
        self.requests.append(dict(repetition_penalty=repetition_penalty, min_p=min_p, top_k=top_k, top_p=top_p))
        stop = set(kw.get("stop_token_ids", []))
        completions, logps, logp_ids = [], [], []
        for prompt in prompts:
            for j in range(n):
                gen = torch.Generator().manual_seed(kw.get("seed", 0) + j)
                seq, ids, lps, top_ids = list(prompt), [], [], []
                for _ in range(max_tokens):
                    logits = self.model(input_ids=torch.tensor([seq])).logits[0, -1].float()
                    if temperature == 0:
                        token = int(logits.argmax())
                    else:
                        token = int(torch.multinomial((logits / temperature).softmax(-1), 1, generator=gen))
                    seq.append(token)
                    ids.append(token)
                    # a server started with --logprobs-mode processed_logprobs: the sampled distribution's
                    logp = (logits / temperature if temperature else logits).log_softmax(-1)
                    top = [int(t) for t in logp.topk(max(1, logprobs or 0)).indices if int(t) != token]
                    chosen = [token] + top[:logprobs or 0]  # TRL: the sampled token, then the most likely
                    lps.append([float(logp[t]) for t in chosen])
                    top_ids.append(chosen)
                    if token in stop:
                        break
                completions.append(ids)
                logps.append(lps)
                logp_ids.append(top_ids)
        if logprobs is None:
            return {"completion_ids": completions, "logprobs": None, "logprob_token_ids": None}
        return {"completion_ids": completions, "logprobs": logps, "logprob_token_ids": logp_ids}

    def load(self, named_tensors):
        params = dict(self.model.named_parameters())
        for name, tensor in named_tensors:
            if self.takes_pushes:
                params[name].data.copy_(tensor)
        self.pushes += 1


class FakeVLLMClient:
    """TRL's VLLMClient reaching the FakeServer registered for the URL's port (so two spellings of
    a host, or two ports forwarded to one server, reach one object)."""

    servers: dict = {}

    def __init__(self, base_url, connection_timeout=0.0):
        from urllib.parse import urlsplit

        port = urlsplit(base_url).port
        if port not in self.servers:
            raise ConnectionError(f"nothing at {base_url}")
        self.server = self.servers[port]

    def generate(self, prompts, **kwargs):
        return self.server.generate(prompts, **kwargs)

    def init_communicator(self, device):
        pass

    def weight_update(self):
        import contextlib

        return contextlib.nullcontext()

    def update_named_params(self, metadata, named_tensors):
        self.server.load(named_tensors)

    def reset_prefix_cache(self):
        pass


@pytest.fixture
def fake_servers(monkeypatch):
    """port -> FakeServer: ServerVLLM talks to them through FakeVLLMClient (no TRL, no vLLM)."""
    import types

    import aapo_app.vllm_engine as V

    module = types.ModuleType("trl.generation.vllm_client")
    module.VLLMClient = FakeVLLMClient
    for name, mod in (("trl", types.ModuleType("trl")), ("trl.generation", types.ModuleType("trl.generation")),
                      ("trl.generation.vllm_client", module)):
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setattr(V, "check_server_client", lambda: None)
    monkeypatch.setattr(FakeVLLMClient, "servers", {})
    return FakeVLLMClient.servers


def _tiny_lm(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def _server_engines(policy_url, reference_url):
    from types import SimpleNamespace

    from aapo_app.vllm_engine import build_engines

    v = SimpleNamespace(mode="server", server_url=policy_url, reference_url=reference_url, timeout_s=1.0)
    return build_engines(v, "unused", None, [2], rank=0, seed=0, reference=True, max_num_seqs=8, max_model_len=64)


@pytest.fixture
def resolving(monkeypatch):
    """socket.getaddrinfo with 'policy-box' resolving to 10.1.2.3 (a host name and an address of one machine)."""
    import socket

    real = socket.getaddrinfo

    def getaddrinfo(host, port, *args, **kwargs):
        if host == "policy-box":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.1.2.3", port))]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


def test_greedy_probes_tolerate_a_broken_tie_but_not_a_different_model():
    from aapo_app.vllm_engine import (PROBE_LOGPROBS, PROBE_TOKENS, PROBE_TOP_IDS, PROBE_TOP_LOGPROBS,
                                      compare_greedy_probes)

    def probe(tokens, logprobs, runner_up):
        """Greedy tokens with their log-probs, and at each position the runner-up (token, log-prob)."""
        t = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
        return {PROBE_TOKENS: t(tokens), PROBE_LOGPROBS: t(logprobs),
                PROBE_TOP_IDS: t([[a, r[0]] for a, r in zip(tokens, runner_up)]),
                PROBE_TOP_LOGPROBS: t([[lp, r[1]] for lp, r in zip(logprobs, runner_up)])}

    # at position 1 tokens 6 and 9 are nearly tied (log 1/2 each)
    start = probe([5, 6, 7, 8], [-0.1, -0.69, -0.2, -0.3], [(1, -3), (9, -0.70), (2, -3), (3, -3)])
    same = probe([5, 6, 7, 8], [-0.1, -0.70, -0.2, -0.3], [(1, -3), (9, -0.69), (2, -3), (3, -3)])
    assert compare_greedy_probes(same, start, 0.1) == ""
    # the tie broken the other way: what follows that token is not compared
    flipped = probe([5, 9, 1, 2], [-0.1, -0.69, -3.0, -4.0], [(1, -3), (6, -0.70), (3, -3), (4, -4.5)])
    assert compare_greedy_probes(flipped, start, 0.1) == ""
    # another model: its token at position 1 is not among the reference's likely ones
    other = probe([5, 4, 1, 2], [-0.1, -0.69, -3.0, -4.0], [(1, -3), (6, -0.70), (3, -3), (4, -4.5)])
    assert "greedy token at position 1 differs" in compare_greedy_probes(other, start, 0.1)
    # same tokens, a log-prob that moved
    assert "differs by up to" in compare_greedy_probes(
        probe([5, 6, 7, 8], [-0.1, -0.69, -0.9, -0.3], [(1, -3), (9, -0.70), (2, -3), (3, -3)]), start, 0.1)
    # without the top tokens (an older client) any changed token counts
    bare = {k: v for k, v in flipped.items() if k in (PROBE_TOKENS, PROBE_LOGPROBS)}
    assert compare_greedy_probes(bare, start, 0.1)


@pytest.mark.parametrize("policy, reference", [
    ("http://localhost:8000", "http://127.0.0.1:8000"),  # both spellings of this machine
    ("http://policy-box:8000", "http://10.1.2.3:8000"),  # a name and the address it resolves to
])
def test_two_spellings_of_one_server_are_refused_at_start(fake_servers, resolving, tiny_model_dir, policy, reference):
    from aapo_app.vllm_engine import VLLMWeightsError

    fake_servers[8000] = FakeServer(_tiny_lm(tiny_model_dir))
    with pytest.raises(VLLMWeightsError, match="vllm.reference_url reaches the policy's server"):
        _server_engines(policy, reference)
    assert fake_servers[8000].requests == []  # refused by address, before any probe


def test_a_reference_server_with_other_weights_is_refused_at_start(fake_servers, tiny_model_dir):
    from aapo_app.vllm_engine import VLLMWeightsError

    other = _tiny_lm(tiny_model_dir)
    torch.manual_seed(1)
    other.lm_head.weight.data.normal_(0, 0.02)
    fake_servers.update({8000: FakeServer(_tiny_lm(tiny_model_dir)), 8001: FakeServer(other)})
    with pytest.raises(VLLMWeightsError, match="compute different log-probs for the same probe"):
        _server_engines("http://localhost:8000", "http://localhost:8001")


def _trainer_module(model_dir):
    """The trainer's weights after an update: the base model with a sharper output layer."""
    module = _tiny_lm(model_dir)
    module.lm_head.weight.data.mul_(3.0)
    return module


def test_a_reference_url_forwarded_to_the_policy_server_is_refused_at_the_first_push(fake_servers, tiny_model_dir):
    """Ports 8000 and 8001 reach one server (a port forward): the addresses differ and both answer
    the start-up probe alike, so the first push's test push has to catch it."""
    from aapo_app.vllm_engine import VLLMWeightsError, push_weights_checked

    fake_servers[8000] = fake_servers[8001] = FakeServer(_tiny_lm(tiny_model_dir))
    policy, reference = _server_engines("http://localhost:8000", "http://localhost:8001")
    with pytest.raises(VLLMWeightsError, match="vllm.reference_url: the reference server's log-probs changed"):
        push_weights_checked(_trainer_module(tiny_model_dir), policy, reference)


def test_separate_servers_pass_and_a_reference_that_changes_later_is_refused(fake_servers, tiny_model_dir):
    from aapo_app.vllm_engine import VLLMWeightsError, push_weights_checked

    base = _tiny_lm(tiny_model_dir)
    fake_servers.update({8000: FakeServer(_tiny_lm(tiny_model_dir)), 8001: FakeServer(_tiny_lm(tiny_model_dir))})
    policy, reference = _server_engines("http://localhost:8000", "http://localhost:8001")
    module = _trainer_module(tiny_model_dir)
    push_weights_checked(module, policy, reference)
    assert reference.apart_verified
    assert fake_servers[8000].pushes == 2 and fake_servers[8001].pushes == 0  # the test push, then the real one
    served = dict(fake_servers[8000].model.named_parameters())
    assert all(torch.equal(served[n], p) for n, p in module.named_parameters())  # the test push was overwritten
    reference_weights = dict(fake_servers[8001].model.named_parameters())
    assert all(torch.equal(reference_weights[n], p) for n, p in base.named_parameters())
    # only our sampling settings reach the server
    assert all(r["repetition_penalty"] == 1.0 and r["min_p"] == 0.0 for r in fake_servers[8000].requests)

    module.lm_head.weight.data.mul_(2.0)
    push_weights_checked(module, policy, reference)  # later pushes: no test push, the reference is still checked
    assert fake_servers[8000].pushes == 3
    with torch.no_grad():  # something else writes to the reference server
        fake_servers[8001].model.model.norm.weight.mul_(-1.0)
    with pytest.raises(VLLMWeightsError, match="reference server's log-probs changed"):
        push_weights_checked(module, policy, reference)


def test_a_policy_server_that_ignores_pushes_is_refused(fake_servers, tiny_model_dir):
    from aapo_app.vllm_engine import VLLMWeightsError, push_weights_checked

    fake_servers.update({8000: FakeServer(_tiny_lm(tiny_model_dir), takes_pushes=False),
                         8001: FakeServer(_tiny_lm(tiny_model_dir))})
    policy, reference = _server_engines("http://localhost:8000", "http://localhost:8001")
    with pytest.raises(VLLMWeightsError, match="did not change what the policy server computes"):
        push_weights_checked(_trainer_module(tiny_model_dir), policy, reference)


# --------------------------------------------------------------------------- the sync schedule


def test_weights_are_pushed_only_when_the_trainer_changed_them():
    sync = WeightSync(sleep_level=1)
    assert not sync.needs_push()  # both start from the checkpoint
    sync.changed()
    assert sync.needs_push()
    sync.did_push()
    assert not sync.needs_push()
    sync.fell_asleep()  # level 1 keeps the weights in CPU memory: nothing to push on waking
    sync.woke()
    assert not sync.needs_push()
    sync.changed()
    sync.changed()  # two steps between rollouts (e.g. an evaluation did not happen): one push
    assert sync.needs_push()
    sync.did_push()
    assert (sync.version, sync.pushed, sync.pushes) == (3, 3, 2)
    sync.changed()  # --resume loaded a checkpoint into the trainer
    assert sync.needs_push()


def test_a_level_two_sleep_always_pushes_on_waking():
    sync = WeightSync(sleep_level=2)
    sync.fell_asleep()  # the engine discarded its weights
    assert sync.needs_push()
    sync.did_push()
    sync.woke()
    assert not sync.needs_push()  # awake and current (e.g. the held-out evaluation right after a rollout)
    sync.fell_asleep()
    assert sync.needs_push()


def test_the_trainer_tells_its_generator_of_every_weight_change(tiny_model_dir, tmp_path, monkeypatch):
    """Every backend hears of every change: two applied optimizer steps are two changes (a vLLM
    engine following the trainer would take them at its next session; the DeepSpeed generator
    shares the weights and ignores them)."""
    from aapo_app.generation import DeepSpeedGenerator

    calls = []
    monkeypatch.setattr(DeepSpeedGenerator, "weights_changed", lambda self: calls.append(self.source))
    train_run(load_run_config(None, tiny_overrides(tiny_model_dir, tmp_path / "run")))
    assert calls == ["deepspeed-policy"] * 2


# --------------------------------------------------------------------------- vLLM's completions


def test_completions_end_at_eos_unless_cut_by_the_length_limit():
    eos = [2, 7]
    rows = completion_rows([[5, 6, 2], [5, 6], [5, 6, 8, 9], [], [5, 7]], eos, max_new_tokens=4)
    # kept EOS / stopped without it (append 2) / hit the limit (untouched) / stopped at once / other EOS id
    assert rows == [[5, 6, 2], [5, 6, 2], [5, 6, 8, 9], [2], [5, 7]]


class _Tok:
    """Just enough of a tokenizer for finish_samples: pad id and decoding (ids as text)."""

    pad_token_id = 0

    def batch_decode(self, rows, skip_special_tokens=True):
        return [" ".join(str(i) for i in r if i not in (0, 2)) for r in rows]


def test_completions_become_the_same_samples_the_deepspeed_sampler_builds():
    prompt_ids = torch.tensor([[0, 11, 12], [13, 14, 15]])  # left-padded
    prompt_mask = prompt_ids != 0
    rows = completion_rows([[5, 2], [5, 6, 8], [9], [4, 4, 4]], [2], max_new_tokens=3)
    s = samples_from_rows(_Tok(), prompt_ids, prompt_mask, rows, num_samples=2, eos_ids=[2], max_new_tokens=3)
    assert s.sequences.tolist() == [[0, 11, 12, 5, 2, 0], [0, 11, 12, 5, 6, 8],
                                    [13, 14, 15, 9, 2, 0], [13, 14, 15, 4, 4, 4]]
    assert s.lengths.tolist() == [2, 3, 2, 3]  # EOS counted
    assert s.truncated.tolist() == [False, True, False, True]
    assert s.completion_mask.tolist() == [[True, True, False], [True] * 3, [True, True, False], [True] * 3]
    assert s.texts == ["5", "5 6 8", "9", "4 4 4"]


def test_each_completion_has_its_own_seed_independent_of_batching():
    seeds = request_seeds(123, num_prompts=3, num_samples=4)
    assert len(set(seeds)) == 12
    assert request_seeds(123, num_prompts=2, num_samples=4) == seeds[:8]  # fewer prompts: same first seeds
    assert request_seeds(124, num_prompts=3, num_samples=4) != seeds


# --------------------------------------------------------------------------- on a GPU with vLLM


@pytest.mark.slow
@pytest.mark.skipif(not HAS_VLLM_GPU, reason="needs vLLM and a CUDA GPU (pip install 'aapo[vllm]')")
def test_training_with_colocated_vllm_rollouts(tiny_model_dir, tmp_path):
    """Two AAPO steps with a sleeping vLLM policy engine and a resident reference engine, in their own
    process (vLLM engines live as long as the process): the weights are pushed and checked before
    the second step's rollout and the final evaluation, and the run ends normally."""
    import json

    from helpers import run

    out = tmp_path / "run"
    run([sys.executable, "-m", "aapo_app", "train",
         *tiny_overrides(tiny_model_dir, out, "algorithm.name=aapo", "rollout.backend=vllm",
                         "vllm.gpu_memory_utilization=0.2", "rewards.plugins=[plugin_rewards]")],
        DS_ACCELERATOR="cuda")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and 0.0 <= summary["eval_after"] <= 1.0
