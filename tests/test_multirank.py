"""2 data-parallel ranks through the real launchers (torchrun and deepspeed), tiny model, CPU/gloo."""

import json
import os
import shutil
import subprocess
import sys
from collections import defaultdict

import pytest
from helpers import REPO, free_port, run, subprocess_env

pytestmark = pytest.mark.slow


def train_args(model_dir, out):
    return ["train", "--max-steps", "2", "--output-dir", str(out), f"model.path={model_dir}",
            "rollout.group_size=4", "rollout.prompts_per_rank=2", "rollout.max_new_tokens=6",
            "train.micro_batch_size=4", "data.eval_size=6", "train.eval_max_new_tokens=6",
            "rewards.num_workers=1", "train.learning_rate=1e-3"]


def check_data_parallel_run(out):
    """Each step: 2 ranks x 2 whole groups of 4, disjoint prompts; one metrics line per step."""
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [0, 1, 2]
    by_step = defaultdict(dict)
    for rank in (0, 1):
        for line in (out / "rollouts" / f"rank{rank}.jsonl").read_text().splitlines():
            g = json.loads(line)
            assert g["rank"] == rank and len(g["completions"]) == 4 and len(g["ref_completions"]) == 4
            by_step[g["step"]].setdefault(rank, []).append(g["prompt_id"])
    for step in (1, 2):
        r0, r1 = by_step[step][0], by_step[step][1]
        assert len(r0) == len(r1) == 2 and not set(r0) & set(r1), (step, r0, r1)


@pytest.mark.parametrize("gather", ["full", "layerwise"])
def test_torchrun_two_ranks(tiny_model_dir, tmp_path, gather):
    """`layerwise` generates on the partitioned model with synced_gpus: ranks gather together."""
    out = tmp_path / "run"
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         "-m", "aapo_app", *train_args(tiny_model_dir, out), f"rollout.gather={gather}"])
    check_data_parallel_run(out)


def test_deepspeed_launcher_two_ranks(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    launcher = shutil.which("deepspeed", path=os.path.dirname(sys.executable)) or shutil.which("deepspeed")
    assert launcher, "the deepspeed launcher is not installed"
    run([launcher, "--num_gpus", "2", "--master_port", str(free_port()), "--module", "aapo_app",
         *train_args(tiny_model_dir, out)])
    check_data_parallel_run(out)


def test_dapo_dynamic_sampling_keeps_ranks_in_step(tiny_model_dir, tmp_path):
    """Every group is flat on the random model (boxed_format is never met): both ranks must take the
    same extra rounds together (generation under ZeRO-3 is collective) and still hold disjoint prompts."""
    out = tmp_path / "run"
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         "-m", "aapo_app", *train_args(tiny_model_dir, out), "algorithm.name=dapo", "algorithm.max_resample_tries=1",
         "rewards.weights={boxed_format: 1.0}"])
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m.get("resample_rounds") for m in metrics[1:]] == [1.0, 1.0]
    for step in (1, 2):
        ids = {r: [json.loads(x)["prompt_id"] for x in (out / "rollouts" / f"rank{r}.jsonl").read_text().splitlines()
                   if json.loads(x)["step"] == step] for r in (0, 1)}
        assert len(ids[0]) == len(ids[1]) == 2 and not set(ids[0]) & set(ids[1])


