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
  verifier: score (counted in the driver, at each answer sent to a worker; the driver stops the
            worker before sending it the answer and SIGKILLs it after, so it always dies with the
            answer in flight: a verifier worker's sandbox forbids kill and writes)
Nothing happens unless MDN_CHAOS_KILL is set; the check is a dict lookup.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from typing import Callable

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


def _fire(phase: str, role: str | None, target: int) -> float | None:
    """The delay of the kill if MDN_CHAOS_KILL names this occurrence of `phase` (and this attempt
    has not fired yet: the O_EXCL marker is created here), else None."""
    spec = os.environ.get(_ENV)
    if not spec:
        return None
    want_role, want, n, delay = parse(spec)
    if want_role != (role or _role) or want != phase:
        return None
    key = f"{want_role}:{phase}"
    _counts[key] = _counts.get(key, 0) + 1
    if _counts[key] != n:
        return None
    marker = os.path.join(os.environ.get("MDN_CHAOS_DIR", "."), "fired")
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return None  # another process of this role already fired in this attempt
    os.write(fd, f"{want_role}:{phase}:{n} pid {target} t {time.time():.3f}\n".encode())
    os.fsync(fd)
    os.close(fd)
    return delay


def _kill(target: int, delay: float) -> None:
    if delay > 0:
        threading.Timer(delay, os.kill, (target, signal.SIGKILL)).start()
    else:
        os.kill(target, signal.SIGKILL)


def point(phase: str, role: str | None = None) -> None:
    """Reached `phase`: SIGKILL this process if MDN_CHAOS_KILL names it here and now."""
    target = os.getpid()
    delay = _fire(phase, role, target)
    if delay is not None:
        _kill(target, delay)


def hold(phase: str, role: str, pid: int) -> Callable[[], None] | None:
    """About to hand work to process `pid` (of `role`, watched by this one): if MDN_CHAOS_KILL names
    this occurrence, SIGSTOP it now, so it cannot take up or answer the work before it dies, and
    return the kill to call once the work is handed over (so the work is in flight when it dies,
    whatever the timing). None when nothing fires."""
    delay = _fire(phase, role, pid)
    if delay is None:
        return None
    os.kill(pid, signal.SIGSTOP)
    _wait_stopped(pid)  # the signal is delivered asynchronously: the process may still be running
    return lambda: _kill(pid, delay)


def _wait_stopped(pid: int, timeout_s: float = 5.0) -> None:
    """Until /proc says `pid` is stopped (state T), or it is gone, or `timeout_s` passed."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        try:
            with open(f"/proc/{pid}/stat") as fh:
                if fh.read().rsplit(")", 1)[1].split()[0] in ("T", "t", "Z", "X"):
                    return
        except (FileNotFoundError, ProcessLookupError, IndexError):
            return
        time.sleep(0.001)
