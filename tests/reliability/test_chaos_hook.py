"""The chaos hook (megatron_denoise/chaos.py) the harness kills with: a real SIGKILL of the named
process at the n-th time it reaches the phase, once per attempt (the `fired` marker), nothing when
the variable is unset or names another role; bad specs name what is wrong."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from megatron_denoise import chaos

SCRIPT = """
import sys
from megatron_denoise import chaos
chaos.set_role(sys.argv[1])
for i in range(1, 6):
    print(i, flush=True)
    chaos.point("train")
"""


def run(tmp_path, role: str, spec: str | None) -> subprocess.CompletedProcess:
    env = dict(os.environ, MDN_CHAOS_DIR=str(tmp_path))
    env.pop("MDN_CHAOS_KILL", None)
    if spec:
        env["MDN_CHAOS_KILL"] = spec
    return subprocess.run([sys.executable, "-c", SCRIPT, role], env=env, capture_output=True, text=True, timeout=60)


def test_sigkill_at_the_nth_occurrence_once(tmp_path):
    p = run(tmp_path, "policy1", "policy1:train:3")
    assert p.returncode == -signal.SIGKILL and p.stdout.split() == ["1", "2", "3"]
    assert (tmp_path / "fired").read_text().startswith("policy1:train:3 pid ")
    # the same attempt (marker present): a second process of the role is not killed
    p = run(tmp_path, "policy1", "policy1:train:3")
    assert p.returncode == 0 and p.stdout.split() == ["1", "2", "3", "4", "5"]


def test_other_role_or_unset_does_nothing(tmp_path):
    assert run(tmp_path, "policy0", "policy1:train:1").returncode == 0
    assert run(tmp_path, "driver", None).returncode == 0
    assert not (tmp_path / "fired").exists()


@pytest.mark.parametrize("spec, msg", [
    ("driver:train", "expected role:phase:n"),
    ("engine:generate:1", "role must be"),
    ("rollout:train:1", "phase of rollout must be one of"),
    ("driver:save:0", "n must be >= 1"),
    ("policy0:save:1:-1", "delay_s >= 0"),
])
def test_bad_specs_name_the_problem(spec, msg):
    with pytest.raises(ValueError, match=msg):
        chaos.parse(spec)
