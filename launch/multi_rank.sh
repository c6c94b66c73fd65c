#!/usr/bin/env bash
# Start `aapo train` on N data-parallel ranks of this machine through the deepspeed launcher.
#   usage: launch/multi_rank.sh [N=2] [aapo train options and key=value overrides ...]
#   e.g.   launch/multi_rank.sh 2 --max-steps 4 rollout.group_size=8
# On CPU (no CUDA) it sets DS_ACCELERATOR=cpu and uses gloo; on GPUs N is the number of GPUs.
# The command it runs is printed first.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-2}
shift || true
if [ -x .venv/bin/python ]; then PATH="$PWD/.venv/bin:$PATH"; fi
if ! python -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  export DS_ACCELERATOR=cpu
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / N > 0 ? $(nproc) / N : 1 ))}
fi
PORT=${MASTER_PORT:-$(python -c "import socket; s=socket.socket(); s.bind(('127.0.0.1',0)); print(s.getsockname()[1])")}
CMD=(deepspeed --num_gpus "$N" --master_port "$PORT" --module aapo_app train "$@")
echo "+ ${CMD[*]}"
exec "${CMD[@]}"
