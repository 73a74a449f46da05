"""Prefix sources that change during a run (issue 18): the online pool and the adaptive rho.

The paper fixes both before training: the wrong-solution pool is the weak model's answers and rho is
set by hand. Two run-time alternatives live here, as pure code (no engine, no torch):

OnlinePool (denoise.pool_source online | mixed)
    A bounded per-problem pool that the policy's own MAIN rollouts refill after each generation
    batch: with prefix_kind wrong, answers the verifier read a box from and judged wrong; with
    prefix_kind correct, answers judged correct. Entries are the policy's own token ids (the
    continuation, without the trailing EOS of a stopped row), so prefixes are built at token level
    with no tokeniser involved. Rules, in order:
      - dedup (optional): an answer whose ids equal an entry already in the problem's pool is skipped;
      - cap: at most max_size entries per problem, the oldest evicted first;
      - ageing: an entry added at step s is drawable at step t while t - s <= max_age (null: always);
        `expire(t)` drops the older ones (and draws never see them, expired or not).
    A problem with no entry yet (every problem at step 0 with pool_source online) gets no prefix:
    its denoise slots become ordinary rollouts, exactly the K = 0-style fallback of an empty offline
    pool (kind FALLBACK, reason empty_pool, counted in fallback/empty_pool and problems_without_pool).

RhoController (denoise.rho.strategy adaptive)
    After each generation batch, for each problem (scope problem) or once for the batch (scope
    global), with r = the pass rate of its denoise rows (rows that carried a prefix):
        rho <- clip(rho + sign * gain * (r - target), low, high)
    sign = +1 for wrong prefixes (a longer wrong prefix makes recovery harder, so a too-easy problem
    gets a longer one) and -1 for correct prefixes (a longer correct prefix makes it easier).
    A problem starts at denoise.rho.value; a problem (or batch) without denoise rows is not updated.

Both states round-trip through `state_dict()` / `load_state_dict()` as plain JSON values (they go
into the checkpoint's meta.json), so a resumed run draws exactly what the uninterrupted one would.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

from megatron_denoise.config.schema import DenoiseConfig, PoolSource, PrefixKind, RhoConfig, RhoScope, RhoStrategy
from megatron_denoise.core.types import Rollout, RowKind

__all__ = ["PoolEntry", "OnlinePool", "RhoController", "DenoiseState", "pool_ids"]


@dataclass(frozen=True)
class PoolEntry:
    """One online pool entry: the policy's token ids of an answer and the step it was generated at."""

    token_ids: tuple[int, ...]
    step: int


def pool_ids(rollout: Rollout) -> tuple[int, ...]:
    """The ids an answer enters the pool with: its continuation without the EOS of a stopped row
    (Completion.token_ids end with EOS when finish_reason is stop); a main row has no prefix."""
    ids = tuple(int(t) for t in rollout.completion.token_ids)
    if rollout.completion.finish_reason == "stop" and ids:
        ids = ids[:-1]
    return ids


