#!/usr/bin/env bash
# The main command (README): installs the environment if needed, then runs the main job on its
# embedded default (the science testbed, configs/testbed-denoise-grpo-cpu-1n1g.yaml). Extra
# arguments go to the trainer, e.g.
#   bash launch/run.sh --config configs/denoise-grpo-qwen3-4b-1n8g-tp2.yaml --dry-run --world-size 8
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/launch/install.sh"
venv="${VENV:-$root/.venv}"
cd "$root"
exec "$venv/bin/python" -m megatron_denoise.launch.train "$@"
