#!/usr/bin/env bash
# GPU acceptance check for users: run on ONE CUDA GPU node after the GPU install of README
# ("Running on GPUs": pip install --no-build-isolation -e .[gpu]).
# Runs tests/gpu (vLLM sleep/wake/IPC refit vs transformers, a colocated 2-step training run, the
# Triton policy-loss kernels compiled for the GPU vs the PyTorch reference, one actor step with the
# Transformer Engine spec vs the local spec on the same weights);
# on a machine without a GPU every test is skipped and says why.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}"
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: no CUDA device visible (torch.cuda.is_available() is False): the GPU tests will be skipped" >&2
fi
exec "$PY" -m pytest -m gpu tests/gpu -v -rs "$@"