def test_two_nodes_on_localhost_match_one_node(tiny_model_dir, tmp_path):
    """Two "nodes" started separately through launch/node_rank.sh (the deepspeed launcher with
    --hostfile, --no_ssh, --node_rank 0/1, one rank each) train 2 steps and end with exactly the
    parameters of 2 ranks on one node (launch/single_node.sh) with the same seed."""
    import torch
    from safetensors.torch import load_file

    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    # a reward that varies on the random model (tests/plugin_rewards.py), so the parameters move
    extra = ["rewards.plugins=[plugin_rewards]", "rewards.weights={test_char_length: 1.0}"]
    env = subprocess_env(MASTER_PORT=str(free_port()))
    nodes = [subprocess.Popen(["bash", str(REPO / "launch" / "node_rank.sh"), str(hostfile), str(rank),
                               "127.0.0.1", *train_args(tiny_model_dir, tmp_path / "nodes"), *extra],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
             for rank in (0, 1)]
    outputs = [node.communicate(timeout=900) for node in nodes]
    for node, (out, err) in zip(nodes, outputs):
        assert node.returncode == 0, (out[-2000:], err[-3000:])
    assert "--no_ssh --node_rank 0" in outputs[0][0] and "--no_ssh --node_rank 1" in outputs[1][0]  # printed
    run(["bash", REPO / "launch" / "single_node.sh", "2", *train_args(tiny_model_dir, tmp_path / "single"), *extra],
        MASTER_PORT=str(free_port()))
    check_data_parallel_run(tmp_path / "nodes")
    a = load_file(tmp_path / "nodes" / "checkpoints" / "step-2" / "model.safetensors")
    b = load_file(tmp_path / "single" / "checkpoints" / "step-2" / "model.safetensors")
    base = load_file(tiny_model_dir / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], base[k]) for k in a)  # training moved them


@pytest.mark.parametrize("per", ["layer", "param"])
def test_streaming_gather_yields_exactly_the_full_weights(tiny_model_dir, tmp_path, per):
    """On 2 ZeRO-3 ranks, streaming the parameters one layer (or one parameter) at a time gives every
    rank exactly the model file's weights, and never more than one layer is unpartitioned at once."""
    import torch
    from transformers import AutoModelForCausalLM

    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         REPO / "tests" / "stream_params_script.py", tiny_model_dir, tmp_path, per])
    want = dict(AutoModelForCausalLM.from_pretrained(tiny_model_dir).named_parameters())
    layer = sum(p.numel() for name, p in want.items() if ".layers.0." in name)
    biggest = max(p.numel() for p in want.values())
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["params"].keys() == want.keys()
        for name, tensor in got["params"].items():
            assert torch.equal(tensor, want[name].data), name
        # at most one group gathered at a time: one layer's (or the largest single) parameters
        assert biggest <= got["most_gathered"] <= (max(layer, biggest) if per == "layer" else biggest) < got["total"]


def test_weight_push_to_inference_engines_on_two_ranks(tiny_model_dir, tmp_path):
    """rollout.backend=vllm's push on 2 ZeRO-3 ranks: every rank's receiving engine ends up with exactly
    the trainer's (moved) weights, one decoder layer per load, then one prefix-cache reset; the frozen
    reference engine is untouched; and the checks catch an engine that ignored the push, a reference
    engine sharing the policy engine's memory, and one whose weights moved with the policy."""
    import torch
    from transformers import AutoModelForCausalLM

    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         REPO / "tests" / "push_weights_script.py", tiny_model_dir, tmp_path])
    base = dict(AutoModelForCausalLM.from_pretrained(tiny_model_dir).named_parameters())
    # the script adds 0.01 * (i + 1) to the i-th parameter
    want = {name: p.data + 0.01 * (i + 1) for i, (name, p) in enumerate(base.items())}
    layer = sum(p.numel() for name, p in base.items() if ".layers.0." in name)
    n_layers = len({name.split(".layers.")[1].split(".")[0] for name in base if ".layers." in name})
    for rank in (0, 1):
        got = torch.load(tmp_path / f"push-rank{rank}.pt")
        assert got["pushed"] == len(base)
        for name, tensor in got["policy"].items():
            assert torch.equal(tensor, want[name]), name
        # one load per decoder layer plus one per remaining parameter (embeddings, final norm, ...)
        assert got["loads"] == n_layers + sum(1 for name in base if ".layers." not in name)
        assert got["most_in_one_load"] == max(layer, max(p.numel() for p in base.values()))
        assert got["resets"] == 1 and got["reference_unchanged"]
        assert got["apart"] == ""
        assert "shares memory" in got["same"]
        assert "does not hold the trainer's weights" in got["deaf"]
        assert "reference engine's weights changed" in got["aliased"]
