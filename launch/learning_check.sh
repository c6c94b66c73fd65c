#!/usr/bin/env bash
# The learning check (a script, not a test): AAPO on the embedded default for enough steps that
# the held-out accuracy and format rate can move. Prints the before/after line and the run dir.
#   usage: launch/learning_check.sh [extra aapo train options / key=value overrides]
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -x .venv/bin/python ]; then PATH="$PWD/.venv/bin:$PATH"; fi
STEPS=${STEPS:-40}
CMD=(aapo train --max-steps "$STEPS" --output-dir "runs/learning-check-$(date -u +%Y%m%d-%H%M%S)" "$@")
echo "+ ${CMD[*]}"
exec "${CMD[@]}"
