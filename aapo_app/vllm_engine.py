"""vLLM rollouts (GPU): a vLLM engine colocated with each training rank, or a separate vLLM server.

``rollout.backend=vllm`` replaces the DeepSpeed engine's generation mode by vLLM for the policy
group, the reference group and the held-out evaluation. Two layouts (docs/vllm.md):

``vllm.mode=colocate`` (default)
    Every training rank builds its own vLLM engine on its own GPU inside the training process
    (vLLM's ``external_launcher`` executor, tensor parallel size 1, reusing the launcher's process
    group). The policy engine runs in sleep mode: it hands its GPU memory back while DeepSpeed
    updates (level 1 keeps its weights in CPU memory, level 2 discards them) and wakes up for the
    next rollout. After every optimizer step that changed the weights the ZeRO-3 partitions are
    gathered one decoder layer at a time (:func:`aapo_app.engine.stream_full_parameters`) and
    handed to vLLM's weight loader, so no rank ever holds an unpartitioned copy of the model; the
    prefix cache is reset after each push. AAPO's reference group comes from a second engine that
    loads the frozen reference weights once and is never written to (vLLM allows one sleep-mode
    engine per process, so the reference engine stays resident).
``vllm.mode=server``
    One ``vllm serve`` process (its own GPUs, any tensor/data parallel size) generates for every
    rank over HTTP; rank 0 streams the gathered weights to it over NCCL through TRL's
    ``VLLMClient`` (``pip install 'aapo[vllm-server]'``). The reference group comes from a second
    server that holds the reference weights (``vllm.reference_url``) or from a reference
    cache. The two servers are told apart by where they are (resolved addresses) and by what they
    compute (:func:`check_engines_apart`, :func:`verify_apart_by_test_push`), not by URL text.

Written against vLLM's source (0.10 to 0.33; see docs/vllm.md and docs/status.md for what was and was not run on a GPU).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import torch

from aapo_app.errors import AapoError
from aapo_app.generation import Generator, Sampling, prompt_token_lists, samples_from_rows

# parameters compared between the trainer and the vLLM engines: small ones whose names vLLM keeps
# (no fused q/k/v or gate/up) and that training moves
PROBE_PARAMS = ("model.norm.weight", "model.layers.0.input_layernorm.weight",
                "model.layers.0.post_attention_layernorm.weight")
PROBE_ELEMENTS = 256
# a server's weights cannot be read: its probe is its greedy completion of a fixed prompt (token ids
# every vocabulary has) and that completion's log-probs
PROBE_PROMPT = list(range(100, 116))
PROBE_NEW_TOKENS = 8
PROBE_TOP = 5  # log-probs of the 5 most likely tokens at each position, to tell a broken tie
# log-prob differences a server may show without a weight change: the same server asked twice
# (prefix cache or not: bf16 logits move by an ulp), and two servers holding the same weights on
# other GPUs / parallel layouts
SERVER_PROBE_TOLERANCE = 0.1
SERVER_CROSS_TOLERANCE = 0.25
# the parameter the start-up test push negates (every logit changes sign: the greedy probe changes)
TEST_PUSH_PARAM = "model.norm.weight"


def check_vllm(field_name: str = "rollout.backend=vllm", fallback: str = "rollout.backend=deepspeed") -> None:
    """A one-line error unless vLLM can run here (installed, and a CUDA GPU)."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise AapoError(f"{field_name}: vLLM is not installed; `pip install 'aapo[vllm]'` on a CUDA machine, "
                        f"or use {fallback}")
    if not torch.cuda.is_available():
        raise AapoError(f"{field_name} needs a CUDA GPU; use {fallback} on this machine")


# --------------------------------------------------------------------------- server addresses

THIS_HOST = "this-host"
_LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback")


def _is_this_host(host: str) -> bool:
    """A host name or address that always means this machine (no name lookup)."""
    host = host.lower().strip("[]")
    if host in _LOOPBACK_NAMES or host in (socket.gethostname().lower(), ""):
        return True
    try:
        ip = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return False
    return ip.is_loopback or ip.is_unspecified


