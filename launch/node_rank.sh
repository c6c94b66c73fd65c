#!/usr/bin/env bash
# One node of a multi-node run, for clusters without ssh between nodes: run this on every node
# with its own NODE_RANK (0 .. nodes-1), the same hostfile and the same MASTER_ADDR (node 0's
# address). The deepspeed launcher starts this node's `slots` ranks only (--no_ssh --node_rank).
#   usage: launch/node_rank.sh HOSTFILE NODE_RANK MASTER_ADDR [train|eval] [aapo options ...]
#   e.g.   launch/node_rank.sh hosts 0 10.0.0.1 --config launch/recipes/7b-simplelr.yaml   # on node 0
#          launch/node_rank.sh hosts 1 10.0.0.1 --config launch/recipes/7b-simplelr.yaml   # on node 1
#   MASTER_PORT (default 29500) must be the same on every node.
# Prints the command it runs (DRY_RUN=1: prints only).
set -euo pipefail
source "$(dirname "$0")/_common.sh"
USAGE="usage: launch/node_rank.sh HOSTFILE NODE_RANK MASTER_ADDR [train|eval] [options ...]"
HOSTFILE=${1:?$USAGE}; NODE_RANK=${2:?$USAGE}; ADDR=${3:?$USAGE}
shift 3
CMD=$(subcommand "${1:-}"); [ "$CMD" = "${1:-}" ] && shift
run deepspeed --hostfile "$HOSTFILE" --no_ssh --node_rank "$NODE_RANK" --master_addr "$ADDR" \
  --master_port "${MASTER_PORT:-29500}" --module aapo_app "$CMD" "$@"
