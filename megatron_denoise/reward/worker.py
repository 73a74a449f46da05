"""The verifier worker process: judges answers one at a time, under a deadline and a sandbox.

Started by `pool.VerifierPool` as `python -m megatron_denoise.reward.worker` (a fresh
interpreter, i.e. the 'spawn' model; see pool.py for why not multiprocessing). Protocol on the
worker's stdin/stdout pipes: frames of a 4-byte big-endian length followed by UTF-8 JSON. JSON,
not pickle: the parent never unpickles bytes produced by a process that has handled model text.

  parent -> worker  {"op": "score", "id": i, "answer": str, "golds": [str], "soft_s": float}
                    {"op": "selftest", "marker": path}     (proves the guard blocks code execution)
                    {"op": "stop"}
  worker -> parent  {"op": "ready", "pid": int}
                    {"op": "result", "id": i, "score": 0|1, "status": ok|timeout|error,
                     "detail": str, "blocked": int, "elapsed_s": float}

Deadline inside the worker: this process's main thread runs the judge, so an interval timer
works here (it cannot in the trainer's threads). It is ITIMER_PROF, which counts this process's
CPU time, so waiting for a CPU on a loaded node does not use up the budget. Its SIGPROF raises
`SoftTimeout`, a BaseException that math-verify's `except Exception` handlers do not swallow, and
the worker stays usable. Code stuck in C (a huge integer power) does not see the signal: then the
parent kills this process once it has spent the grace on top in CPU time (or at its wall-clock
limit) and starts a replacement.
"""
from __future__ import annotations

import json
import os
import re
import resource
import signal
import struct
import sys
import time
from typing import Any, Optional

from megatron_denoise.reward import guard

_HEADER = struct.Struct(">I")


class SoftTimeout(BaseException):
    """The per-answer deadline passed inside the worker."""


def read_frame(fd: int) -> Optional[dict]:
    """One message from `fd`, or None at end of file."""
    head = _read_exact(fd, _HEADER.size)
    if head is None:
        return None
    (n,) = _HEADER.unpack(head)
    body = _read_exact(fd, n)
    if body is None:
        return None
    return json.loads(body.decode("utf-8"))


def write_frame(fd: int, msg: dict) -> None:
    body = json.dumps(msg).encode("utf-8")
    data = _HEADER.pack(len(body)) + body
    while data:
        k = os.write(fd, data)
        data = data[k:]


def _read_exact(fd: int, n: int) -> Optional[bytes]:
    chunks = []
    while n > 0:
        b = os.read(fd, min(n, 1 << 20))
        if not b:
            return None
        chunks.append(b)
        n -= len(b)
    return b"".join(chunks)


def _on_alarm(signum: int, frame: Any) -> None:
    raise SoftTimeout()


# Inputs that make math-verify/sympy/antlr load their lazily imported modules before the guard
# is installed (numbers, fractions, roots, sets, intervals, matrices, text, percent, degrees,
# relations, complex).
_WARMUP = [
    ("\\frac{1}{2}", "0.5"), ("2\\sqrt{3}", "\\sqrt{12}"), ("\\{1,2\\}", "\\{2,1\\}"),
    ("(0, \\infty)", "(0,\\infty)"), ("\\begin{pmatrix}1\\\\2\\end{pmatrix}", "(1,2)"),
    ("\\text{(C)}", "C"), ("50\\%", "50"), ("30^\\circ", "30"), ("x=3", "3"), ("2+3i", "3i+2"),
    ("1,000", "1000"), ("\\pi/2", "\\frac{\\pi}{2}"), ("x^2-1", "(x-1)(x+1)"), ("e^{2}", "e^2"),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})"), ("10!", "3628800"),
    ("\\left[ \\frac{\\pi}{3}, \\frac{2 \\pi^2}{5} \\right)", "[\\frac{\\pi}{3}, \\frac{2\\pi^2}{5})"),
    ("\\log_2 8", "3"), ("\\sin x", "\\sin(x)"), ("1.5", "\\frac32"), ("[1,2]", "[1, 2]"),
]

_MARKER_OK = re.compile(r"[A-Za-z0-9_./-]+")


def _selftest(marker: str) -> dict:
    """Try to run `touch marker` through sympy's eval path under the guard; report what happened."""
    import sympy

    if not _MARKER_OK.fullmatch(marker):
        return {"op": "selftest", "blocked": False, "error": "marker path must match [A-Za-z0-9_./-]+"}
    before = guard.blocked_count()
    blocked = False
    try:
        sympy.sympify("__import__('os').system('touch " + marker + "')")
    except guard.GuardViolation:
        blocked = True
    except Exception as e:  # sympify may wrap it; the counter below is what counts
        _ = e
    return {"op": "selftest", "blocked": blocked or guard.blocked_count() > before,
            "count": guard.blocked_count() - before}


def _score(msg: dict) -> dict:
    from megatron_denoise.reward.judge import judge

    before = guard.blocked_count()
    t0 = time.monotonic()
    status, score, detail = "ok", 0.0, ""
    # the soft deadline counts this process's CPU time (ITIMER_PROF -> SIGPROF), not the wall
    # clock: a worker starved of CPU by a busy node does not time out a right answer
    signal.setitimer(signal.ITIMER_PROF, max(float(msg["soft_s"]), 1e-3))
    try:
        score, detail = judge(msg["answer"], list(msg["golds"]))
        signal.setitimer(signal.ITIMER_PROF, 0)
    except SoftTimeout:
        status, score, detail = "timeout", 0.0, "soft deadline"
    except guard.GuardViolation as e:
        status, score, detail = "error", 0.0, str(e)
    except BaseException as e:  # RecursionError, MemoryError, anything: the answer scores 0
        status, score, detail = "error", 0.0, f"{type(e).__name__}: {str(e)[:200]}"
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
    return {"op": "result", "id": msg["id"], "score": float(score), "status": status,
            "detail": detail, "blocked": guard.blocked_count() - before,
            "elapsed_s": time.monotonic() - t0}


def main() -> None:
    # Our messages go to a private copy of stdout; anything a library prints goes to stderr.
    out_fd = os.dup(1)
    os.dup2(2, 1)
    in_fd = 0
    # The trainer handles Ctrl-C and stops us; a worker exits when its stdin closes.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    mem_mb = int(os.environ.get("MDN_VERIFIER_MEMORY_MB", "0"))
    if mem_mb > 0:
        # Bound what one pathological expression can allocate: a MemoryError scores 0.
        lim = mem_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (lim, lim))

    from megatron_denoise.reward.judge import judge

    for a, g in _WARMUP:
        judge(a, [g])
    guard.install()
    # Refuse to serve if the guard is not effective: a non-whitelisted compile must be blocked.
    try:
        compile("0+0", "<string>", "eval")
        sys.stderr.write("verifier worker: audit guard is not effective, exiting\n")
        sys.exit(3)
    except guard.GuardViolation:
        pass
    signal.signal(signal.SIGPROF, _on_alarm)
    write_frame(out_fd, {"op": "ready", "pid": os.getpid(), "blocked_at_start": guard.blocked_count()})
    while True:
        msg = read_frame(in_fd)
        if msg is None or msg.get("op") == "stop":
            break
        if msg["op"] == "score":
            write_frame(out_fd, _score(msg))
        elif msg["op"] == "selftest":
            write_frame(out_fd, _selftest(str(msg.get("marker", ""))))
        else:
            write_frame(out_fd, {"op": "error", "detail": f"unknown op {msg.get('op')!r}"})


if __name__ == "__main__":
    main()
