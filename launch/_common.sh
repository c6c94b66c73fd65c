# Shared by the launch/ wrappers (sourced, not run). Puts the project's .venv first on PATH, picks
# DeepSpeed's CPU accelerator when there is no CUDA device, and defines `run`, which prints the
# command and executes it (or only prints it with DRY_RUN=1).
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ -x .venv/bin/python ]; then PATH="$PWD/.venv/bin:$PATH"; fi
if ! python -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  export DS_ACCELERATOR=cpu
fi
free_port() { python -c "import socket; s=socket.socket(); s.bind(('127.0.0.1',0)); print(s.getsockname()[1])"; }
# the aapo subcommand: the first argument if it is one, else train
subcommand() { case "${1:-}" in train|eval) echo "$1" ;; *) echo train ;; esac; }
run() {
  echo "+ $*"
  if [ "${DRY_RUN:-0}" = 1 ]; then return 0; fi
  exec "$@"
}