def server_endpoint(url: str) -> tuple[str, int, str]:
    """``(host, port, path)`` of a server URL without any name lookup: the host lower-cased, the
    scheme's port filled in, every spelling of this machine (localhost, 127.x, ::1, 0.0.0.0, its
    host name) as one, the path without its trailing '/'. Raises ValueError for a URL with no host
    or a bad port."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)  # .port raises ValueError when bad
    host = (parts.hostname or "").lower()
    if not host:
        raise ValueError(f"no host in '{url}'")
    return (THIS_HOST if _is_this_host(host) else host), port, parts.path.rstrip("/")


def _is_host_name(host: str) -> bool:
    if host == THIS_HOST:
        return False
    try:
        ipaddress.ip_address(host.split("%")[0])
        return False
    except ValueError:
        return True


def _this_hosts_addresses() -> set[str]:
    try:
        return {info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None)}
    except OSError:
        return set()


def server_addresses(url: str) -> set[tuple[str, int]]:
    """Every ``(address, port)`` a server URL can connect to (``socket.getaddrinfo``), with this
    machine's own addresses as one; :func:`server_endpoint` alone when the name does not resolve
    (the connection itself then reports it)."""
    host, port, _ = server_endpoint(url)
    if host == THIS_HOST:
        return {(THIS_HOST, port)}
    try:
        infos = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return {(host, port)}
    own = _this_hosts_addresses()
    found = set()
    for info in infos:
        address = str(info[4][0]).split("%")[0]
        found.add((THIS_HOST if address in own or _is_this_host(address) else address, port))
    return found


def same_server(url_a: str, url_b: str) -> str:
    """Where two server URLs certainly reach one server ('host:port'), else ''. Certain: the same
    host, port and path (:func:`server_endpoint`), or the same path at an address and port both
    resolve to (``socket.getaddrinfo``; this machine's addresses as one). Two different host names
    or paths at one address may be a proxy routing to two servers: the test push decides those
    (:func:`verify_apart_by_test_push`)."""
    try:
        a, b = server_endpoint(url_a), server_endpoint(url_b)
    except ValueError:  # a malformed URL (the configuration refuses those)
        return ""
    if a == b:
        return f"{a[0]}:{a[1]}{a[2]}"
    if a[2] != b[2] or (_is_host_name(a[0]) and _is_host_name(b[0])):
        return ""
    shared = server_addresses(url_a) & server_addresses(url_b)
    return ", ".join(f"{h}:{p}" for h, p in sorted(shared))


# --------------------------------------------------------------------------- when to push weights


@dataclass
class WeightSync:
    """When the vLLM policy engine needs the trainer's weights before it generates.

    ``version`` counts the changes made to the trainer's weights (optimizer steps that were not
    skipped, a checkpoint restored); ``pushed`` is the version the engine holds. A push is needed
    when they differ, and always after a level-2 sleep (the engine threw its weights away).
    """

    sleep_level: int = 1
    version: int = 0
    pushed: int = 0
    pushes: int = 0
    asleep: bool = field(default=False)

    def changed(self) -> None:
        """The trainer's weights changed (an optimizer step applied, a checkpoint restored)."""
        self.version += 1

    def fell_asleep(self) -> None:
        self.asleep = True

    def needs_push(self) -> bool:
        discarded = self.asleep and self.sleep_level == 2
        return self.version != self.pushed or discarded

    def did_push(self) -> None:
        self.pushed = self.version
        self.pushes += 1

    def woke(self) -> None:
        self.asleep = False


# --------------------------------------------------------------------------- requests and results


def request_seeds(seed: int, num_prompts: int, num_samples: int) -> list[int]:
    """One seed per completion (prompt-major), so a sample does not depend on how requests are
    batched or on the engine's scheduling."""
    from aapo_app.rollout import stream_seed

    return [stream_seed(seed, i, j) for i in range(num_prompts) for j in range(num_samples)]


#: the first vLLM whose ``logprobs_mode="processed_logprobs"`` reports a sampled token's log-prob after
#: temperature and top-k/top-p (the distribution it was drawn from); 0.10.0-0.10.1 process only penalties
PROCESSED_LOGPROBS_VLLM = (0, 10, 2)


def vllm_version() -> tuple[int, ...]:
    import importlib.metadata

    version = importlib.metadata.version("vllm")
    return tuple(int(x) for x in version.split("+")[0].split(".")[:3] if x.isdigit())


def sampled_logprobs(token_ids, logprobs) -> list[float] | None:
    """Each sampled token's log-prob from a vLLM ``CompletionOutput`` (``logprobs``: one dict per token,
    token id -> Logprob; vLLM always lists the sampled token), or None when it reported none."""
    if not logprobs:
        return None
    out = []
    for token, entry in zip(token_ids, logprobs):
        item = entry.get(token) if isinstance(entry, dict) else None
        if item is None:
            return None
        out.append(float(getattr(item, "logprob", item)))
    return out


def completion_rows(token_lists: list[list[int]], eos_ids: list[int], max_new_tokens: int) -> list[list[int]]:
    """vLLM's completions as rows that end in an EOS token when they stopped.

    A completion shorter than ``max_new_tokens`` stopped at a stop token; vLLM keeps that token in
    ``token_ids`` (EOS ids are ours: ``stop_token_ids``), but if a version leaves it out the first
    EOS id is appended, so that :func:`aapo_app.generation.finish_samples` sees the same row the
    DeepSpeed sampler would have produced (EOS counted, not truncated)."""
    eos = set(eos_ids)
    rows = []
    for ids in token_lists:
        ids = list(ids)[:max_new_tokens]
        if len(ids) < max_new_tokens and (not ids or ids[-1] not in eos):
            ids.append(eos_ids[0])
        rows.append(ids)
    return rows


