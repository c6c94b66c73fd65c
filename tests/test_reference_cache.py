"""`aapo reference-rollouts` and rollout.reference_cache=DIR (tiny model; one 2-rank launch, slow)."""

import json
import os
import shutil
import sys

import pytest

from aapo_app.config import load_run_config
from aapo_app.errors import AapoError
from aapo_app.reference_cache import build, read_records
from aapo_app.trainer import Trainer
from helpers import free_port, run
from test_engine import tiny_overrides, train_run
import test_vllm

fake_servers, resolving = test_vllm.fake_servers, test_vllm.resolving  # fixtures of tests/test_vllm.py

# test_char_length (tests/plugin_rewards.py) is len(completion) / 100; boxed_format is 1 with a \boxed{}
WEIGHTS = {"accuracy": 0.0, "test_char_length": 1.0, "boxed_format": 0.5}


def _cfg(model_dir, out_dir, *extra):
    return load_run_config(None, tiny_overrides(model_dir, out_dir, "algorithm.name=aapo",
                                                "data.max_train_examples=10", *extra))


@pytest.fixture(scope="module")
def cache(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("refcache")
    counts = build(_cfg(tiny_model_dir, tmp / "unused"), tmp / "cache", log=lambda msg: None)
    return tmp / "cache", counts


def test_cache_holds_every_prompt_with_g_scored_completions(cache):
    cache_dir, counts = cache
    records = read_records(cache_dir)
    assert counts == {"cached_before": 0, "sampled": 10, "total": 10} and len(records) == 10
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    assert manifest["components"]["sampling"]["group_size"] == 4
    assert manifest["sources"] == [{"source": "deepspeed-reference"}]  # where the samples came from
    for rec in records.values():
        assert rec["source"] == "deepspeed-reference"
        assert len(rec["completions"]) == len(rec["completion_ids"]) == len(rec["rewards"]) == 4
        assert [len(ids) for ids in rec["completion_ids"]] == rec["lengths"]
        for j in range(4):  # the stored total is the weighted sum of the stored parts
            total = sum(WEIGHTS[k] * rec["reward_parts"][k][j] for k in WEIGHTS)
            assert rec["rewards"][j] == pytest.approx(total, abs=1e-6)
            # test_char_length is len(text) / 100 of the stored text
            assert rec["reward_parts"]["test_char_length"][j] == pytest.approx(len(rec["completions"][j]) / 100)


def test_a_killed_build_resumes_with_only_the_missing_prompts(cache, tiny_model_dir, tmp_path):
    cache_dir, _ = cache
    copy = tmp_path / "cache"
    shutil.copytree(cache_dir, copy)
    part = copy / "part-0.jsonl"
    lines = part.read_text().splitlines()
    part.write_text("\n".join(lines[:-2]) + "\n" + lines[-2][: len(lines[-2]) // 2])  # 2 lost, one torn
    counts = build(_cfg(tiny_model_dir, tmp_path / "unused"), copy, log=lambda msg: None)
    assert counts == {"cached_before": 8, "sampled": 2, "total": 10}
    assert set(read_records(copy)) == set(read_records(cache_dir))


def test_seeds_extend_the_cache_to_other_splits(cache, tiny_model_dir, tmp_path):
    """--seeds 0,1 adds the training prompts of seed 1's split that seed 0's lacked, and a seed-1
    run then finds every prompt it draws."""
    from aapo_app.data import load_examples

    cache_dir, _ = cache
    copy = tmp_path / "cache"
    shutil.copytree(cache_dir, copy)
    cfg = _cfg(tiny_model_dir, tmp_path / "unused")
    ids = {seed: {ex.id for ex in load_examples(cfg.data, seed)[0]} for seed in (0, 1)}
    new = len(ids[1] - ids[0])
    assert new > 0  # the two seeds' splits differ, else this test would prove nothing
    counts = build(cfg, copy, log=lambda msg: None, seeds=[0, 1])
    assert counts == {"cached_before": 10, "sampled": new, "total": 10 + new}
    assert {rec["prompt_id"] for rec in read_records(copy).values()} == ids[0] | ids[1]
    run = _cfg(tiny_model_dir, tmp_path / "run", f"rollout.reference_cache={copy}", "train.seed=1")
    assert train_run(run).reference is None


def test_training_uses_the_stored_groups_and_builds_no_reference_engine(cache, tiny_model_dir, tmp_path):
    cache_dir, _ = cache
    cfg = _cfg(tiny_model_dir, tmp_path / "run", f"rollout.reference_cache={cache_dir}")
    trainer = train_run(cfg)
    assert trainer.reference is None
    stored = {rec["prompt_id"]: rec for rec in read_records(cache_dir).values()}
    logged = [json.loads(line) for line in (trainer.output_dir / "rollouts" / "rank0.jsonl").read_text().splitlines()]
    assert len(logged) == 4  # 2 steps x 2 prompts
    for rec in logged:
        assert rec["ref_completions"] == stored[rec["prompt_id"]]["completions"]
        assert rec["ref_rewards"] == pytest.approx(stored[rec["prompt_id"]]["rewards"])


def test_a_cache_for_other_settings_is_refused(cache, tiny_model_dir, tmp_path):
    cache_dir, _ = cache
    cfg = _cfg(tiny_model_dir, tmp_path / "run", f"rollout.reference_cache={cache_dir}", "rollout.temperature=0.9")
    with pytest.raises(AapoError, match=r"sampling.temperature \(cache 0.7, this run 0.9\)"):
        Trainer(cfg)
    with pytest.raises(AapoError, match=r"--out: .*rewards.weights"):
        build(_cfg(tiny_model_dir, tmp_path / "unused", "rewards.weights={test_char_length: 2.0}"), cache_dir,
              log=lambda msg: None)
    with pytest.raises(AapoError, match="is not a reference cache"):
        Trainer(_cfg(tiny_model_dir, tmp_path / "run2", f"rollout.reference_cache={tmp_path / 'nothing'}"))


SERVER = ["rollout.backend=vllm", "vllm.mode=server", "vllm.server_url=http://policy-box:8000"]


@pytest.mark.parametrize("reference", [None, "http://10.1.2.3:8000"])
def test_a_server_mode_cache_is_never_sampled_from_the_policys_server(tiny_model_dir, tmp_path, resolving, reference):
    """No reference server given (the policy's server was the fallback), or one that resolves to the
    policy's (policy-box is 10.1.2.3): one line naming the field, exit 2, nothing written."""
    from test_cli import assert_one_line_error

    extra = [f"vllm.reference_url={reference}"] if reference else []
    words = ["vllm.reference_url", "vllm serve"] + (["policy's server"] if reference else [])
    assert_one_line_error(["reference-rollouts", "--out", str(tmp_path / "cache"),
                           *tiny_overrides(tiny_model_dir, tmp_path / "unused", *SERVER, *extra)], words)
    assert not (tmp_path / "cache").exists()


def test_a_server_mode_cache_records_its_reference_server(tiny_model_dir, tmp_path, fake_servers, monkeypatch):
    """Sampled from the reference server (a fake one at the VLLMClient boundary): every record and
    the manifest name it, with its probe; the policy's server is never asked."""
    import aapo_app.vllm_engine as V

    from test_vllm import FakeServer, _tiny_lm

    monkeypatch.setattr(V, "check_vllm", lambda *a, **k: None)
    fake_servers.update({8000: FakeServer(_tiny_lm(tiny_model_dir)), 8001: FakeServer(_tiny_lm(tiny_model_dir))})
    url = "http://localhost:8001"
    cfg = _cfg(tiny_model_dir, tmp_path / "unused", "rollout.backend=vllm", "vllm.mode=server",
               "vllm.server_url=http://localhost:8000", f"vllm.reference_url={url}")
    counts = build(cfg, tmp_path / "cache", log=lambda msg: None)
    records = read_records(tmp_path / "cache")
    assert counts["sampled"] == 10 and len(records) == 10
    assert {rec["source"] for rec in records.values()} == {f"vllm-server:{url}"}
    (source,) = json.loads((tmp_path / "cache" / "manifest.json").read_text())["sources"]
    assert source["source"] == f"vllm-server:{url}"
    assert len(source["probe"]["probe greedy token ids"]) == 8 and len(source["probe"]["probe log-probs"]) == 8
    assert fake_servers[8000].requests == [] and fake_servers[8001].requests


@pytest.mark.slow
def test_two_ranks_split_the_prompts(tiny_model_dir, tmp_path):
    """Under the deepspeed launcher each rank samples its share into its own part file; together
    they hold every prompt once."""
    launcher = shutil.which("deepspeed", path=os.path.dirname(sys.executable)) or shutil.which("deepspeed")
    args = ["reference-rollouts", "--out", tmp_path / "cache",
            *tiny_overrides(tiny_model_dir, tmp_path / "unused", "algorithm.name=aapo", "data.max_train_examples=10",
                            "rewards.plugins=[plugin_rewards]")]
    proc = run([launcher, "--num_gpus", "2", "--master_port", str(free_port()), "--module", "aapo_app", *args])
    assert "10 prompts (10 sampled now" in proc.stdout
    parts = [len((tmp_path / "cache" / f"part-{r}.jsonl").read_text().splitlines()) for r in (0, 1)]
    assert parts == [5, 5] and len(read_records(tmp_path / "cache")) == 10
