"""Graceful stop on SIGTERM (what Slurm sends before preemption or the time limit) and SIGINT.

The first signal sets a flag: the loop finishes the current step, saves a checkpoint and exits
with EXIT_PREEMPTED, so that a batch script can requeue the job (slurm/train.sbatch). A second
SIGINT raises KeyboardInterrupt as usual (a user who insists).
"""
from __future__ import annotations

import signal
import threading

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again later" — checkpoint written, resume will continue


class GracefulStop:
    def __init__(self) -> None:
        self.requested: str | None = None
        self._old: dict[int, object] = {}

    def install(self) -> "GracefulStop":
        if threading.current_thread() is not threading.main_thread():
            return self  # signals can only be handled on the main thread
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = name
        print(f"[megatron-denoise] {name} received: finishing the current step, then saving and exiting", flush=True)

    def restore(self) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old.clear()

    def __bool__(self) -> bool:
        return self.requested is not None
