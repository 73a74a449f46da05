"""Waiting on Ray workers without waiting forever, and telling a dead worker from a slow one.

    values = wait_all(refs, names, "train", timeout_s)

Every call the trainer makes to its workers goes through `wait_all`: it returns the values in
order, raises `WorkerDied` (naming the worker and the call) as soon as ANY of them is found dead,
without waiting for the others (the surviving ranks of a dead policy rank block in collectives
until gloo's own timeout), and raises `CallTimeout` (naming the call and the workers that have not
answered) after `timeout_s` (trainer.call_timeout_s). An exception raised inside a worker's
method is re-raised as Ray raises it.
"""
from __future__ import annotations

import time
from typing import Any, Sequence


class WorkerDied(RuntimeError):
    """A worker process is gone (killed, crashed, OOM)."""

    def __init__(self, worker: str, call: str, cause: BaseException) -> None:
        self.worker, self.call = worker, call
        super().__init__(f"{worker} died during {call}: {type(cause).__name__}: {str(cause).splitlines()[0][:300]}")


class RunAborted(RuntimeError):
    """The run cannot go on (a dead policy rank, a worker that stopped answering); the message
    names the worker, the call and the last complete checkpoint."""


class CallTimeout(TimeoutError):
    def __init__(self, call: str, waiting: Sequence[str], timeout_s: float) -> None:
        self.call, self.waiting = call, list(waiting)
        super().__init__(f"{call}: no answer from {', '.join(waiting)} within {timeout_s:g} s "
                         f"(trainer.call_timeout_s)")


def _dead(e: BaseException) -> bool:
    """The worker itself is gone (not an exception raised by its method)."""
    from ray import exceptions as rx

    kinds = tuple(getattr(rx, n) for n in ("RayActorError", "ActorDiedError", "ActorUnavailableError",
                                           "WorkerCrashedError", "OwnerDiedError") if hasattr(rx, n))
    return isinstance(e, kinds) and not isinstance(e, rx.RayTaskError)


def wait_all(refs: Sequence[Any], names: Sequence[str], call: str, timeout_s: float,
             poll_s: float = 0.5) -> list:
    import ray

    refs = list(refs)
    out: list = [None] * len(refs)
    pending = {r: i for i, r in enumerate(refs)}
    t_end = time.monotonic() + timeout_s
    while pending:
        left = t_end - time.monotonic()
        if left <= 0:
            raise CallTimeout(call, [names[i] for i in sorted(pending.values())], timeout_s)
        ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=min(poll_s, left))
        for r in ready:
            i = pending.pop(r)
            try:
                out[i] = ray.get(r, timeout=max(1.0, left))
            except BaseException as e:  # noqa: BLE001 - classified below
                if _dead(e):
                    raise WorkerDied(names[i], call, e) from e
                raise
    return out