def probe_slices(named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The first elements of each probe parameter, as float32 on the CPU."""
    return {name: t.detach().reshape(-1)[:PROBE_ELEMENTS].float().cpu().clone()
            for name, t in named.items() if name in PROBE_PARAMS}


def trainer_probe(module) -> dict[str, torch.Tensor]:
    """:func:`probe_slices` of the trainer's (possibly ZeRO-3 partitioned) module. Collective."""
    import deepspeed

    params = {n: p for n, p in module.named_parameters() if n in PROBE_PARAMS}
    ordered = [params[n] for n in sorted(params)]
    with deepspeed.zero.GatheredParameters(ordered, enabled=bool(ordered) and hasattr(ordered[0], "ds_id")):
        return probe_slices({n: params[n].data for n in sorted(params)})


def compare_probes(found: dict, expected: dict, tolerance: float) -> str:
    """'' when every shared probe agrees within ``tolerance`` (absolute), else the first that does not."""
    shared = sorted(set(found) & set(expected))
    if not shared:
        return "no probe parameter found in both"
    for name in shared:
        a, b = found[name], expected[name]
        n = min(a.numel(), b.numel())
        diff = float((a[:n] - b[:n]).abs().max()) if n else 0.0
        if diff > tolerance:
            return f"{name} differs by up to {diff:.3g}"
    return ""


PROBE_TOKENS, PROBE_LOGPROBS = "probe greedy token ids", "probe log-probs"
PROBE_TOP_IDS, PROBE_TOP_LOGPROBS = "probe top token ids", "probe top log-probs"


def _broken_tie(found: dict, expected: dict, k: int, tolerance: float) -> bool:
    """At position k each probe's greedy token is among the other's most likely tokens, within
    ``tolerance`` of its top log-prob: the same distribution with a near-tie broken differently."""
    for mine, other in ((found, expected), (expected, found)):
        if PROBE_TOP_IDS not in mine or k >= mine[PROBE_TOP_IDS].shape[0]:
            return False
        ids, logprobs = mine[PROBE_TOP_IDS][k], mine[PROBE_TOP_LOGPROBS][k]
        hit = (ids == other[PROBE_TOKENS][k]).nonzero()
        if not hit.numel() or float(logprobs.max() - logprobs[int(hit[0])]) > tolerance:
            return False
    return True


def compare_greedy_probes(found: dict, expected: dict, tolerance: float) -> str:
    """:func:`compare_probes` for two greedy probes (:meth:`ServerVLLM.probe`). Equal computations can
    still flip a greedy token where two tokens are nearly tied (an ulp of a bf16 logit), and the
    continuations part there. So the tokens' log-probs are compared up to and including the first
    token that differs, that token must be a broken tie (:func:`_broken_tie`), and what follows is
    not compared."""
    a, b = found[PROBE_TOKENS], expected[PROBE_TOKENS]
    n = min(a.numel(), b.numel())
    differ = (a[:n] != b[:n]).nonzero()
    first = int(differ[0]) if differ.numel() else n
    if PROBE_LOGPROBS in found and PROBE_LOGPROBS in expected:
        upto = min(first + 1, n)
        diff = compare_probes({PROBE_LOGPROBS: found[PROBE_LOGPROBS][:upto]},
                              {PROBE_LOGPROBS: expected[PROBE_LOGPROBS][:upto]}, tolerance)
        if diff:
            return diff
    if first < n and not _broken_tie(found, expected, first, tolerance):
        return f"the greedy token at position {first} differs ({int(a[first])}, expected {int(b[first])})"
    return ""


def in_dtype(probe: dict[str, torch.Tensor], dtype: str) -> dict[str, torch.Tensor]:
    """The trainer's probe rounded the way vLLM's loader rounds it into a ``dtype`` engine."""
    return {k: v.to(getattr(torch, dtype)).float() for k, v in probe.items()}


# --------------------------------------------------------------------------- colocated engine


def _join_process_group() -> None:
    """``external_launcher`` reuses the default process group when it exists; without one it would
    make a 1-rank group on every rank (wrong above rank 0), so the launcher's group is joined first
    (:func:`aapo_app.engine.init_distributed` also makes a 1-rank group for a single process)."""
    import torch.distributed as dist

    from aapo_app.engine import init_distributed

    if not dist.is_initialized():
        init_distributed()
    # the engine core must run in this process so that its weights can be written directly (vLLM
    # sets this itself for external_launcher; set here before vLLM caches its environment)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"


class VLLMEngine(Generator):
    """What both vLLM layouts share: a session that wakes the engine, hands it the trainer's weights
    when it follows a trainer (:meth:`follow`) and they changed, and puts it back to sleep."""

    sleep_level = 0
    # the start-up and post-push checks (check_engines_apart, push_weights_checked). A colocated
    # engine's: probe() gives slices of its parameters, comparable with the trainer's; exact within one engine and
    # between two engines loaded from one checkpoint
    probe_kind = "weights"
    probe_tolerance = probe_cross_tolerance = 0.0
    compare = staticmethod(compare_probes)
    # the one-line errors of check_engines_apart / check_reference_unchanged
    shares_message = ("rollout.backend=vllm: the reference engine shares memory with the policy engine; "
                      "AAPO's reference group would follow the trained weights")
    differs_message = ("rollout.backend=vllm: the reference and policy engines were built from different "
                       "weights ({diff}); both must load model.path")
    changed_message = ("rollout.backend=vllm: the reference engine's weights changed during training ({diff}): "
                       "it shares the policy engine's weights, and AAPO's reference group would come from the "
                       "policy; use rollout.reference_cache=DIR or the deepspeed backend")


    def __init__(self, tokenizer, eos_ids: list[int]):
        self.tokenizer = tokenizer
        self.eos_ids = list(eos_ids)
        self.sync: WeightSync | None = None
        self._trainer_module = self._reference = None
        self._awake = False

    def follow(self, module, reference=None) -> None:
        """Generate from the trainer's ``module`` (ZeRO-3 partitioned): its weights are pushed at the
        start of a session whenever they changed, and checked (:func:`push_weights_checked`; the
        ``reference`` engine must not change). The engine sleeps until its first session."""
        self._trainer_module, self._reference = module, reference
        self.sync = WeightSync(self.sleep_level)
        self._sleep()
        self.sync.fell_asleep()

    def weights_changed(self) -> None:
        if self.sync is not None:
            self.sync.changed()

    @contextlib.contextmanager
    def session(self):
        if self._awake:  # nested
            yield self
            return
        self._wake(["weights"])
        if self.sync is not None:
            if self.sync.needs_push():
                self._push()
                self.sync.did_push()
            self.sync.woke()
        self._wake(["kv_cache"])
        self._awake = True
        try:
            yield self
        finally:
            self._awake = False
            self._sleep()
            if self.sync is not None and self.sleep_level:
                self.sync.fell_asleep()

    def _wake(self, tags: list[str]) -> None:
        """Take back the GPU memory of ``tags`` (a sleeping colocated engine)."""

    def _push(self) -> None:
        """Hand the engine the trainer's current weights (checked). Collective."""
        push_weights_checked(self._trainer_module, self, self._reference)

    # -- weights (subclasses: load_weights, reset_prefix_cache, probe, storage_ids) -----------
    def take_weights(self, module) -> int:
        """Copy the trainer's full parameters in, one decoder layer at a time, each gathered from its
        ZeRO-3 partitions only while it is copied. Collective. Returns the number of tensors."""
        from aapo_app.engine import stream_full_parameter_groups

        count = 0
        for group in stream_full_parameter_groups(module, per="layer"):
            self.load_weights(group)
            count += len(group)
        return count

    def shared_with(self, other) -> str:
        """'' unless this engine and ``other`` are certainly one engine (here: share weight memory)."""
        return "memory" if self.storage_ids() & other.storage_ids() else ""

    def _sleep(self) -> None:
        """Give the GPU memory back for the update (a colocated engine with sleep mode)."""


class ColocatedVLLM(VLLMEngine):
    """A vLLM engine in this training process, on this rank's GPU.

    ``sleep_level`` 1 or 2 builds it with sleep mode (only one such engine per process, vLLM's
    rule): :meth:`sleep` frees its GPU memory for the update. 0 keeps it resident (the reference
    engine). Construction is collective: every rank builds the same engines in the same order.
    """

    def __init__(self, model_path: str, tokenizer, eos_ids: list[int], *, seed: int, sleep_level: int,
                 gpu_memory_utilization: float, max_model_len: int | None, max_num_seqs: int | None,
                 dtype: str = "auto", role: str = "policy", lora=None):
        """``lora`` (:class:`aapo_app.lora.LoraSettings`): serve the base with LoRA enabled; the trainer's
        adapter is pushed after each change instead of the full weights (:meth:`_push`), and a
        ``sample(..., adapter=False)`` request goes to the base alone (the reference group)."""
        super().__init__(tokenizer, eos_ids)
        check_vllm()
        _join_process_group()
        import vllm

        self.vllm = vllm
        self.role = role
        self.sleep_level = sleep_level
        optional = {k: v for k, v in (("max_model_len", max_model_len), ("max_num_seqs", max_num_seqs)) if v}
        # report each sampled token's log-prob under the distribution it was drawn from (for truncated
        # importance sampling); older versions report the raw model's, which would be a wrong ratio
        self.reports_logprobs = role == "policy" and vllm_version() >= PROCESSED_LOGPROBS_VLLM
        if self.reports_logprobs:
            optional["logprobs_mode"] = "processed_logprobs"
        self.lora, self.model_path, self.adapters, self.lora_request = lora, model_path, None, None
        if lora is not None:
            from aapo_app.lora import vllm_max_lora_rank

            optional.update(enable_lora=True, max_lora_rank=vllm_max_lora_rank(lora.rank), max_loras=1)
        try:
            self.llm = vllm.LLM(
                model=model_path, tokenizer=model_path, dtype=dtype, seed=seed, tensor_parallel_size=1,
                distributed_executor_backend="external_launcher", gpu_memory_utilization=gpu_memory_utilization,
                enable_prefix_caching=True, enable_sleep_mode=sleep_level > 0, **optional,
            )
        except (ValueError, RuntimeError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise AapoError(f"rollout.backend=vllm: the {role} engine could not start ({first}); lower or raise "
                            f"vllm.gpu_memory_utilization (each engine takes that fraction of the GPU), "
                            f"or lower rollout.max_new_tokens") from exc
        # the dtype the weights are stored in (what the loader rounds pushed tensors to)
        self.dtype = str(next(self._model().parameters()).dtype).replace("torch.", "")
        try:
            self.max_model_len = self.llm.llm_engine.model_config.max_model_len
        except AttributeError:
            self.max_model_len = max_model_len

    def _model(self):
        # in-process engine core (external_launcher): the model lives in this process
        runner = self.llm.llm_engine.model_executor.driver_worker.model_runner
        return runner.get_model() if hasattr(runner, "get_model") else runner.model

    # -- memory --------------------------------------------------------------------------------
    def _sleep(self) -> None:
        if self.sleep_level:
            self.llm.sleep(level=self.sleep_level)

    def _wake(self, tags: list[str]) -> None:
        if self.sleep_level:
            if tags == ["weights"]:
                torch.cuda.empty_cache()
            self.llm.wake_up(tags=tags)

    # -- weights -------------------------------------------------------------------------------
    def load_weights(self, named_tensors) -> None:
        """Copy ``(HF name, full tensor)`` pairs into the engine (vLLM maps q/k/v and gate/up to its
        fused parameters). Cast here to the engine's dtype, the same rounding vLLM's loader would do,
        which otherwise logs a warning for every tensor."""
        dtype = getattr(torch, self.dtype)
        self._model().load_weights([(name, t.to(dtype)) for name, t in named_tensors])

    def reset_prefix_cache(self) -> None:
        self.llm.reset_prefix_cache()

    def _push(self) -> None:
        """With LoRA: only the adapter. It is gathered from its ZeRO-3 partitions, written as a peft
        adapter directory (:class:`aapo_app.lora.AdapterPublisher`, a new version and id each time) and
        named by a new ``LoRARequest``, which vLLM loads at the next request that carries it; the
        previous version is removed from the engine. The base weights are never pushed."""
        if self.lora is None:
            return super()._push()
        import tempfile

        from aapo_app.lora import AdapterPublisher

        if self.adapters is None:
            self.adapters = AdapterPublisher(tempfile.mkdtemp(prefix="aapo-lora-"), self.lora, self.model_path)
        old = self.lora_request
        name, lora_id, path = self.adapters.publish(self._trainer_module)
        from vllm.lora.request import LoRARequest

        self.lora_request = LoRARequest(name, lora_id, path)
        if old is not None:
            with contextlib.suppress(Exception):  # an adapter vLLM never loaded (no request carried it)
                self.llm.llm_engine.remove_lora(old.lora_int_id)
        self.reset_prefix_cache()

    def probe(self) -> dict[str, torch.Tensor]:
        return probe_slices(dict(self._model().named_parameters()))

    def storage_ids(self) -> set[int]:
        return {p.data_ptr() for p in self._model().parameters()}

    @property
    def source(self) -> str:
        return f"vllm-colocated-{self.role}"

    # -- sampling ------------------------------------------------------------------------------
    def sample(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, *, num_samples: int, sampling: Sampling,
               seed: int, adapter: bool = True):
        """``num_samples`` completions per prompt (greedy when temperature is None): one request per
        completion with its own seed; prefix caching shares the prompt's prefill among them. With
        LoRA, ``adapter=False`` samples the base alone (the reference group)."""
        prompts = prompt_token_lists(prompt_ids, prompt_mask)
        seeds = request_seeds(seed, len(prompts), num_samples)
        s, greedy = sampling, sampling.temperature is None
        requests, params = [], []
        for i, ids in enumerate(prompts):
            for j in range(num_samples):
                requests.append({"prompt_token_ids": ids})
                params.append(self.vllm.SamplingParams(
                    n=1, temperature=0.0 if greedy else s.temperature, top_p=1.0 if greedy else s.top_p,
                    top_k=0 if greedy else s.top_k, max_tokens=s.max_new_tokens, seed=seeds[i * num_samples + j],
                    min_tokens=s.max_new_tokens if s.ignore_eos else 0,
                    stop_token_ids=list(self.eos_ids), skip_special_tokens=True,
                    logprobs=0 if self.reports_logprobs and not greedy else None))
        lora = {"lora_request": self.lora_request} if adapter and self.lora_request is not None else {}
        outputs = self.llm.generate(requests, sampling_params=params, use_tqdm=False, **lora)
        completions = [c for out in outputs for c in out.outputs]
        rows = completion_rows([c.token_ids for c in completions], self.eos_ids, s.max_new_tokens)
        logprobs = [sampled_logprobs(c.token_ids, c.logprobs) for c in completions]
        return samples_from_rows(self.tokenizer, prompt_ids, prompt_mask, rows, num_samples, self.eos_ids,
                                 s.max_new_tokens, logprob_rows=logprob_rows(logprobs))


def logprob_rows(logprobs: list[list[float] | None]) -> list[list[float]] | None:
    """The sampled tokens' log-probs of every completion, or None unless every completion has them."""
    return None if any(lp is None for lp in logprobs) else logprobs


# --------------------------------------------------------------------------- server


def _first_numbers(rows) -> list[float]:
    """The sampled token's log-prob per completion token, from the shapes TRL versions return: a
    float per token, a list per token (sampled first), or a dict with 'logprob'."""
    values = []
    for item in rows or []:
        while isinstance(item, (list, tuple)) and item:
            item = item[0]
        if isinstance(item, dict):
            item = item.get("logprob", next(iter(item.values()), None))
        if isinstance(item, (int, float)):
            values.append(float(item))
    return values


SERVER_MIN_VLLM = (0, 22)  # TRL 1.16's client needs vLLM's weight-transfer endpoints


def check_server_client() -> None:
    """Server mode needs TRL's ``VLLMClient`` and a vLLM new enough to have the weight-transfer API."""
    import importlib.metadata
    import importlib.util

    if importlib.util.find_spec("trl") is None:
        raise AapoError("vllm.mode=server talks to the server through TRL's VLLMClient, which is not "
                        "installed; `pip install 'aapo[vllm-server]'`")
    version = importlib.metadata.version("vllm")
    parts = tuple(int(x) for x in version.split(".")[:2] if x.isdigit())
    if parts < SERVER_MIN_VLLM:
        raise AapoError(f"vllm.mode=server needs vLLM >= {'.'.join(map(str, SERVER_MIN_VLLM))} (its weight-"
                        f"transfer endpoints; this machine has {version}); upgrade vLLM, or use "
                        f"vllm.mode=colocate")


class ServerVLLM(VLLMEngine):
    """A ``vllm serve`` process shared by all ranks (started by the user; docs/vllm.md).

    Every rank sends its own prompts over HTTP. With ``push=True`` rank 0 joins the server's NCCL
    weight-transfer group (TRL's ``VLLMClient``) and streams the policy's weights to it."""

    # probe(): the server's greedy completion of PROBE_PROMPT and its log-probs (its weights cannot
    # be read from here)
    probe_kind = "logprobs"
    probe_tolerance = SERVER_PROBE_TOLERANCE
    probe_cross_tolerance = SERVER_CROSS_TOLERANCE
    compare = staticmethod(compare_greedy_probes)
    shares_message = ("vllm.reference_url reaches the policy's server ({where}, as vllm.server_url "
                      "does): the reference group would be sampled from the trained weights; start a second "
                      "`vllm serve` with model.path and give its URL")
    differs_message = ("vllm.reference_url: the reference server and the policy server compute different "
                       "log-probs for the same probe before any weight was pushed ({diff}); both must serve "
                       "model.path (restart a policy server that an earlier run pushed weights into)")
    changed_message = ("vllm.reference_url: the reference server's log-probs changed when weights were "
                       "pushed to the policy server ({diff}): both URLs reach one server (a proxy, another name "
                       "of the host) or something else writes to it; give the reference a `vllm serve` of its own "
                       "that holds model.path, or use rollout.reference_cache=DIR")

    def __init__(self, url: str, tokenizer, eos_ids: list[int], *, push: bool, rank: int, timeout_s: float,
                 role: str = "policy"):
        super().__init__(tokenizer, eos_ids)
        check_server_client()
        from trl.generation.vllm_client import VLLMClient

        self.role = role
        self.rank = rank
        self.url = url
        try:
            self.client = VLLMClient(base_url=url, connection_timeout=timeout_s)
        except Exception as exc:  # noqa: BLE001 - requests' errors and TRL's ConnectionError
            raise AapoError(f"vllm.{'server' if role == 'policy' else 'reference'}_url: no vLLM server answers "
                            f"at {url} within {timeout_s:.0f} s ({type(exc).__name__}); start it first "
                            f"(docs/vllm.md)") from exc
        self.pushing = push and rank == 0
        if self.pushing:
            self.client.init_communicator(device=torch.cuda.current_device() if torch.cuda.is_available() else 0)

    @property
    def source(self) -> str:
        return f"vllm-server:{self.url}"

    def shared_with(self, other) -> str:
        """'' unless this server and ``other`` are certainly one server (:func:`same_server`)."""
        return same_server(self.url, other.url)

    def _generate(self, prompt: list[int], *, n: int, max_new_tokens: int, temperature: float | None, top_p: float,
                  top_k: int, seed: int, eos_ids: list[int], logprobs: int | None = None,
                  min_tokens: int = 0) -> dict:
        """One /generate/ request: ``n`` completions of one prompt (greedy when temperature is None),
        with only our sampling settings."""
        greedy = temperature is None
        return self.client.generate(
            [prompt], n=n, temperature=0.0 if greedy else temperature, top_p=1.0 if greedy else top_p,
            top_k=0 if greedy else top_k, repetition_penalty=1.0, min_p=0.0, max_tokens=max_new_tokens,
            logprobs=logprobs, generation_kwargs={"seed": seed, "stop_token_ids": list(eos_ids),
                                                  "skip_special_tokens": True, "min_tokens": min_tokens})

    def _probe_request(self) -> dict[str, torch.Tensor]:
        try:
            out = self._generate(PROBE_PROMPT, n=1, max_new_tokens=PROBE_NEW_TOKENS, temperature=None, top_p=1.0,
                                 top_k=0, seed=0, eos_ids=[], logprobs=PROBE_TOP)
        except Exception as exc:  # noqa: BLE001 - requests' and TRL's errors, as one line
            field_name = "vllm.server_url" if self.role == "policy" else "vllm.reference_url"
            raise AapoError(f"{field_name}: the server at {self.url} did not answer the probe request "
                            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); check that it "
                            f"is a running `vllm serve` (docs/vllm.md)") from exc
        probe = {PROBE_TOKENS: torch.tensor(out["completion_ids"][0], dtype=torch.float64)}
        rows = (out.get("logprobs") or [None])[0]
        values = _first_numbers(rows)  # greedy: the sampled token is the most likely one, listed first
        if values:
            probe[PROBE_LOGPROBS] = torch.tensor(values, dtype=torch.float64)
        ids = (out.get("logprob_token_ids") or [None])[0]
        if ids and rows and all(isinstance(r, (list, tuple)) for r in list(ids) + list(rows)):
            width = max(len(r) for r in ids)  # ragged rows padded with id -1 at log-prob -1e9
            probe[PROBE_TOP_IDS] = torch.tensor([list(r) + [-1] * (width - len(r)) for r in ids], dtype=torch.float64)
            probe[PROBE_TOP_LOGPROBS] = torch.tensor([[float(x) for x in r] + [-1e9] * (width - len(r)) for r in rows],
                                                     dtype=torch.float64)
        return probe

    def probe(self) -> dict[str, torch.Tensor]:
        """The server's greedy completion of :data:`PROBE_PROMPT` and its log-probs, asked by rank 0
        alone (concurrent requests could be batched differently) and shared with every rank.
        Collective."""
        from aapo_app.engine import on_rank0

        return on_rank0(self._probe_request)

    def take_weights(self, module) -> int:
        """Rank 0 streams every gathered layer to the server (NCCL, TRL's client). TRL packs several
        tensors into one broadcast, so it may still hold a tensor after the next layer was gathered
        (and this one released): each gets its own copy. Collective."""
        from aapo_app.engine import stream_full_parameter_groups

        count = 0

        def stream():
            nonlocal count
            for group in stream_full_parameter_groups(module, per="layer"):
                count += len(group)
                for name, tensor in group:
                    yield name, tensor.clone()

        self.load_weights(stream(), push_metadata(module))
        return count

    def load_weights(self, named_tensors, metadata=None) -> None:
        """Rank 0 broadcasts the stream to the server; the other ranks only drain it (the ZeRO-3
        gathers behind it are collective)."""
        if not self.pushing:
            for _ in named_tensors:
                pass
            return
        with self.client.weight_update():
            self.client.update_named_params(metadata, named_tensors)

    def reset_prefix_cache(self) -> None:
        if self.pushing:
            self.client.reset_prefix_cache()

    def sample(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, *, num_samples: int, sampling: Sampling,
               seed: int):
        """One request per prompt with ``n`` = ``num_samples`` and the prompt's own seed (vLLM gives
        its n samples seed + j; a single request for all prompts would give sample j of every prompt
        the same seed), sent concurrently."""
        from concurrent.futures import ThreadPoolExecutor

        from aapo_app.rollout import stream_seed

        prompts = prompt_token_lists(prompt_ids, prompt_mask)

        s = sampling

        def one(i: int) -> dict:
            # logprobs=0: the sampled token's own log-prob; the server reports it under the distribution it
            # drew from only when started with --logprobs-mode processed_logprobs (docs/vllm.md)
            return self._generate(prompts[i], n=num_samples, max_new_tokens=s.max_new_tokens, temperature=s.temperature,
                                  top_p=s.top_p, top_k=s.top_k, seed=stream_seed(seed, i), eos_ids=self.eos_ids,
                                  logprobs=0 if s.temperature is not None else None,
                                  min_tokens=s.max_new_tokens if s.ignore_eos else 0)

        with ThreadPoolExecutor(max_workers=max(1, min(16, len(prompts)))) as pool:
            groups = list(pool.map(one, range(len(prompts))))
        ids = [c for out in groups for c in out["completion_ids"]]
        rows = completion_rows(ids, self.eos_ids, s.max_new_tokens)
        reported = [row for out in groups for row in (out.get("logprobs") or [None] * len(out["completion_ids"]))]
        logprobs = [(_first_numbers(r) or None) if r is not None else None for r in reported]
        logprobs = [lp if lp is not None and len(lp) == len(c) else None for lp, c in zip(logprobs, ids)]
        return samples_from_rows(self.tokenizer, prompt_ids, prompt_mask, rows, num_samples, self.eos_ids,
                                 s.max_new_tokens, logprob_rows=logprob_rows(logprobs))


# --------------------------------------------------------------------------- the trainer's side


def push_metadata(module) -> list[tuple[str, str, list[int]]]:
    """``(name, dtype, full shape)`` of every parameter, in :func:`~aapo_app.engine.stream_full_parameter_groups` order."""
    from aapo_app.engine import _layer_groups

    return [(name, str(p.dtype).replace("torch.", ""), list(getattr(p, "ds_shape", p.shape)))
            for group in _layer_groups(module) for name, p in group]


def push_weights(module, engine) -> int:
    """Stream the trainer's full parameters into ``engine`` one decoder layer at a time, then reset
    its prefix cache (its cached prompt states were computed with the old weights). Collective.
    Returns the number of tensors pushed."""
    count = engine.take_weights(module)
    engine.reset_prefix_cache()
    return count


class VLLMWeightsError(AapoError):
    """A vLLM engine does not hold the weights it should (the start-up or post-push check)."""


def push_weights_checked(module, engine, reference_engine=None) -> int:
    """:func:`push_weights`, then check that the push landed in the policy engine (colocated engines,
    whose weights this process can read) and that the reference engine still computes what it did
    at start-up (:func:`check_reference_unchanged`). Before the first push to an engine whose
    weights cannot be read (a server), :func:`verify_apart_by_test_push` proves the reference is
    not the policy's engine. Collective."""
    if (reference_engine is not None and reference_engine.probe_kind == "logprobs"
            and getattr(reference_engine, "reference_probe", None) is not None
            and not getattr(reference_engine, "apart_verified", False)):
        verify_apart_by_test_push(module, engine, reference_engine)
    pushed = push_weights(module, engine)
    if engine.probe_kind == "weights":
        expected = in_dtype(trainer_probe(module), engine.dtype)
        diff = compare_probes(engine.probe(), expected, 0.0)
        if diff:
            raise VLLMWeightsError(f"rollout.backend=vllm: after the weight push the policy engine does not hold the "
                                   f"trainer's weights ({diff}); this vLLM version's weight loader did not take them: "
                                   f"report it with `pip show vllm`, and use rollout.backend=deepspeed meanwhile")
    check_reference_unchanged(reference_engine)
    return pushed


def check_reference_unchanged(reference) -> None:
    """After a push to the policy engine: the reference engine's probe must still be the one it gave
    at start-up (:func:`check_engines_apart`); nothing is ever pushed to it. Collective."""
    if reference is None or getattr(reference, "reference_probe", None) is None:
        return
    diff = reference.compare(reference.probe(), reference.reference_probe,
                                        reference.probe_tolerance)
    if diff:
        raise VLLMWeightsError(reference.changed_message.format(diff=diff))


def verify_apart_by_test_push(module, policy, reference) -> None:
    """Two server URLs can reach one server while their addresses differ (a proxy, a port forward,
    another name of the host), and at start-up both hold the same weights, so their probes agree
    either way. So, once, right before the first real push: push :data:`TEST_PUSH_PARAM` negated to
    the policy engine (every logit changes sign: its greedy probe changes completely), then probe
    both. The policy's probe must have changed (a push takes effect there) and the reference's
    must not (it is another engine). The real push that follows overwrites the test tensor.
    Collective (the parameter is gathered from its ZeRO-3 partitions on every rank)."""
    import deepspeed

    params = dict(module.named_parameters())
    if TEST_PUSH_PARAM not in params:  # another architecture: the check after every push remains
        reference.apart_verified = True
        return
    param = params[TEST_PUSH_PARAM]
    before = policy.probe()

    def negated():
        with deepspeed.zero.GatheredParameters([param], enabled=hasattr(param, "ds_id")):
            yield TEST_PUSH_PARAM, (-param.data).clone()

    shape = list(getattr(param, "ds_shape", param.shape))
    policy.load_weights(negated(), [(TEST_PUSH_PARAM, str(param.dtype).replace("torch.", ""), shape)])
    policy.reset_prefix_cache()
    check_reference_unchanged(reference)
    if not policy.compare(policy.probe(), before, policy.probe_tolerance):
        raise VLLMWeightsError(f"vllm.server_url: a test push of {TEST_PUSH_PARAM} (negated) did not change "
                               f"what the policy server computes: weights pushed to it do not take effect; check the "
                               f"server's weight-transfer setup (docs/vllm.md), or use "
                               f"vllm.mode=colocate")
    reference.apart_verified = True


def check_engines_apart(policy, reference) -> None:
    """The start-up check: the reference engine is not the policy engine (colocated: no shared
    weight memory; servers: not certainly one server, :func:`same_server`), and both compute the
    same probe (both start from model.path). The reference's probe is kept for
    :func:`check_reference_unchanged`. Collective."""
    if reference is None:
        return
    if reference is policy:
        where = "itself"
    else:
        where = reference.shared_with(policy)
    if where:
        raise VLLMWeightsError(reference.shares_message.format(where=where))
    found = reference.probe()
    tolerance = max(policy.probe_cross_tolerance, reference.probe_cross_tolerance)
    diff = reference.compare(found, policy.probe(), tolerance)
    if diff:
        raise VLLMWeightsError(reference.differs_message.format(diff=diff))
    reference.reference_probe = found


def check_vllm_config(cfg, algorithm) -> None:
    """What a vLLM run's configuration needs (one-line errors), on any machine."""
    v = cfg.vllm
    if (v.mode == "server" and algorithm.uses_reference_samples and not cfg.rollout.reference_cache
            and not v.reference_url):
        raise AapoError(f"vllm.reference_url: {cfg.algorithm.name} samples a reference group every step; "
                        f"start a second `vllm serve` with the reference model and give its URL, or build a "
                        f"reference cache (aapo reference-rollouts) and set rollout.reference_cache=DIR")


def check_vllm_machine(v, field_name: str = "rollout.backend=vllm", fallback: str = "rollout.backend=deepspeed") -> None:
    """What this machine needs for ``vllm`` settings ``v``: vLLM and a GPU, and for server mode TRL's client."""
    check_vllm(field_name, fallback)
    if v is not None and v.mode == "server":
        check_server_client()


def check_vllm_run(cfg, algorithm) -> None:
    """What a vLLM run needs, checked before any engine is built (one-line errors)."""
    check_vllm_config(cfg, algorithm)
    check_vllm_machine(cfg.vllm)


def build_engines(v, model_path: str, tokenizer, eos_ids: list[int], *, rank: int, seed: int, reference: bool,
                  max_num_seqs: int, max_model_len: int, lora=None):
    """The policy's vLLM engine and (when ``reference``) the reference's, per ``vllm.mode``,
    checked apart (:func:`check_engines_apart`). Collective."""
    if v.mode == "server":
        policy = ServerVLLM(v.server_url, tokenizer, eos_ids, push=True, rank=rank, timeout_s=v.timeout_s)
        ref = (ServerVLLM(v.reference_url, tokenizer, eos_ids, push=False, rank=rank, timeout_s=v.timeout_s,
                          role="reference")
               if reference else None)
        check_engines_apart(policy, ref)
        return policy, ref
    common = dict(tokenizer=tokenizer, eos_ids=eos_ids, seed=seed, gpu_memory_utilization=v.gpu_memory_utilization, max_model_len=max_model_len,
                  max_num_seqs=max_num_seqs, dtype=v.dtype)
    policy = ColocatedVLLM(model_path, sleep_level=v.sleep_level, role="policy", lora=lora, **common)
    # vLLM allows one sleep-mode engine per process: the reference engine stays resident
    ref = ColocatedVLLM(model_path, sleep_level=0, role="reference", **common) if reference else None
    check_engines_apart(policy, ref)
    return policy, ref
