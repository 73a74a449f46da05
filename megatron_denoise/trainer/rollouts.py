"""Where a training step's rollouts come from: generated now (`rollout.async: off`), or one step
ahead while the previous step trains (`rollout.async: one_step`).

Versions. The weights after `v` optimizer steps are policy version `v` (a step's mini-batch
updates count once); step t (0-based) trains with version t and produces version t + 1. The
engine holds version t while step t trains (it is refitted at the end of every step).

    off        step t's batch is generated with version t, right before it trains: on-policy.
    one_step   step t's batch was generated with version t - 1, while step t - 1 trained; only the
               first step of a run (and the first after a resume that found no in-flight batch)
               generates synchronously with version t. So every trained row is exactly one update
               old (async/staleness_steps = 1), except those first batches (0).

    one_step schedule, step t:
        batch_t = the batch finished during step t - 1            (or generate it now: step 0)
        submit: generate batch t+1 with the engine's weights (version t), in a background thread
        old log-probs (actor, version t) -> advantages -> mismatch -> train  (overlaps generation)
        wait for batch t+1 to finish                               (time/generate_wait)
        refit the engine with version t + 1
    and the run loop logs, validates and checkpoints with no generation in flight.

The stale rows need no new machinery: the old log-probs are the actor's (version t) and the
engine's sampling log-probs are version t - 1's, so `core.mismatch` measures staleness plus
engine numerics as one ratio pi_old / pi_engine per token and applies the configured truncated IS
(`algorithm.mismatch.tis_cap`) and sequence masking; `one_step` therefore always asks the engine
for its log-probs (validation refuses it with the mismatch unmeasured and uncorrected).

Checkpoints. The batch for step t + 1 is complete when step t's checkpoint is written; it is saved
in the checkpoint's data cursor (`inflight_batch`: requests, completions with their log-probs,
rewards, counts, the problem uids drawn and the version that generated it; JSON, exact), together
with the problem cursor that already moved past it. A resumed run consumes it first, so it
trains on exactly the rows the uninterrupted run trained on. A pending batch is consumed whatever
`rollout.async` says on resume (it is logged with its staleness).

GPU: the engine must generate while the actor trains, so one_step needs engines on their own
GPUs (`rollout.colocate: false`, `rollout.num_gpus`); a colocated engine sleeps while the actor
trains (vLLM sleep mode) and could not overlap: refused (as NeMo-RL's async GRPO refuses colocated
vLLM inference). On CPU a colocated engine is its own Ray actor process and overlaps.
"""
from __future__ import annotations

import dataclasses
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from megatron_denoise.config.schema import AsyncMode
from megatron_denoise.config.validate import async_placement_error  # noqa: F401  (the runtime check)

STATE_KEY = "inflight_batch"  # the checkpoint data cursor's key (absent: nothing in flight)


@dataclass
class RolloutBatch:
    """The verified rollouts of one training step, and where they came from."""

    step: int                              # the training step (0-based) that trains on it
    version: int                           # policy version of the weights that generated it
    groups: list                           # list[list[Rollout]]: N + K rows per problem
    counts: dict                           # fallbacks, verifier timeouts, ... (summed over gen batches)
    dapo: Optional[dict] = None            # DynamicSampler.stats() (dynamic sampling on)
    uids: list = field(default_factory=list)   # every problem uid drawn for it (all gen batches)
    seen: int = 0                          # the problem cursor's `seen` after drawing it
    seconds: dict = field(default_factory=dict)  # generate / reward wall time

    @property
    def staleness(self) -> int:
        return self.step - self.version

    def to_state(self) -> dict:
        """JSON-safe and exact (floats round-trip through json's repr)."""
        rows = [[_rollout_to_dict(r) for r in g] for g in self.groups]
        return {"step": self.step, "version": self.version, "groups": rows, "counts": dict(self.counts),
                "dapo": self.dapo, "uids": list(self.uids), "seen": self.seen, "seconds": dict(self.seconds)}

    @classmethod
    def from_state(cls, d: dict) -> "RolloutBatch":
        groups = [[_rollout_from_dict(r) for r in g] for g in d["groups"]]
        return cls(step=int(d["step"]), version=int(d["version"]), groups=groups, counts=dict(d["counts"]),
                   dapo=d.get("dapo"), uids=list(d.get("uids", [])), seen=int(d.get("seen", 0)),
                   seconds=dict(d.get("seconds", {})))


def _rollout_to_dict(r) -> dict:
    q, c = r.request, r.completion
    return {"problem_uid": q.problem_uid, "group_id": q.group_id, "slot": q.slot, "kind": q.kind.value,
            "prompt_ids": list(q.prompt_ids), "prefix": None if q.prefix is None else dataclasses.asdict(q.prefix),
            "max_tokens": q.max_tokens, "seed": q.seed,
            "fallback_reason": None if q.fallback_reason is None else q.fallback_reason.value,
            "token_ids": list(c.token_ids), "finish_reason": c.finish_reason,
            "logprobs": None if c.logprobs is None else list(c.logprobs),
            "reward": r.reward, "accuracy": r.accuracy, "verifier_status": r.verifier_status}


