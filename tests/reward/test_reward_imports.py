"""Importing the reward and data packages loads no engine and no sympy (only the workers do)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("sympy", "math_verify", "torch", "vllm", "ray", "megatron", "transformers", "torch.distributed")


def test_reward_and_data_import_no_engine():
    code = ("import sys, json; import megatron_denoise.reward, megatron_denoise.data; "
            f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
