"""A user's first ``aapo train`` prints no warning: nothing deprecated, nothing from DeepSpeed's internals.

The run is the README's command 1 (``aapo train`` on the embedded SmolLM2-135M, the default config)
made tiny: one step, two prompts, a few tokens. It runs as a user's shell would start it: no
PYTHONWARNINGS and no DS_ACCELERATOR in the environment.
"""

import os
import re
import subprocess
import sys

import pytest

# what a clean run must not print, each with what it would mean
FORBIDDEN = {
    "a Python warning (FutureWarning, DeprecationWarning, UserWarning, ...) or a logger's WARNING line":
        re.compile(r"warn", re.IGNORECASE),
    "a deprecation notice": re.compile(r"deprecat", re.IGNORECASE),
    "a warning from torch's C++ code": re.compile(r"\[W\d{4} "),
    "DeepSpeed building an op (deepspeed.comm.torch.build_shm_op)": re.compile(r"built successfully"),
    "transformers' save progress bar inside the step bar": re.compile(r"Writing model shards"),
    "a traceback": re.compile(r"Traceback"),
}


def offending_lines(output: str) -> list[str]:
    """Each line (progress bars redraw with \\r: every redraw is a line) that matches FORBIDDEN."""
    lines = [line for line in re.split(r"[\r\n]+", output) if line.strip()]
    return [f"{what}: {line.strip()[:300]}" for line in lines for what, pattern in FORBIDDEN.items()
            if pattern.search(line)]


def test_offending_lines_catches_each_kind():
    """The patterns catch what the first run used to print (seen with torch 2.13, transformers 5.24,
    DeepSpeed 0.19.8) and let the run's own lines through."""
    printed = [
        "/venv/torch/distributed/c10d_logger.py:83: FutureWarning: `torch.distributed.all_gather_into_tensor` "
        "is deprecated. Please use `torch.distributed.all_gather_single` instead.",
        "/venv/torch/nn/modules/module.py:1789: FutureWarning: `past_key_values` is deprecated and will be "
        "removed in version 5.40.0 for `LlamaForCausalLM.forward`. Use `cache` instead.",
        "[2026-12-03 06:47:03,349] [WARNING] [real_accelerator.py:213:get_accelerator] Setting accelerator to CPU.",
        "[W1203 06:47:03.123456789 ProcessGroupGloo.cpp:715] something",
        "DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully",
        "Writing model shards: 100%|██████████| 1/1 [00:00<00:00,  1.04it/s]",
    ]
    assert len(offending_lines("\n".join(printed))) >= len(printed)
    for line in printed:
        assert offending_lines(line), line
    own = ("held-out accuracy before training: 87.5% (32 problems)\n"
           "aapo train [aapo]:   0%|          | 0/1 [00:00<?, ?step/s]\r"
           "step 1 | r 0.5 | r_ref 0.375 | acc 0.5 | fmt 0 | loss 0.0504 | gnorm 6.14 | len 21.9 | zstd 0\n"
           "held-out accuracy: 87.5% before -> 53.1% after 1 steps (32 problems)\n")
    assert offending_lines(own) == []


@pytest.mark.slow
def test_first_aapo_train_output_is_clean(tmp_path, smollm2_dir):
    """``aapo train`` on the default config and the embedded SmolLM2 (converted beforehand by the
    fixture, as the first run's conversion would), one step: exit 0, its usual lines, and not one
    line of FORBIDDEN in stdout or stderr. A fresh TORCH_EXTENSIONS_DIR stays uncreated: the run
    compiles no DeepSpeed op."""
    out = tmp_path / "run"
    extensions = tmp_path / "torch_extensions"
    cmd = [sys.executable, "-m", "aapo_app", "train", "--max-steps", "1", "--output-dir", str(out),
           "rollout.group_size=2", "rollout.prompts_per_rank=2", "rollout.max_new_tokens=8",
           "train.micro_batch_size=2", "data.eval_size=2", "train.eval_max_new_tokens=8", "rewards.num_workers=1"]
    # a user's shell: none of ours, and none of the launcher variables that init_distributed puts into
    # this process's environment when an earlier test built an engine (its MASTER_PORT is taken)
    unset = {"PYTHONWARNINGS", "DS_ACCELERATOR", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE",
             "MASTER_ADDR", "MASTER_PORT"}
    env = {k: v for k, v in os.environ.items() if k not in unset}
    env["TORCH_EXTENSIONS_DIR"] = str(extensions)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "held-out accuracy:" in proc.stdout and f"run directory: {out}" in proc.stdout
    assert "held-out accuracy before training:" in proc.stderr and "step 1 |" in proc.stderr
    # the run's own paths are no evidence (pytest names tmp_path after the test)
    output = (proc.stdout + "\n" + proc.stderr).replace(str(tmp_path), "<tmp>")
    bad = offending_lines(output)
    assert not bad, "\n".join(bad)
    assert not extensions.exists(), sorted(p.name for p in extensions.iterdir())
