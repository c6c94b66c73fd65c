"""rollout.backend=vllm: the parts that run without vLLM (configuration, the weight-sync schedule, the
conversion of vLLM's completions) on CPU, and the GPU path itself where vLLM and CUDA exist.

The 2-rank weight push into inference engines is in test_multirank.py."""

import importlib.util
import sys

import pytest
import torch

from aapo_app.config import load_run_config
from aapo_app.errors import AapoError
from aapo_app.vllm_engine import WeightSync, completion_rows, request_seeds, to_samples
from test_cli import assert_one_line_error
from test_engine import tiny_overrides, train_run

HAS_VLLM_GPU = importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()


# --------------------------------------------------------------------------- configuration


@pytest.mark.parametrize("override, message", [
    ("rollout.backend=sglang", "rollout.backend must be 'deepspeed' or 'vllm'"),
    ("rollout.vllm_mode=remote", "rollout.vllm_mode must be 'colocate' or 'server'"),
    ("rollout.vllm_gpu_memory_utilization=1.5", "rollout.vllm_gpu_memory_utilization must be in (0, 1)"),
    ("rollout.vllm_sleep_level=3", "rollout.vllm_sleep_level must be 0, 1 or 2"),
    ("rollout.vllm_dtype=int8", "rollout.vllm_dtype must be auto, bfloat16, float16 or float32"),
])
def test_bad_vllm_settings_are_refused(override, message):
    with pytest.raises(AapoError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_run_config(None, [override])


def test_vllm_settings_that_contradict_each_other_are_refused():
    with pytest.raises(AapoError, match="rollout.gather=layerwise and rollout.deepspeed_hybrid_engine do not apply"):
        load_run_config(None, ["rollout.backend=vllm", "rollout.gather=layerwise"])
    with pytest.raises(AapoError, match="needs rollout.vllm_server_url"):
        load_run_config(None, ["rollout.backend=vllm", "rollout.vllm_mode=server"])
    with pytest.raises(AapoError, match="must be an http"):
        load_run_config(None, ["rollout.backend=vllm", "rollout.vllm_mode=server", "rollout.vllm_server_url=host:8000"])
    with pytest.raises(AapoError, match="is the policy's server"):
        load_run_config(None, ["rollout.backend=vllm", "rollout.vllm_mode=server",
                               "rollout.vllm_server_url=http://h:8000", "rollout.vllm_reference_url=http://h:8000/"])
    # the settings are only checked against each other when vLLM is chosen
    assert load_run_config(None, ["rollout.vllm_mode=server"]).rollout.backend == "deepspeed"


@pytest.mark.skipif(HAS_VLLM_GPU, reason="this machine can run vLLM")
def test_a_vllm_run_without_vllm_or_a_gpu_stops_in_one_line(tiny_model_dir, tmp_path):
    """Refused before anything is built or written (aapo eval --backend vllm: test_eval.py)."""
    assert_one_line_error(["train", *tiny_overrides(tiny_model_dir, tmp_path / "run", "rollout.backend=vllm")],
                          ["rollout.backend=vllm", "rollout.backend=deepspeed"])
    assert not (tmp_path / "run").exists()


def test_a_server_run_for_aapo_needs_a_reference_server_or_a_cache():
    from aapo_app.algorithms import build_algorithm
    from aapo_app.vllm_engine import check_vllm_run

    server = ["rollout.backend=vllm", "rollout.vllm_mode=server", "rollout.vllm_server_url=http://h:8000"]
    aapo, grpo = build_algorithm("aapo", None), build_algorithm("grpo", None)
    with pytest.raises(AapoError, match="rollout.vllm_reference_url: aapo samples a reference group"):
        check_vllm_run(load_run_config(None, server), aapo)
    # GRPO samples no reference group; AAPO with a cache needs no reference server: next comes vLLM itself
    for cfg, algorithm in ((load_run_config(None, server), grpo),
                           (load_run_config(None, [*server, "rollout.reference=cached:somewhere"]), aapo)):
        if HAS_VLLM_GPU:
            check_vllm_run(cfg, algorithm)
        else:
            with pytest.raises(AapoError, match="rollout.backend=vllm"):
                check_vllm_run(cfg, algorithm)


# --------------------------------------------------------------------------- the sync schedule


def test_weights_are_pushed_only_when_the_trainer_changed_them():
    sync = WeightSync(sleep_level=1)
    assert not sync.needs_push()  # both start from the checkpoint
    sync.optimizer_step(applied=True)
    assert sync.needs_push()
    sync.did_push()
    assert not sync.needs_push()
    sync.fell_asleep()  # level 1 keeps the weights in CPU memory: nothing to push on waking
    sync.woke()
    assert not sync.needs_push()
    sync.optimizer_step(applied=False)  # DeepSpeed skipped a non-finite step: the weights did not move
    assert not sync.needs_push()
    sync.optimizer_step(applied=True)
    sync.optimizer_step(applied=True)  # two steps between rollouts (e.g. an evaluation did not happen): one push
    assert sync.needs_push()
    sync.did_push()
    assert (sync.version, sync.pushed, sync.pushes) == (3, 3, 2)
    sync.weights_replaced()  # --resume loaded a checkpoint into the trainer
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


def test_the_trainer_counts_the_weight_changes_a_vllm_engine_would_need(tiny_model_dir, tmp_path):
    """The schedule is kept on every backend: two applied optimizer steps are two versions."""
    trainer = train_run(load_run_config(None, tiny_overrides(tiny_model_dir, tmp_path / "run")))
    assert trainer.weight_sync.version == 2 and trainer.vllm is None


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
    s = to_samples(_Tok(), prompt_ids, prompt_mask, rows, num_samples=2, eos_ids=[2], max_new_tokens=3)
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
                         "rollout.vllm_gpu_memory_utilization=0.2", "rewards.plugins=[plugin_rewards]")],
        DS_ACCELERATOR="cuda")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and 0.0 <= summary["eval_after"] <= 1.0