class OnlinePool:
    """Per-problem bounded pools of the policy's own answers (see the module doc for the rules)."""

    def __init__(self, max_size: int, max_age: Optional[int], dedup: bool) -> None:
        if max_size < 1:
            raise ValueError(f"denoise.online_pool.max_size ({max_size}) must be >= 1")
        if max_age is not None and max_age < 1:
            raise ValueError(f"denoise.online_pool.max_age ({max_age}) must be >= 1 (or null)")
        self.max_size, self.max_age, self.dedup = int(max_size), max_age, bool(dedup)
        self._pools: dict[str, list[PoolEntry]] = {}
        self.counts = {"added": 0, "duplicates": 0, "evicted": 0, "expired": 0}  # since the last take_counts()

    def _fresh(self, entry: PoolEntry, step: int) -> bool:
        return self.max_age is None or step - entry.step <= self.max_age

    def add(self, uid: str, token_ids: Sequence[int], step: int) -> bool:
        """Add one answer to problem `uid`'s pool; False if it was empty or a duplicate."""
        ids = tuple(int(t) for t in token_ids)
        if not ids:
            return False
        pool = self._pools.setdefault(uid, [])
        if self.dedup and any(e.token_ids == ids for e in pool):
            self.counts["duplicates"] += 1
            return False
        pool.append(PoolEntry(ids, int(step)))
        self.counts["added"] += 1
        while len(pool) > self.max_size:
            pool.pop(0)
            self.counts["evicted"] += 1
        return True

    def expire(self, step: int) -> int:
        """Drop the entries too old to be drawn at `step`; returns how many."""
        dropped = 0
        for uid in list(self._pools):
            keep = [e for e in self._pools[uid] if self._fresh(e, step)]
            dropped += len(self._pools[uid]) - len(keep)
            if keep:
                self._pools[uid] = keep
            else:
                del self._pools[uid]
        self.counts["expired"] += dropped
        return dropped

    def entries(self, uid: str, step: int) -> tuple[PoolEntry, ...]:
        """The entries drawable for problem `uid` at `step`, oldest first."""
        return tuple(e for e in self._pools.get(uid, ()) if self._fresh(e, step))

    def sizes(self) -> dict[str, int]:
        return {uid: len(p) for uid, p in self._pools.items()}

    def take_counts(self) -> dict[str, int]:
        out, self.counts = self.counts, {k: 0 for k in self.counts}
        return out

    def state_dict(self) -> dict:
        return {"entries": {uid: [[e.step, list(e.token_ids)] for e in pool] for uid, pool in self._pools.items()},
                "counts": dict(self.counts)}

    def load_state_dict(self, state: Mapping) -> None:
        self._pools = {str(uid): [PoolEntry(tuple(int(t) for t in ids), int(s)) for s, ids in pool]
                       for uid, pool in state["entries"].items()}
        self.counts = {k: int(state.get("counts", {}).get(k, 0)) for k in self.counts}


class RhoController:
    """The adaptive prefix ratio: one value per problem or one for the run (see the module doc)."""

    def __init__(self, rho: RhoConfig, prefix_kind: str) -> None:
        if rho.strategy != RhoStrategy.ADAPTIVE:
            raise ValueError(f"RhoController needs denoise.rho.strategy {RhoStrategy.ADAPTIVE} (got {rho.strategy})")
        self.start, self.low, self.high = float(rho.value), float(rho.low), float(rho.high)
        self.target, self.gain = float(rho.target), float(rho.gain)
        self.per_problem = rho.scope == RhoScope.PROBLEM
        self.sign = 1.0 if prefix_kind == PrefixKind.WRONG else -1.0
        self.values: dict[str, float] = {}  # scope problem: uid -> rho (absent: the starting value)
        self.global_value = self.start      # scope global

    def rho(self, uid: str) -> float:
        return self.values.get(uid, self.start) if self.per_problem else self.global_value

    def _step(self, value: float, rate: float) -> float:
        return min(self.high, max(self.low, value + self.sign * self.gain * (rate - self.target)))

    def update(self, outcomes: Mapping[str, Sequence[float]]) -> None:
        """outcomes: problem uid -> accuracies (0/1) of its denoise rows in one generation batch."""
        outcomes = {uid: list(a) for uid, a in outcomes.items() if len(a) > 0}
        if not outcomes:
            return
        if self.per_problem:
            for uid, accs in outcomes.items():
                self.values[uid] = self._step(self.rho(uid), sum(accs) / len(accs))
        else:
            accs = [a for v in outcomes.values() for a in v]
            self.global_value = self._step(self.global_value, sum(accs) / len(accs))

    def state_dict(self) -> dict:
        return {"values": dict(self.values), "global_value": self.global_value}

    def load_state_dict(self, state: Mapping) -> None:
        self.values = {str(k): float(v) for k, v in state["values"].items()}
        self.global_value = float(state["global_value"])