def _rollout_from_dict(d: dict):
    from megatron_denoise.core.types import Completion, FallbackReason, PrefixSpan, Rollout, RolloutRequest, RowKind

    prefix = None
    if d["prefix"] is not None:
        p = dict(d["prefix"])
        p["token_ids"] = tuple(p["token_ids"])
        prefix = PrefixSpan(**p)
    req = RolloutRequest(problem_uid=d["problem_uid"], group_id=int(d["group_id"]), slot=int(d["slot"]),
                         kind=RowKind(d["kind"]), prompt_ids=tuple(d["prompt_ids"]), prefix=prefix,
                         max_tokens=int(d["max_tokens"]), seed=int(d["seed"]),
                         fallback_reason=None if d["fallback_reason"] is None else FallbackReason(d["fallback_reason"]))
    comp = Completion(token_ids=tuple(d["token_ids"]), finish_reason=d["finish_reason"],
                      logprobs=None if d["logprobs"] is None else tuple(float(x) for x in d["logprobs"]))
    return Rollout(request=req, completion=comp, reward=float(d["reward"]), accuracy=float(d["accuracy"]),
                   verifier_status=d["verifier_status"])


class _Background:
    """One call in a daemon thread (a hung engine must not keep the interpreter alive at exit)."""

    def __init__(self, fn: Callable[[], Any], name: str) -> None:
        self.future: Future = Future()

        def run() -> None:
            try:
                self.future.set_result(fn())
            except BaseException as e:  # noqa: BLE001 - re-raised in the trainer's thread by result()
                self.future.set_exception(e)

        self.thread = threading.Thread(target=run, name=name, daemon=True)
        self.thread.start()

    def result(self) -> Any:
        return self.future.result()


class RolloutSchedule:
    """Hands each step its batch and, with one_step, generates the next one in the background.

    collect(step, version) -> RolloutBatch runs the step's whole collection (problem draws,
    generation, verification, DAPO re-sampling); it is called for steps in order, never two at a
    time, so the problem cursor advances exactly as in a synchronous run.
    """

    def __init__(self, mode: str, collect: Callable[[int, int], RolloutBatch], version: int,
                 total_steps: int) -> None:
        self.mode = AsyncMode(mode)
        self.collect = collect
        self.engine_version = version      # the weights the engine holds
        self.total_steps = total_steps
        self.pending: Optional[RolloutBatch] = None   # finished, not trained yet
        self._inflight: Optional[tuple[int, _Background]] = None
        self.last: Optional[RolloutBatch] = None      # the batch the last step trained on

    # -- one step's view ---------------------------------------------------------------------
    def take(self, step: int) -> RolloutBatch:
        """Step `step`'s batch: the pending one (generated a step earlier) or one generated now."""
        if self._inflight is not None:
            self.settle()
        if self.pending is not None:
            batch, self.pending = self.pending, None
            if batch.step != step:
                raise RuntimeError(f"rollout schedule: the pending batch is for step {batch.step + 1}, but step "
                                   f"{step + 1} is running")
        else:
            batch = self.collect(step, self.engine_version)
        self.last = batch
        return batch

    def prefetch(self, step: int) -> bool:
        """one_step: start generating batch `step` with the engine's current weights (returns
        whether it did: not with async off, nor past the last step)."""
        if self.mode != AsyncMode.ONE_STEP or step >= self.total_steps or self.pending is not None:
            return False
        if self._inflight is not None:
            raise RuntimeError("rollout schedule: a generation is already in flight")
        version = self.engine_version
        self._inflight = (step, _Background(lambda: self.collect(step, version), name=f"rollouts-step-{step + 1}"))
        return True

    @property
    def in_flight(self) -> bool:
        return self._inflight is not None

    def settle(self) -> float:
        """Wait for the in-flight generation (before the engine is refitted or anything saved);
        returns the seconds waited."""
        if self._inflight is None:
            return 0.0
        t0 = time.perf_counter()
        step, job = self._inflight
        try:
            batch = job.result()
        finally:
            self._inflight = None
        if batch.step != step:  # pragma: no cover - collect's contract
            raise RuntimeError(f"rollout schedule: generation for step {step + 1} returned step {batch.step + 1}")
        self.pending = batch
        return time.perf_counter() - t0

    def refitted(self, version: int) -> None:
        """The engine now holds policy version `version`."""
        if self._inflight is not None:
            raise RuntimeError("rollout schedule: the engine was refitted while a generation was in flight")
        self.engine_version = version

    # -- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Keys added to the checkpoint's data cursor: the finished batch of the next step, if any."""
        if self._inflight is not None:
            raise RuntimeError("rollout schedule: state_dict() with a generation in flight (settle() first)")
        return {STATE_KEY: self.pending.to_state()} if self.pending is not None else {}

    def load_state_dict(self, state: dict, step: int) -> None:
        """Resume at `step` (the number of steps done): the saved batch must be that step's."""
        d = state.get(STATE_KEY)
        if d is None:
            self.pending = None
            return
        batch = RolloutBatch.from_state(d)
        if batch.step != step:
            raise ValueError(f"checkpoint data cursor: {STATE_KEY} is step {batch.step + 1}'s batch, but the "
                             f"checkpoint resumes at step {step + 1}")
        self.pending = batch

    def metrics(self, batch: RolloutBatch) -> dict[str, float]:
        return {"async/staleness_steps": float(batch.staleness), "async/policy_version": float(batch.version),
                "async/one_step": float(self.mode == AsyncMode.ONE_STEP)}
