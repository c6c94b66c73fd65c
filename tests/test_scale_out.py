"""Scale-out pieces that run without a cluster: every shipped DeepSpeed config and training recipe
validates, the launch wrappers print the commands they run, the learning-rate schedules, the
dataset adapters, and ZeRO-3 partitioned loading."""

import os
import subprocess
from pathlib import Path

import pytest
import torch

from aapo_app.config import load_run_config
from aapo_app.data import DATA_PRESETS, DataConfig, load_examples
from aapo_app.ds_config import fill_ds_config, read_ds_config
from aapo_app.errors import AapoError

REPO = Path(__file__).resolve().parents[1]
REPO_DS_CONFIGS = REPO / "ds_configs"  # the user-facing copy (tests/test_package.py: same bytes as the packaged one)
RECIPES = sorted((REPO / "launch" / "recipes").glob("*.yaml"))
DS_FILES = sorted(REPO_DS_CONFIGS.glob("*.json"))


def deepspeed_accepts(ds: dict) -> None:
    """DeepSpeed's own config parser (batch arithmetic, sections) on a filled config (1 rank here)."""
    from deepspeed.runtime.config import DeepSpeedConfig

    DeepSpeedConfig(ds, mpu=None)


def test_shipped_ds_configs_validate():
    assert {p.name for p in DS_FILES} >= {
        "zero3_bf16.json", "zero3_inference_bf16.json", "zero3_offload_bf16.json", "zero3_offload_inference_bf16.json",
        "zero2_bf16.json", "zero2_inference_bf16.json", "zero3_cpu.json", "zero3_inference_cpu.json",
        "zero2_cpu.json", "zero2_inference_cpu.json"}
    readme = (REPO_DS_CONFIGS / "README.md").read_text()
    cfg = load_run_config(None, ["train.lr_scheduler=cosine", "train.warmup_steps=2", "train.min_lr_ratio=0.1"])
    for path in DS_FILES:
        assert f"`{path.name}`" in readme, f"{path.name} is not described in ds_configs/README.md"
        training = "inference" not in path.name
        ds = fill_ds_config(read_ds_config(path, None), cfg, 1, training=training)
        deepspeed_accepts(ds)
        assert "auto" not in str(ds), path.name  # every "auto" was filled
        if training:  # the run's schedule goes to DeepSpeed as a client scheduler, not a config section
            assert "scheduler" not in ds
            assert ds["train_batch_size"] == cfg.micro_batch_rows * cfg.gradient_accumulation_steps


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipes_validate(recipe):
    """Each recipe loads strictly, fits DeepSpeed's batch arithmetic at its GPU count, and says how
    to launch it."""
    text = recipe.read_text()
    header = "".join(line for line in text.splitlines(keepends=True) if line.startswith("#"))
    assert "launch/single_node.sh" in header and "Hardware:" in header
    gpus = int(header.split("launch/single_node.sh ")[1].split()[0])
    cfg = load_run_config(recipe)
    for name, training in (("zero3_bf16.json", True), ("zero3_inference_bf16.json", False)):
        ds = fill_ds_config(read_ds_config(REPO_DS_CONFIGS / name, None), cfg, gpus, training=training)
        ds_one = dict(ds, train_batch_size=ds["train_batch_size"] // gpus)  # the parser sees 1 rank here
        deepspeed_accepts(ds_one)
    assert cfg.data.preset in DATA_PRESETS and cfg.train.learning_rate == 1e-6


def test_recipes_match_the_paper():
    """The paper's setups, per recipe: G, per-device batch = prompts_per_rank x G / accumulation, lr, lengths."""
    r = {p.stem: load_run_config(p) for p in RECIPES}
    assert set(r) == {"1.5b-open-rs", "7b-simplelr", "llama-1b", "llama-3b"}
    a = r["1.5b-open-rs"]
    assert (a.rollout.group_size, a.train.micro_batch_size, a.gradient_accumulation_steps) == (6, 6, 4)
    assert a.rewards.weights == {"format": 1.0, "cosine": 2.0} and a.rollout.max_new_tokens == 3584
    assert a.train.lr_scheduler == "cosine" and a.train.min_lr_ratio == 0.1
    assert a.train.warmup_steps == round(0.1 * a.train.max_steps) and a.rollout.temperature == 0.7
    assert a.data.system_prompt.startswith("You are a helpful AI Assistant")
    b = r["7b-simplelr"]
    assert (b.rollout.group_size, b.train.micro_batch_size, b.gradient_accumulation_steps) == (8, 8, 4)
    assert b.rewards.weights == {"accuracy": 1.0} and b.rollout.max_new_tokens == 3072
    assert b.train.warmup_steps == round(0.03 * b.train.max_steps) and b.rollout.temperature == 1.0
    assert b.data.system_prompt.startswith("A conversation between User and Assistant")
    for name in ("llama-1b", "llama-3b"):
        c = r[name]
        assert (c.rollout.group_size, c.train.micro_batch_size, c.gradient_accumulation_steps) == (8, 16, 1)
        assert c.data.system_prompt is None and c.data.preset == "simplelr_abel_level3to5"
        assert c.model.path.startswith("meta-llama/Llama-3.2-")


def test_launch_wrappers_print_their_commands(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("gpu-a slots=8\ngpu-b slots=8\n")
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(DRY_RUN="1", MASTER_PORT="29600")

    def printed(*args):
        out = subprocess.run(["bash", *args], env=env, capture_output=True, text=True, cwd=REPO)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    launch = REPO / "launch"
    assert printed(launch / "single_node.sh", "8", "--max-steps", "4") == (
        "+ deepspeed --num_gpus 8 --master_port 29600 --module aapo_app train --max-steps 4")
    assert printed(launch / "single_node.sh", "2", "eval", "--limit", "2").endswith("--module aapo_app eval --limit 2")
    assert printed(launch / "multi_node.sh", hostfile, "--config", "r.yaml") == (
        f"+ deepspeed --hostfile {hostfile} --launcher pdsh --master_addr gpu-a --master_port 29600 "
        f"--module aapo_app train --config r.yaml")
    assert printed(launch / "node_rank.sh", hostfile, "1", "10.0.0.1", "--max-steps", "2") == (
        f"+ deepspeed --hostfile {hostfile} --no_ssh --node_rank 1 --master_addr 10.0.0.1 --master_port 29600 "
        f"--module aapo_app train --max-steps 2")
    sbatch = (launch / "slurm.sbatch").read_text()
    assert "#SBATCH --nodes=" in sbatch and "launch/node_rank.sh" in sbatch and "scontrol show hostnames" in sbatch
    out = subprocess.run(["bash", "-n", launch / "slurm.sbatch"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr  # parses


def test_own_scheduler_section_counts_optimizer_steps():
    """A DeepSpeed config with its own scheduler: its "auto" step counts are filled in optimizer
    steps (DAPO's default 4 mini-batches: warm-up 2 and 10 training steps are 8 and 40)."""
    cfg = load_run_config(None, ["algorithm.name=dapo", "train.max_steps=10", "train.warmup_steps=2"])
    ds = {"scheduler": {"type": "WarmupDecayLR", "params": {"warmup_num_steps": "auto", "total_num_steps": "auto",
                                                           "warmup_max_lr": "auto"}}}
    params = fill_ds_config(ds, cfg, 1)["scheduler"]["params"]
    assert (params["warmup_num_steps"], params["total_num_steps"]) == (8, 40)


def test_micro_batch_size_only_splits_work():
    """train.micro_batch_size need not divide anything: 3 prompts x 4 = 12 sequences per rank in
    micro-batches of at most 5 are 3 micro-batches (5, 5, 2); DAPO's 4 mini-batches of 3 take 1."""
    cfg = load_run_config(None, ["rollout.prompts_per_rank=3", "rollout.group_size=4", "train.micro_batch_size=5"])
    assert (cfg.micro_batch_rows, cfg.gradient_accumulation_steps) == (5, 3)
    dapo = load_run_config(None, ["algorithm.name=dapo", "rollout.prompts_per_rank=3", "rollout.group_size=4",
                                  "train.micro_batch_size=5"])
    assert (dapo.sequences_per_optimizer_step, dapo.micro_batch_rows, dapo.gradient_accumulation_steps) == (3, 3, 1)
    with pytest.raises(AapoError, match=r"algorithm.mini_batches=4 does not divide the 6 sequences per rank"):
        load_run_config(None, ["algorithm.name=dapo", "rollout.prompts_per_rank=3", "rollout.group_size=2"])


def test_scheduler_in_two_places_is_an_error():
    cfg = load_run_config(None, ["train.lr_scheduler=cosine"])
    ds = {"train_batch_size": "auto", "scheduler": {"type": "WarmupLR", "params": {}}}
    with pytest.raises(AapoError, match="remove the section"):
        fill_ds_config(ds, cfg, 1)


def test_data_presets(shared_dir, monkeypatch):
    """math_train_level3to5 on a user-given MATH train file keeps difficulty >= 3 (5,563 of 7,474 rows; 4 of those have an
    empty answer and are skipped); a hub preset asks datasets for its folder and columns."""
    path = str(shared_dir / "datasets" / "math_train" / "math_train.json")
    cfg = load_run_config(None, ["data.preset=math_train_level3to5", f"data.source={path}", "data.eval_size=8"])
    assert cfg.data.min_difficulty == 3 and cfg.data.problem_column == "problem"  # from the preset
    train, held_out = load_examples(cfg.data, 0)
    assert len(train) + len(held_out) == 5563 - 4
    # it names no dataset of its own: without data.source it is one error naming the field and columns
    # (never the arithmetic generator read through MATH's columns)
    with pytest.raises(AapoError, match=r"^data\.source: data\.preset=math_train_level3to5 names no dataset; .*"
                                        r"columns problem, answer, difficulty$"):
        load_run_config(None, ["data.preset=math_train_level3to5"])
    import datasets

    calls = []

    def fake_load(source, split=None, data_dir=None):
        calls.append((source, split, data_dir))
        return datasets.Dataset.from_list([{"question": f"q{i}", "gt_answer": str(i)} for i in range(20)])

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    cfg = load_run_config(None, ["data.preset=simplelr_qwen_level3to5", "data.eval_size=4"])
    train, held_out = load_examples(cfg.data, 0)
    assert calls[0] == ("hkust-nlp/SimpleRL-Zoo-Data", "train", "simplelr_qwen_level3to5")
    assert len(train) == 16 and {ex.answer for ex in held_out} <= {str(i) for i in range(20)}
    with pytest.raises(AapoError, match="data.preset: unknown preset 'open_rs'"):
        load_run_config(None, ["data.preset=open_rs"])
    with pytest.raises(AapoError, match="data.difficulty_column"):
        load_examples(DataConfig(source=path, min_difficulty=3, difficulty_column="level"), 0)
    with pytest.raises(AapoError, match="data.min_difficulty"):
        load_examples(DataConfig(source=path, min_difficulty=9), 0)


def test_reward_plugins_are_imported(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "from aapo_app.rewards import Reward, register_reward\n"
        "@register_reward('always_one')\n"
        "class AlwaysOne(Reward):\n"
        "    def __call__(self, completions, answers, lengths):\n"
        "        return [1.0] * len(completions)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = load_run_config(None, ["rewards.plugins=[my_rewards]", "rewards.weights={always_one: 1.0}"])
    assert cfg.rewards.weights == {"always_one": 1.0}
    with pytest.raises(AapoError, match="rewards.plugins: cannot import 'no_such_module'"):
        load_run_config(None, ["rewards.plugins=[no_such_module]"])


def test_zero3_loading_partitions_the_weights(tiny_model_dir):
    """Under a ZeRO-3 config the model is partitioned as it loads (deepspeed.zero.Init): every
    parameter is a ZeRO-3 parameter with no full local data; the partitions hold the file's weights."""
    import deepspeed
    from transformers import AutoModelForCausalLM

    from aapo_app.engine import init_distributed
    from aapo_app.models import load_causal_lm

    init_distributed()
    cfg = load_run_config(None, [f"model.path={tiny_model_dir}", "rollout.prompts_per_rank=2",
                                 "rollout.group_size=2", "train.micro_batch_size=4", "precision=fp32"])
    ds = fill_ds_config(read_ds_config(None, "zero3_cpu.json"), cfg, 1)
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # partitioned even on one rank
    model = load_causal_lm(str(tiny_model_dir), ds_config=ds)
    params = dict(model.named_parameters())
    assert all(hasattr(p, "ds_id") and p.numel() == 0 for p in params.values())  # partitioned, nothing local
    reference = dict(AutoModelForCausalLM.from_pretrained(tiny_model_dir).named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values())):
        for name, p in params.items():
            assert torch.equal(p.data, reference[name].data), name
    # and the flag does not leak: a later plain load is a plain model
    plain = load_causal_lm(str(tiny_model_dir))
    assert not any(hasattr(p, "ds_id") for p in plain.parameters())
