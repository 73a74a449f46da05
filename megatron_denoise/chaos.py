"""Fault injection for the chaos harness (benchmarks/chaos.py): a real `kill -9` at a named point.

    MDN_CHAOS_KILL="<role>:<phase>:<n>[:<delay_s>]"     MDN_CHAOS_DIR=<folder>

The process whose role matches `role` SIGKILLs itself at the n-th time (1-based, counted in that
process) it reaches `phase`, after `delay_s` seconds (default 0; a timer thread, so the kill lands
while the phase's work runs, e.g. while a driver waits in ray.get for a checkpoint save). The
first process to fire creates `MDN_CHAOS_DIR/fired` (O_EXCL), so a run attempt is killed once
even when several processes share a role (verifier workers) or a replacement re-counts.

Roles: `driver`, `policy<rank>`, `rollout` (any engine replica process), `verifier` (any verifier
worker). Phases, and where they are reached:
  driver:   generate, reward, train, refit, save, metrics (after the step's metrics.jsonl line)
  policy:   logprob, train, refit, save (after the shards are written, before the publish)
  rollout:  generate, refit
  verifier: score (counted in the driver, at each answer sent to a worker; the driver SIGKILLs
            the worker that just received it: a verifier worker's sandbox forbids kill and writes)
Nothing happens unless MDN_CHAOS_KILL is set; the check is a dict lookup.
"""
from __future__ import annotations

import os
import signal
import threading
import time

_ENV = "MDN_CHAOS_KILL"
_role: str = "driver"
_counts: dict[str, int] = {}
ROLES = ("driver", "policy", "rollout", "verifier")
PHASES = {
    "driver": ("generate", "reward", "train", "refit", "save", "metrics"),
    "policy": ("logprob", "train", "refit", "save"),
    "rollout": ("generate", "refit"),
    "verifier": ("score",),
}


def parse(spec: str) -> tuple[str, str, int, float]:
    """`role:phase:n[:delay]` -> (role, phase, n, delay); ValueError naming what is wrong."""
    parts = spec.split(":")
    if len(parts) not in (3, 4):
        raise ValueError(f"{_ENV}={spec!r}: expected role:phase:n[:delay_s]")
    role, phase = parts[0], parts[1]
    kind = "policy" if role.startswith("policy") and role[6:].isdigit() else role
    if kind not in PHASES:
        raise ValueError(f"{_ENV}={spec!r}: role must be driver, policy<rank>, rollout or verifier")
    if phase not in PHASES[kind]:
        raise ValueError(f"{_ENV}={spec!r}: phase of {kind} must be one of {PHASES[kind]}")
    n = int(parts[2])
    delay = float(parts[3]) if len(parts) == 4 else 0.0
    if n < 1 or delay < 0:
        raise ValueError(f"{_ENV}={spec!r}: n must be >= 1 and delay_s >= 0")
    return role, phase, n, delay


def set_role(role: str) -> None:
    """Name this process (driver by default; workers call it when they start)."""
    global _role
    _role = role


def point(phase: str, role: str | None = None, pid: int | None = None) -> None:
    """Reached `phase`: SIGKILL this process (or `pid`, a process of `role` this one watches)
    if MDN_CHAOS_KILL names it here and now."""
    spec = os.environ.get(_ENV)
    if not spec:
        return
    want_role, want, n, delay = parse(spec)
    if want_role != (role or _role) or want != phase:
        return
    key = f"{want_role}:{phase}"
    _counts[key] = _counts.get(key, 0) + 1
    if _counts[key] != n:
        return
    marker = os.path.join(os.environ.get("MDN_CHAOS_DIR", "."), "fired")
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return  # another process of this role already fired in this attempt
    target = os.getpid() if pid is None else pid
    os.write(fd, f"{want_role}:{phase}:{n} pid {target} t {time.time():.3f}\n".encode())
    os.fsync(fd)
    os.close(fd)

    def kill() -> None:
        os.kill(target, signal.SIGKILL)

    if delay > 0:
        threading.Timer(delay, kill).start()
    else:
        kill()
