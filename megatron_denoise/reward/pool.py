"""A pool of verifier worker processes with a per-answer deadline, callable from any thread.

    with VerifierPool(num_workers=2, deadline_s=5.0) as pool:
        results = pool.score_batch(texts, ground_truths)   # list[VerifyResult], in order

Per text: the last `\\boxed{}` is cut out here (boxed.py; no box -> `no_box` without a round trip,
an answer longer than `max_answer_chars` -> `error`), the answer goes to an idle worker, which
judges it with math-verify under a soft deadline of CPU time (SIGPROF on the worker's own main
thread, see worker.py). If the worker has not answered after spending `kill_grace_s` more CPU time
(stuck in C code), or after `wall_limit_s` of wall-clock time (stuck without spinning), it is
killed, the answer scores 0 with status `timeout`, and a replacement worker starts. Deadlines
count CPU time so that a loaded node, which starves the workers, does not turn right answers
into timeouts. A
worker that dies while judging (crash, OOM kill, kill -9 from outside) is replaced and the answer
is judged again by another worker (counted in stats["rescored"]); if that worker dies on it too,
the answer is `error` (an answer that kills every worker is not retried forever). An idle worker
found dead is replaced without charging any answer. The pool never raises for a bad answer.

Why subprocess and not multiprocessing. Workers are fresh interpreters (the 'spawn' model: no
fork of the trainer, which holds torch/Ray/NCCL threads), started with `python -m
megatron_denoise.reward.worker`. multiprocessing's spawn would also re-import the trainer's
`__main__` in every worker (torch + megatron: tens of seconds and GBs per worker), and its
connections unpickle what the worker sends: a worker that handled model text must not be able
to run code in the trainer by crafting a pickle. Frames here are JSON. The pool never uses
signals, so `score_batch` works from any thread; calls from several threads are serialised.
"""
from __future__ import annotations

import os
import select
import subprocess
import sys
import threading
import time
import weakref
from collections import deque
from typing import Optional, Sequence

from megatron_denoise import chaos
from megatron_denoise.reward.boxed import GroundTruth, last_boxed, normalize_ground_truth
from megatron_denoise.reward.result import VerifyResult, VerifyStatus
from megatron_denoise.reward.worker import read_frame, write_frame

_PKG_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_MAX_CONSECUTIVE_START_FAILURES = 3
_CPU_CHECK_S = 0.1  # how often a busy worker's CPU time is sampled against its budget


class _Worker:
    """One worker process and the answers sent to it, judged in order.

    Up to `depth` answers are in flight per worker (pipelining: the next answer already waits in
    the worker's pipe when it finishes one, so a busy parent or a loaded machine does not leave it
    idle). Only the head answer is being judged; its clock starts when the previous result arrived.
    """

    def __init__(self, proc: subprocess.Popen, startup_deadline: float):
        self.proc = proc
        self.rfd = proc.stdout.fileno()
        self.wfd = proc.stdin.fileno()
        self.state = "starting"          # starting | ready | dead
        self.inflight: deque[int] = deque()  # answer indices sent, in order; [0] is being judged
        self.head_start = 0.0            # when the head answer started (send or previous result)
        self.head_cpu = 0.0              # the worker's CPU seconds at that moment
        self.startup_deadline = startup_deadline
        self.pid = proc.pid
        self._ps = None

    def cpu_seconds(self) -> float:
        """User + system CPU time of the worker so far (0 if it is already gone)."""
        import psutil

        try:
            if self._ps is None:
                self._ps = psutil.Process(self.pid)
            t = self._ps.cpu_times()
            return float(t.user + t.system)
        except psutil.Error:
            return 0.0

    def start_head(self, now: float) -> None:
        self.head_start, self.head_cpu = now, self.cpu_seconds()

    def wall_deadline(self, wall_limit_s: float) -> float:
        """The wall-clock time at which the worker is given up on (start-up, or the head answer)."""
        return self.startup_deadline if self.state == "starting" else self.head_start + wall_limit_s

    def over_budget(self, now: float, cpu_budget_s: float, wall_limit_s: float) -> bool:
        if now > self.wall_deadline(wall_limit_s):
            return True
        if self.state != "ready" or now - self.head_start <= cpu_budget_s:
            return False  # the (single-threaded) worker cannot have used more CPU than wall time
        return self.cpu_seconds() - self.head_cpu > cpu_budget_s

    def kill(self) -> None:
        self.state = "dead"
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL does not fail
            pass
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass


