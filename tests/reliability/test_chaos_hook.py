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


def test_hold_stops_the_watched_process_until_the_work_is_handed_over(tmp_path, monkeypatch):
    """The verifier kill: at the named occurrence the watched process is stopped at once (it cannot
    take up the answer about to be sent) and killed only when the returned kill is called."""
    monkeypatch.setenv("MDN_CHAOS_DIR", str(tmp_path))
    monkeypatch.setenv("MDN_CHAOS_KILL", "verifier:score:2")
    monkeypatch.setattr(chaos, "_counts", {})
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert chaos.hold("score", role="verifier", pid=child.pid) is None      # the 1st occurrence
        release = chaos.hold("score", role="verifier", pid=child.pid)           # the 2nd: fires
        assert release is not None
        state = open(f"/proc/{child.pid}/stat").read().rsplit(")", 1)[1].split()[0]
        assert state == "T" and child.poll() is None                            # stopped, alive
        release()
        assert child.wait(timeout=10) == -signal.SIGKILL
        assert chaos.hold("score", role="verifier", pid=child.pid) is None      # once per attempt
        assert (tmp_path / "fired").read_text().startswith("verifier:score:2 pid ")
    finally:
        if child.poll() is None:
            child.kill()


def test_stop_ray_session_kills_the_session_processes_and_spares_the_rest(tmp_path):
    """What the chaos benchmark and the kill tests use after a SIGKILLed driver: every process whose
    command line names the session folder dies (a whole process group where it leads one), others
    live, and the folder is removed on request."""
    import time

    from megatron_denoise.trainer.workers import stop_ray_session

    session = tmp_path / "mdnray-session"
    session.mkdir()
    sleeper = "import sys, time; time.sleep(60)"
    inside = [subprocess.Popen([sys.executable, "-c", sleeper, str(session / "raylet")], start_new_session=True)
              for _ in range(2)]
    outside = subprocess.Popen([sys.executable, "-c", sleeper, str(tmp_path / "other")], start_new_session=True)
    try:
        time.sleep(0.3)
        assert stop_ray_session(str(session), grace_s=0.2, remove=True) == 2
        assert [p.wait(timeout=10) for p in inside] == [-signal.SIGKILL] * 2
        assert outside.poll() is None and not session.exists()
        assert stop_ray_session(str(session), grace_s=0) == 0
    finally:
        outside.kill()
        outside.wait()
