#!/usr/bin/env bash
# N data-parallel ranks on this machine (one per GPU; on a CPU machine N gloo processes).
#   usage: launch/single_node.sh N [train|eval] [aapo options and key=value overrides ...]
#   e.g.   launch/single_node.sh 8 --config launch/recipes/7b-simplelr.yaml --ds-config ds_configs/zero3_bf16.json \
#              --ref-ds-config ds_configs/zero3_inference_bf16.json
#          launch/single_node.sh 2 --max-steps 4           # CPU development: 2 ranks
# Prints the command it runs (DRY_RUN=1: prints only). MASTER_PORT picks the port (default: a free one).
set -euo pipefail
source "$(dirname "$0")/_common.sh"
N=${1:?usage: launch/single_node.sh N [train|eval] [options ...]}
shift
CMD=$(subcommand "${1:-}"); [ "$CMD" = "${1:-}" ] && shift
if [ "${DS_ACCELERATOR:-}" = cpu ]; then
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / N > 0 ? $(nproc) / N : 1 ))}
fi
run deepspeed --num_gpus "$N" --master_port "${MASTER_PORT:-$(free_port)}" --module aapo_app "$CMD" "$@"