class DenoiseState:
    """What a run carries from step to step for the denoise rows: the online pool and/or the rho
    controller (None for the paper's configuration, whose steps depend on nothing but the data)."""

    def __init__(self, denoise: DenoiseConfig) -> None:
        self.denoise = denoise
        op = denoise.online_pool
        self.pool = (OnlinePool(op.max_size, op.max_age, op.dedup)
                     if denoise.pool_source != PoolSource.OFFLINE else None)
        self.controller = (RhoController(denoise.rho, denoise.prefix_kind)
                           if denoise.rho.strategy == RhoStrategy.ADAPTIVE else None)

    @classmethod
    def for_config(cls, denoise: DenoiseConfig) -> Optional["DenoiseState"]:
        """None when the run needs no state (offline pool, non-adaptive rho)."""
        if denoise.pool_source == PoolSource.OFFLINE and denoise.rho.strategy != RhoStrategy.ADAPTIVE:
            return None
        return cls(denoise)

    def begin_step(self, step: int) -> None:
        if self.pool is not None:
            self.pool.expire(step)

    def online_entries(self, uid: str, step: int) -> tuple[PoolEntry, ...]:
        return self.pool.entries(uid, step) if self.pool is not None else ()

    def rho(self, uid: str) -> float:
        if self.controller is None:
            raise ValueError("denoise.rho.strategy is not adaptive: rho is sampled, not controlled")
        return self.controller.rho(uid)

    def observe(self, groups: Sequence[Sequence[Rollout]], step: int) -> None:
        """After a generation batch is verified: refill the online pool from its MAIN rows (in group
        and slot order) and move the controller by its denoise rows' pass rates."""
        want_correct = self.denoise.prefix_kind == PrefixKind.CORRECT
        outcomes: dict[str, list[float]] = {}
        for g in groups:
            for r in g:
                uid = r.request.problem_uid
                if r.request.kind is RowKind.MAIN and self.pool is not None and r.verifier_status == "ok" \
                        and r.completion.finish_reason != "abort" and (r.accuracy > 0) == want_correct:
                    self.pool.add(uid, pool_ids(r), step)
                if r.prefix_length > 0:
                    outcomes.setdefault(uid, []).append(float(r.accuracy > 0))
        if self.controller is not None:
            self.controller.update(outcomes)

    def metrics(self) -> dict[str, float]:
        """Run-state figures for the step's log (after observe): pool sizes and what changed in
        them since the last call; the controller's rho."""
        m: dict[str, float] = {}
        if self.pool is not None:
            sizes = list(self.pool.sizes().values())
            m["online_pool/problems"] = float(len(sizes))
            m["online_pool/entries"] = float(sum(sizes))
            m["online_pool/size_mean"] = sum(sizes) / len(sizes) if sizes else 0.0
            m["online_pool/size_max"] = float(max(sizes, default=0))
            for k, v in self.pool.take_counts().items():
                m[f"online_pool/{k}"] = float(v)
        if self.controller is not None:
            c = self.controller
            if c.per_problem:
                vals = list(c.values.values())
                m["rho/controller_mean"] = sum(vals) / len(vals) if vals else c.start
                m["rho/controller_min"] = min(vals, default=c.start)
                m["rho/controller_max"] = max(vals, default=c.start)
                m["rho/controller_problems"] = float(len(vals))
            else:
                m["rho/controller"] = c.global_value
        return m

    def state_dict(self) -> dict:
        return {"pool": self.pool.state_dict() if self.pool is not None else None,
                "controller": self.controller.state_dict() if self.controller is not None else None}

    def load_state_dict(self, state: Mapping) -> None:
        for name in ("pool", "controller"):
            mine, saved = getattr(self, name), state.get(name)
            if (mine is None) != (saved is None):
                raise ValueError(f"checkpoint denoise state has {name} {'set' if saved is not None else 'missing'} "
                                 f"but this run's config {'needs' if mine is not None else 'has no'} one "
                                 f"(denoise.pool_source / denoise.rho.strategy changed since it was saved?)")
            if mine is not None:
                mine.load_state_dict(saved)


def prefix_source_metrics(requests: Sequence) -> dict[str, float]:
    """Per generation batch: how many denoise prefixes came from the online pool, and their ages."""
    spans = [r.prefix for r in requests if r.prefix is not None]
    online = [s for s in spans if s.source == PoolSource.ONLINE]
    ages = [float(s.age) for s in online if s.age is not None]
    return {"prefixes": float(len(spans)), "prefixes_online": float(len(online)),
            "prefix_online_age_sum": sum(ages), "prefix_rho_sum": math.fsum(s.rho for s in spans)}
