"""The pool survives workers that crash or hang: a replacement starts; a crashed worker's answer
is judged again (once), a hung worker's answer scores 0.

Crashes and hangs are produced from outside, deterministically: SIGKILL (a crash / OOM kill) and
SIGSTOP (a worker stuck without running, which only the wall-clock limit catches). A worker that is
merely starved of CPU (here: stopped for a while, then continued) is NOT charged for the wait:
deadlines count CPU time.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from typing import Callable

from megatron_denoise.reward import VerifierPool, VerifyStatus

SLOW = r"\boxed{9^{9^{9^9}}}"  # keeps a worker busy until its deadline


def _when_busy_then(pool: VerifierPool, act: Callable[[int], None], item: int = 0, times: int = 1) -> threading.Thread:
    """Call `act(pid)` for the worker that holds answer `item` of the running batch (polled from
    the pool), `times` times (each time for the next worker that judges it)."""

    def run() -> None:
        t_end = time.monotonic() + 60
        hit: set = set()
        while time.monotonic() < t_end and len(hit) < times:
            pid = pool._pid_judging(item)
            if pid is not None and pid not in hit:
                time.sleep(0.2)
                act(pid)
                hit.add(pid)
            time.sleep(0.01)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _send(sig: int) -> Callable[[int], None]:
    return lambda pid: os.kill(pid, sig)


def test_crash_hang_and_idle_death_are_survived():
    with VerifierPool(num_workers=2, deadline_s=3.0, kill_grace_s=0.5, wall_limit_s=6.0) as pool:
        pool.wait_ready()
        pids0 = set(pool.worker_pids())
        fast = [r"\boxed{%d}" % k for k in range(6)]

        # 1. Crash: the worker judging the slow answer is killed; the other keeps serving, and
        # the answer is judged again (by whichever worker is free): here it runs into its deadline
        killer = _when_busy_then(pool, _send(signal.SIGKILL))
        res = pool.score_batch([SLOW] + fast, ["1"] + list(range(6)))
        killer.join()
        # (soft deadline, or the wall-clock limit on a loaded machine: a timeout either way)
        assert res[0].status is VerifyStatus.TIMEOUT and "died" not in res[0].detail, res[0]
        assert [r.score for r in res[1:]] == [1.0] * 6, res
        pids1 = set(pool.worker_pids())
        assert len(pids1) == 2 and pids1 != pids0   # replaced (the re-judge may time out too)
        assert pool.stats["workers_died"] == 1 and pool.stats["rescored"] == 1

        # 1b. An answer whose second judge dies too is not retried again: `error`, 0
        pool.wait_ready()
        killer = _when_busy_then(pool, _send(signal.SIGKILL), times=2)
        res = pool.score_batch([SLOW] + fast, ["1"] + list(range(6)))
        killer.join()
        assert res[0].status is VerifyStatus.ERROR and "worker died" in res[0].detail, res[0]
        assert [r.score for r in res[1:]] == [1.0] * 6, res
        assert pool.stats["workers_died"] == 3 and pool.stats["rescored"] == 2
        pids1 = set(pool.worker_pids())

        # 2. Hang: the worker stops responding; the pool kills it at the wall-clock limit.
        pool.wait_ready()
        killed0 = pool.stats["workers_killed"]
        stopper = _when_busy_then(pool, _send(signal.SIGSTOP))
        res = pool.score_batch([SLOW] + fast, ["1"] + list(range(6)))
        stopper.join()
        assert res[0].status is VerifyStatus.TIMEOUT and "killed" in res[0].detail, res[0]
        assert 6.0 <= res[0].elapsed_s <= 6.0 + 3.0, res[0].elapsed_s  # slack: shared CI
        assert [r.score for r in res[1:]] == [1.0] * 6, res
        assert pool.stats["workers_killed"] == killed0 + 1

        # 3. Idle death between batches: replaced, and no answer is charged for it.
        pool.wait_ready()
        victim = pool.worker_pids()[0]
        os.kill(victim, signal.SIGKILL)
        time.sleep(0.2)
        res = pool.score_batch(fast, list(range(6)))
        assert [r.status for r in res] == [VerifyStatus.OK] * 6
        assert [r.score for r in res] == [1.0] * 6
        assert pool.stats["workers_died"] == 4
        assert victim not in pool.worker_pids()
        procs = [w.proc for w in pool._workers]
        assert len(procs) == 2 and all(p.poll() is None for p in procs)
    # close() stopped every worker process.
    assert all(p.poll() is not None for p in procs)


def test_starved_worker_is_not_charged_for_the_wait():
    """Stopped (no CPU at all) for 3x its deadline + grace, then continued: the right answer still
    scores 1. With wall-clock deadlines it was a timeout."""
    with VerifierPool(num_workers=1, deadline_s=0.5, kill_grace_s=0.5, wall_limit_s=30.0) as pool:
        pool.wait_ready()
        pid = pool.worker_pids()[0]
        os.kill(pid, signal.SIGSTOP)
        resume = threading.Timer(3.0, os.kill, (pid, signal.SIGCONT))
        resume.start()
        try:
            t0 = time.monotonic()
            res = pool.score_batch([r"\boxed{\frac{1}{2}}", r"\boxed{7}"], ["0.5", "7"])
            waited = time.monotonic() - t0
        finally:
            resume.cancel()
            os.kill(pid, signal.SIGCONT)
        assert waited >= 3.0
        assert [(r.status, r.score) for r in res] == [(VerifyStatus.OK, 1.0)] * 2, res
        assert pool.stats["workers_killed"] == 0 and pool.worker_pids() == [pid]


def test_interrupted_batch_leaves_no_stale_results():
    """An exception inside score_batch (here: Ctrl-C while a worker judges the slow answer) must
    not leak late results into the next batch.

    Ctrl-C is `_thread.interrupt_main`, sent once the pool shows a worker judging answer 0: a
    timer fixed at 0.5 s once fired only after the 3 s batch had ended (CI, loaded machine). It
    raises KeyboardInterrupt only under Python's default SIGINT handler, which the test installs
    for its duration, so a handler some library left earlier in the session cannot decide it."""
    import _thread

    old_handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with VerifierPool(num_workers=1, deadline_s=5.0, kill_grace_s=0.5) as pool:
            pool.wait_ready()
            sender = _when_busy_then(pool, lambda pid: _thread.interrupt_main())
            t0 = time.monotonic()
            try:
                pool.score_batch([SLOW, r"\boxed{1}"], ["1", "1"])
                raise AssertionError(f"the interrupt did not arrive ({time.monotonic() - t0:.1f} s)")
            except KeyboardInterrupt:
                pass
            sender.join(5)
            res = pool.score_batch([r"\boxed{7}", r"\boxed{8}"], ["7", "9"])
            assert [(r.answer, r.score) for r in res] == [("7", 1.0), ("8", 0.0)]
            assert pool.stats["workers_killed"] == 1
    finally:
        signal.signal(signal.SIGINT, old_handler)