def _shutdown(workers: list) -> None:
    """Stop every worker: ask politely, then kill. Safe to call twice (also runs at exit/GC)."""
    for w in workers:
        if w.state != "dead" and w.proc.poll() is None:
            try:
                write_frame(w.wfd, {"op": "stop"})
                w.proc.stdin.close()
            except OSError:
                pass
    t_end = time.monotonic() + 2.0
    for w in workers:
        try:
            w.proc.wait(timeout=max(0.0, t_end - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        w.kill()
    workers.clear()


class VerifierPool:
    """Math answer verification in worker processes, with deadlines and a code-execution guard.

    Args:
        num_workers: worker processes (each ~70 MB resident after warm-up; idle between batches).
        deadline_s: per-answer budget of CPU seconds inside a worker (soft: SIGPROF in the worker).
        kill_grace_s: extra CPU seconds after the deadline before the worker is killed and replaced.
        wall_limit_s: wall-clock seconds after which a worker still on one answer is killed
            whatever its CPU time (default: 10 x (deadline_s + kill_grace_s)).
        max_answer_chars: longer extracted answers score 0 (`error`) without being parsed
            (math-verify's regexes are super-linear on long inputs; real answers are short).
        memory_mb: address-space limit per worker (RLIMIT_AS); 0 = unlimited.
        startup_timeout_s: a worker that is not ready in this time counts as a failed start.
        python: interpreter for the workers (default: this one).
        pipeline_depth: answers in flight per worker (2 hides the round trip; 1 = strictly one).
    """

    def __init__(
        self,
        num_workers: int = 2,
        deadline_s: float = 5.0,
        kill_grace_s: float = 1.0,
        max_answer_chars: int = 2048,
        memory_mb: int = 4096,
        startup_timeout_s: float = 120.0,
        python: Optional[str] = None,
        pipeline_depth: int = 2,
        wall_limit_s: Optional[float] = None,
    ):
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if deadline_s <= 0 or kill_grace_s < 0:
            raise ValueError(f"deadline_s must be > 0 and kill_grace_s >= 0, got {deadline_s}, {kill_grace_s}")
        self.num_workers = num_workers
        self.deadline_s = float(deadline_s)
        self.kill_grace_s = float(kill_grace_s)
        self.wall_limit_s = float(wall_limit_s) if wall_limit_s is not None else 10.0 * (deadline_s + kill_grace_s)
        if self.wall_limit_s <= 0:
            raise ValueError(f"wall_limit_s must be > 0, got {wall_limit_s}")
        self.max_answer_chars = int(max_answer_chars)
        self.memory_mb = int(memory_mb)
        self.startup_timeout_s = float(startup_timeout_s)
        self.python = python or sys.executable
        self.pipeline_depth = int(pipeline_depth)
        self._lock = threading.Lock()
        self._workers: list[_Worker] = []
        self._closed = False
        self._start_failures = 0
        self._answers: Optional[list] = None   # the batch in flight (set inside score_batch)
        self._golds: Optional[list] = None
        self._deadline = self.deadline_s
        self._stats = {
            "items": 0, "correct": 0, "ok": 0, "no_box": 0, "timeout": 0, "error": 0,
            "workers_started": 0, "workers_killed": 0, "workers_died": 0, "guard_blocks": 0,
            "rescored": 0,
        }
        self._rescored: set = set()  # answers of the batch in flight already re-queued once
        self._finalizer = weakref.finalize(self, _shutdown, self._workers)
        with self._lock:
            self._fill()

    # ------------------------------------------------------------------ lifecycle
    def _spawn(self) -> _Worker:
        env = dict(os.environ)
        env["PYTHONPATH"] = _PKG_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env["MDN_VERIFIER_MEMORY_MB"] = str(self.memory_mb)
        env.setdefault("OMP_NUM_THREADS", "1")
        proc = subprocess.Popen(
            [self.python, "-c", "from megatron_denoise.reward.worker import main; main()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None,
            env=env, bufsize=0, close_fds=True,
        )
        self._stats["workers_started"] += 1
        return _Worker(proc, time.monotonic() + self.startup_timeout_s)

    def _fill(self) -> None:
        """Replace dead workers so that `num_workers` are alive (starting, idle or busy)."""
        self._workers[:] = [w for w in self._workers if w.state != "dead"]
        while len(self._workers) < self.num_workers:
            self._workers.append(self._spawn())

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._finalizer()

    def __enter__(self) -> "VerifierPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def worker_pids(self) -> list[int]:
        """PIDs of the current workers (for monitoring and tests)."""
        with self._lock:
            return [w.pid for w in self._workers if w.state != "dead"]

    def _pid_judging(self, i: int) -> Optional[int]:
        """PID of the worker judging answer `i` of the running batch right now (tests use it)."""
        for w in list(self._workers):
            if w.state == "ready" and w.inflight and w.inflight[0] == i:
                return w.pid
        return None

    @property
    def stats(self) -> dict[str, int]:
        """Cumulative counters since the pool started."""
        with self._lock:
            return dict(self._stats)

    def wait_ready(self, timeout_s: Optional[float] = None) -> None:
        """Block until every worker has finished starting (imports and warm-up)."""
        with self._lock:
            self._check_open()
            t_end = time.monotonic() + (self.startup_timeout_s if timeout_s is None else timeout_s)
            while any(w.state == "starting" for w in self._workers):
                if time.monotonic() > t_end:
                    raise TimeoutError("verifier workers did not become ready in time")
                self._pump(results=None, queue=None)
                self._fill()

    # ------------------------------------------------------------------ scoring
    def score(self, text: str, ground_truth: GroundTruth, deadline_s: Optional[float] = None) -> VerifyResult:
        return self.score_batch([text], [ground_truth], deadline_s)[0]

    def score_batch(self, texts: Sequence[str], ground_truths: Sequence[GroundTruth],
                    deadline_s: Optional[float] = None) -> list[VerifyResult]:
        """Verify texts[i] against ground_truths[i]; results in input order, never raising per item.

        A ground truth may be a string (LaTeX or plain), an int, a float (27.0 == 27), or a list of
        these (any may match). `deadline_s` overrides the pool's per-answer deadline for this call.
        Raises ValueError (naming the index) for an unusable ground truth or a non-string text,
        before any work is done.
        """
        deadline = self.deadline_s if deadline_s is None else float(deadline_s)
        if deadline <= 0:
            raise ValueError(f"deadline_s must be > 0, got {deadline_s}")
        if len(texts) != len(ground_truths):
            raise ValueError(f"{len(texts)} texts but {len(ground_truths)} ground truths")
        golds = [normalize_ground_truth(g, f"ground_truths[{i}]") for i, g in enumerate(ground_truths)]
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise ValueError(f"texts[{i}] must be a str, got {type(t).__name__}")

        results: list[Optional[VerifyResult]] = [None] * len(texts)
        answers: list[Optional[str]] = [None] * len(texts)
        queue: deque[int] = deque()
        for i, t in enumerate(texts):
            a = last_boxed(t)
            answers[i] = a
            if a is None:
                results[i] = VerifyResult(0.0, VerifyStatus.NO_BOX, None)
            elif len(a) > self.max_answer_chars:
                results[i] = VerifyResult(0.0, VerifyStatus.ERROR, a[:200], 0.0,
                                          f"answer too long ({len(a)} > {self.max_answer_chars} chars)")
            else:
                queue.append(i)

        with self._lock:
            self._check_open()
            self._answers, self._golds, self._deadline = answers, golds, deadline
            self._rescored = set()
            try:
                while queue or any(w.inflight for w in self._workers):
                    self._fill()
                    for w in self._workers:
                        while w.state == "ready" and queue and self._dispatch(w, queue):
                            pass
                    self._pump(results, queue)
            except BaseException:
                # Interrupted (KeyboardInterrupt, a failed start): answers still in flight belong
                # to this batch; their late results must never land in a later batch.
                for w in self._workers:
                    if w.inflight:
                        w.inflight.clear()
                        w.kill()
                        self._stats["workers_killed"] += 1
                raise
            finally:
                self._answers, self._golds = None, None
                self._fill()  # replacements start now, in the background, not at the next call
            out = [r for r in results if r is not None]
            assert len(out) == len(results)
            for r in out:
                self._stats["items"] += 1
                self._stats[r.status.value] += 1
                self._stats["correct"] += int(r.correct)
        return out

    def guard_selftest(self, marker: str) -> list[dict]:
        """Ask every worker to run `touch marker` through sympy's eval; each must report it blocked."""
        self.wait_ready()
        with self._lock:
            out = []
            for w in self._workers:
                write_frame(w.wfd, {"op": "selftest", "marker": marker})
                msg = read_frame(w.rfd)
                if msg is None:
                    w.kill()
                    self._stats["workers_died"] += 1
                    raise RuntimeError(f"verifier worker {w.pid} died during the guard self-test")
                out.append(msg)
            self._fill()
            return out

    # ------------------------------------------------------------------ internals
    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("VerifierPool is closed")

    def _dispatch(self, w: _Worker, queue: deque) -> bool:
        """Send the next queued answer to `w` if it has room; False when it has none (or died)."""
        if len(w.inflight) >= self.pipeline_depth:
            return False
        i = queue[0]
        msg = {"op": "score", "id": i, "answer": self._answers[i], "golds": self._golds[i],
               "soft_s": self._deadline}
        if w.inflight and sum(map(len, msg["golds"])) + len(msg["answer"]) > 8192:
            return False  # never let a big frame fill the pipe of a busy worker
        if w.proc.poll() is not None:
            # Found dead before this answer was sent (e.g. killed from outside): not its fault.
            self._on_death(w, None, queue)
            return False
        release = chaos.hold("score", role="verifier", pid=w.pid)  # chaos harness: stopped now, killed below
        try:
            write_frame(w.wfd, msg)
        except OSError:  # BrokenPipeError: it died between poll() and write
            if release:
                release()
            self._on_death(w, None, queue)
            return False
        queue.popleft()
        if not w.inflight:
            w.start_head(time.monotonic())
        w.inflight.append(i)
        if release:
            release()  # kill -9 the worker with this answer in flight
        return True

    def _pump(self, results: Optional[list], queue: Optional[deque]) -> None:
        """Wait for one round of worker messages or the next deadline, and handle them."""
        waiting = [w for w in self._workers if w.state == "starting" or (w.state == "ready" and w.inflight)]
        if not waiting:
            return
        now = time.monotonic()
        wake = min(w.wall_deadline(self.wall_limit_s) for w in waiting)
        if any(w.state == "ready" for w in waiting):
            wake = min(wake, now + _CPU_CHECK_S)  # CPU budgets are checked by sampling
        timeout_ms = max(0, int(1000 * (wake - now)) + 1)
        poller = select.poll()  # poll, not select: trainer processes can hold fds >= 1024
        by_fd = {}
        for w in waiting:
            poller.register(w.rfd, select.POLLIN | select.POLLHUP | select.POLLERR)
            by_fd[w.rfd] = w
        for fd, _ev in poller.poll(timeout_ms):
            w = by_fd[fd]
            try:
                msg = read_frame(fd)
            except (OSError, ValueError):
                msg = None
            if msg is None:
                self._on_death(w, results, queue)
            elif msg.get("op") == "ready" and w.state == "starting":
                w.state = "ready"
                self._start_failures = 0
            elif msg.get("op") == "result" and w.inflight and msg.get("id") == w.inflight[0]:
                self._on_result(w, msg, results)
            else:  # a protocol violation: do not trust this worker any more
                self._on_death(w, results, queue, detail=f"unexpected message {str(msg)[:100]}")
        now = time.monotonic()
        for w in waiting:
            if (w.state == "dead" or (w.state == "ready" and not w.inflight)
                    or not w.over_budget(now, self._deadline + self.kill_grace_s, self.wall_limit_s)):
                continue
            if w.state == "starting":
                self._on_death(w, results, queue, detail="did not start in time")
                continue
            # Past deadline + grace in CPU time (e.g. in C code where SIGPROF cannot act), or
            # past the wall-clock limit: kill it.
            self._on_death(w, results, queue, detail="worker killed at hard deadline", killed=True)

    def _on_result(self, w: _Worker, msg: dict, results: Optional[list]) -> None:
        i = w.inflight.popleft()
        now = time.monotonic()
        self._stats["guard_blocks"] += int(msg.get("blocked", 0))
        if results is not None:
            results[i] = VerifyResult(float(msg["score"]), VerifyStatus(msg["status"]), self._answers[i],
                                      now - w.head_start, str(msg.get("detail", "")))
        w.start_head(now)  # the next answer in its pipe starts now

    def _on_death(self, w: _Worker, results: Optional[list], queue: Optional[deque], detail: str = "",
                  killed: bool = False) -> None:
        """`w` died (head answer: judged again by another worker, once; `error` the second time)
        or was `killed` at the hard deadline (head answer: `timeout`, 0); the answers queued behind
        it, which it never started, go back to the queue."""
        t_end = time.monotonic()
        was = w.state
        code = w.proc.poll()
        inflight = list(w.inflight)
        w.inflight.clear()
        w.kill()
        self._stats["workers_killed" if killed else "workers_died"] += 1
        if was == "starting":
            self._start_failures += 1
            if self._start_failures >= _MAX_CONSECUTIVE_START_FAILURES:
                raise RuntimeError(
                    f"verifier worker failed to start {self._start_failures} times in a row "
                    f"(last exit code {code}, {detail or 'see its stderr'}); "
                    f"command: {self.python} -c 'from megatron_denoise.reward.worker import main; main()'")
            return
        if inflight and queue is not None and not killed and inflight[0] not in self._rescored:
            self._rescored.add(inflight[0])  # died while judging: another worker judges it again
            self._stats["rescored"] += 1
        elif inflight and results is not None:
            i = inflight.pop(0)
            results[i] = VerifyResult(0.0, VerifyStatus.TIMEOUT if killed else VerifyStatus.ERROR, self._answers[i],
                                      t_end - w.head_start, detail or f"worker died (exit code {code})")
        if queue is not None:
            queue.extendleft(reversed(inflight))  # not yet started: their turn comes again
