"""Helpers shared by the tests that launch `aapo` (or a launcher) as subprocesses."""

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
# set in this process by in-process engines; a child must make its own process group
DIST_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env(**extra) -> dict:
    """This environment without process-group variables, on DeepSpeed's CPU accelerator with one
    thread per rank, the venv's scripts (deepspeed) on PATH and tests/ on PYTHONPATH (for the
    reward plugin)."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
               PATH=os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]),
               PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    env.update(extra)
    return env


def run(cmd, expect=0, timeout=900, **extra_env):
    """Run ``cmd`` from the repository root; assert its exit status (showing the output tails if not)."""
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=subprocess_env(**extra_env),
                          timeout=timeout, cwd=REPO)
    assert proc.returncode == expect, (proc.stdout[-2000:], proc.stderr[-4000:])
    return proc
