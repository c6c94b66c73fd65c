#!/usr/bin/env bash
# Several nodes from one command: the deepspeed launcher reaches every host of the hostfile over
# ssh (pdsh) and starts `slots` ranks on each. Run it on the first host; every host needs the same
# checkout and environment at the same path, and passwordless ssh between them.
#   usage: launch/multi_node.sh HOSTFILE [train|eval] [aapo options ...]
#   hostfile lines: "<hostname> slots=<GPUs>", e.g.  gpu-node-1 slots=8
#   MASTER_ADDR (default: the first host of the hostfile), MASTER_PORT (default 29500).
# Prints the command it runs (DRY_RUN=1: prints only).
set -euo pipefail
source "$(dirname "$0")/_common.sh"
HOSTFILE=${1:?usage: launch/multi_node.sh HOSTFILE [train|eval] [options ...]}
shift
CMD=$(subcommand "${1:-}"); [ "$CMD" = "${1:-}" ] && shift
ADDR=${MASTER_ADDR:-$(awk 'NF && $1 !~ /^#/ {print $1; exit}' "$HOSTFILE")}
run deepspeed --hostfile "$HOSTFILE" --launcher pdsh --master_addr "$ADDR" --master_port "${MASTER_PORT:-29500}" \
  --module aapo_app "$CMD" "$@"
