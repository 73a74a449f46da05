"""rollout.async (trainer/rollouts.py) without processes: a versioned fake policy and engine.

The engine answers with the policy version its weights hold (so every trained row says which
weights generated it); a barrier shared by the engine's background generation and the policy's
train proves they overlap (run one after the other, both would wait forever); a checkpoint's data
cursor taken after any step and loaded into a fresh trainer gives the same remaining steps.
"""
from __future__ import annotations

import json
import math
import re
import threading

import pytest
import torch

from megatron_denoise.config.loader import ConfigError, load_config
from megatron_denoise.core.types import Completion
from megatron_denoise.trainer.rollouts import STATE_KEY, RolloutBatch
from megatron_denoise.trainer.step import rollout_schedule, train_step

from test_step import EOS, CharTokenizer, make_ctx, problems

STEPS = 4


class VersionedEngine:
    """Row text 'v<version> s<seed % 97>'; its log-prob of every token is -0.1 x (version + 1)."""

    def __init__(self, barrier=None):
        self.version = 0
        self.generated = []  # (version, first problem uid) per generate call, in order
        self.barrier = barrier
        self.events = []

    def generate(self, requests, sampling):
        self.generated.append((self.version, requests[0].problem_uid))
        self.events.append(f"generate@v{self.version}")
        if self.barrier is not None and len(self.generated) > 1:  # a one_step prefetch: train runs too
            self.barrier.wait()
        tok = CharTokenizer()
        out = []
        for r in requests:
            ids = tok.encode(f"v{self.version} s{r.seed % 97}")[: r.max_tokens - 1] + [EOS]
            lps = tuple([-0.1 * (self.version + 1)] * len(ids)) if sampling.logprobs else None
            out.append(Completion(token_ids=tuple(ids), finish_reason="stop", logprobs=lps))
        return out

    def sleep(self, level=None):
        self.events.append("sleep")

    def wake_up(self, tags=None):
        self.events.append("wake")


class VersionedPolicy:
    def __init__(self, engine, barrier=None, total=STEPS):
        self.engine = engine
        self.version = 0
        self.barrier = barrier
        self.total = total
        self.trained = []  # (version trained from, versions written in the batch's rows, extra keys)

    def compute_logprobs(self, batch):
        return torch.zeros_like(batch.loss_mask)

    def train(self, batch, old_logprobs, **extra):
        tok = CharTokenizer()
        seen = sorted({int(v) for row in batch.input_ids for v in re.findall(r"v(\d+) s\d", tok.decode(row.tolist()))})
        self.trained.append((self.version, seen, sorted(extra)))
        self.engine.events.append(f"train@v{self.version}")
        if self.barrier is not None and self.version + 1 < self.total:
            self.barrier.wait()  # returns only once the next step's generation is under way
        self.version += 1
        return {"loss": float(self.version), "grad_norm": 1.0, "skipped": 0.0, "updates": 1.0}

    def refit(self, engine):
        engine.version = self.version
        engine.events.append(f"refit@v{self.version}")


def setup(mode, *extra, barrier=None, probs=8):
    over = [f"rollout.async={mode}", f"trainer.total_steps={STEPS}", "algorithm.force_on_policy=false", *extra]
    engine = VersionedEngine(barrier)
    policy = VersionedPolicy(engine, barrier)
    ctx, _, _, _ = make_ctx(over, lambda r: "", problems(probs), policy=policy)
    ctx.engine = engine
    return ctx, engine, policy


def test_one_step_trains_every_row_one_update_old_and_overlaps_generation_with_training():
    barrier = threading.Barrier(2, timeout=20)
    ctx, engine, policy = setup("one_step", barrier=barrier)
    ms = [train_step(ctx, s) for s in range(STEPS)]
    # generation t+1 ran with version t (the engine's weights while step t trained); step 0's
    # batch was generated synchronously; nothing was generated for the step after the last
    assert [v for v, _ in engine.generated] == [0, 0, 1, 2]
    # every trained row came from version t - 1 (step 0: version 0), its policy at version t
    assert [(v, seen) for v, seen, _ in policy.trained] == [(0, [0]), (1, [0]), (2, [1]), (3, [2])]
    assert [m["async/staleness_steps"] for m in ms] == [0.0, 1.0, 1.0, 1.0]
    assert [m["async/policy_version"] for m in ms] == [0.0, 0.0, 1.0, 2.0]
    assert all(m["async/one_step"] == 1.0 for m in ms)
    # the order: the next step's generation starts before the train and ends before the refit;
    # the engine never sleeps (it generates while the actor trains)
    assert engine.events == ["generate@v0", "generate@v0", "train@v0", "refit@v1",
                             "generate@v1", "train@v1", "refit@v2",
                             "generate@v2", "train@v2", "refit@v3",
                             "train@v3", "refit@v4"]
    assert barrier.n_waiting == 0 and not barrier.broken
    # the stale rows went through the mismatch path: engine log-probs -0.1 (v + 1) vs old 0
    for m, v in zip(ms, [0, 0, 1, 2]):
        assert m["mismatch/main/ratio_mean"] == pytest.approx(math.exp(0.1 * (v + 1)), rel=1e-6)
        assert m["time/generate"] >= 0 and m["time/reward"] >= 0
    assert all("time/generate_wait" in m for m in ms[:-1]) and "time/generate_wait" not in ms[-1]


def test_off_is_on_policy_and_sleeps_the_colocated_engine():
    ctx, engine, policy = setup("off")
    ms = [train_step(ctx, s) for s in range(STEPS)]
    assert [v for v, _ in engine.generated] == [0, 1, 2, 3]
    assert [(v, seen) for v, seen, _ in policy.trained] == [(0, [0]), (1, [1]), (2, [2]), (3, [3])]
    assert [m["async/staleness_steps"] for m in ms] == [0.0] * STEPS
    assert engine.events[:5] == ["generate@v0", "sleep", "train@v0", "wake", "refit@v1"]
    # one_step's first step equals off's: same rows (problems, seeds) and the same weights
    ctx2, _, policy2 = setup("one_step")
    m0 = train_step(ctx2, 0)
    assert m0["loss"] == ms[0]["loss"] and policy2.trained[0] == policy.trained[0]
    assert ctx2.rollouts.pending is not None and ctx2.rollouts.pending.step == 1


def test_truncated_is_weights_reach_the_stale_rows():
    ctx, _, policy = setup("one_step", "algorithm.mismatch.tis_cap=1.05")
    for s in range(2):
        m = train_step(ctx, s)
    assert policy.trained[1][2] == ["is_weights"]
    # ratio exp(0.1) = 1.105 > cap: every measured token clipped
    assert m["mismatch/main/tis_clipped"] == 1.0


@pytest.mark.parametrize("mode", ["one_step", "off"])
@pytest.mark.parametrize("stop_after", [1, 2, 3])
def test_resume_from_the_checkpoint_cursor_equals_the_uninterrupted_run(mode, stop_after):
    ctx, engine, policy = setup(mode)
    full = [train_step(ctx, s) for s in range(STEPS)]

    ctx, engine, policy = setup(mode)
    part = [train_step(ctx, s) for s in range(stop_after)]
    # what the trainer saves: the problem cursor and the schedule's keys, through JSON
    cursor = json.loads(json.dumps({"problems": ctx.problems.state_dict(), **ctx.rollouts.state_dict()}))
    assert (STATE_KEY in cursor) == (mode == "one_step"), cursor.keys()

    ctx2, engine2, policy2 = setup(mode)  # a fresh process: weights version stop_after, engine refitted
    policy2.version = engine2.version = stop_after
    ctx2.problems.load_state_dict(cursor["problems"])
    rollout_schedule(ctx2, version=stop_after).load_state_dict(cursor, stop_after)
    part += [train_step(ctx2, s) for s in range(stop_after, STEPS)]
    drop = ("time/",)
    for a, b in zip(full, part):
        assert {k: v for k, v in a.items() if not k.startswith(drop)} == \
               {k: v for k, v in b.items() if not k.startswith(drop)}
    assert policy.trained + policy2.trained == setup_trained(mode)


def setup_trained(mode):
    ctx, _, policy = setup(mode)
    for s in range(STEPS):
        train_step(ctx, s)
    return policy.trained


def test_inflight_batch_round_trips_exactly_and_is_checked_on_load():
    ctx, _, _ = setup("one_step", "denoise.k_denoise=2")
    train_step(ctx, 0)
    batch = ctx.rollouts.pending
    back = RolloutBatch.from_state(json.loads(json.dumps(batch.to_state())))
    assert back == batch and any(r.request.prefix is not None for g in back.groups for r in g)
    with pytest.raises(ValueError, match="step 2's batch, but the checkpoint resumes at step 3"):
        rollout_schedule(ctx, version=2).load_state_dict({STATE_KEY: batch.to_state()}, 2)


def test_config_one_step_refusals():
    with pytest.raises(ConfigError, match="rollout.colocate=false"):
        load_config(None, ["rollout.async=one_step", "cluster.device=cuda"], world_size=8)
    with pytest.raises(ConfigError, match="needs the engine's log-probs"):
        load_config(None, ["rollout.async=one_step", "algorithm.mismatch.metrics=false"], world_size=8)
    cfg = load_config(None, ["rollout.async=one_step", "cluster.device=cuda", "rollout.colocate=false"], world_size=8)
    assert cfg.rollout.async_ == "one_step"
    assert load_config(None, ["rollout.async=off"], world_size=8).rollout.async_ == "off"  # YAML reads `off` as false


def test_policy_calls_from_two_threads_reach_every_rank_in_one_order(monkeypatch):
    """one_step: a replica that dies during the background generation is refit from that thread
    while the trainer's thread trains; each rank runs one call at a time, so both calls must reach
    every rank in the same order (else the ranks' collectives pair train with refit and hang)."""
    import time

    from megatron_denoise.trainer.workers import PolicyGroup

    class Rank:  # records the order in which calls arrive, slowly (a wide window for interleaving)
        def __init__(self) -> None:
            self.seen: list[str] = []

        def __getattr__(self, method: str):
            rank = self

            class Remote:
                @staticmethod
                def remote(*args, **kwargs):
                    rank.seen.append(method)
                    time.sleep(0.001 if method == "train" else 0.0025)   # unequal: the threads drift
                    return method
            return Remote

    ranks = [Rank() for _ in range(4)]
    group = PolicyGroup(ranks, placement=None)
    monkeypatch.setattr(group, "_wait", lambda refs, call, timeout_s=None: refs)
    go = threading.Barrier(2)

    def calls(method: str) -> None:
        go.wait()
        for _ in range(20):
            group.call_all(method)

    threads = [threading.Thread(target=calls, args=(m,)) for m in ("train", "refit")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(ranks[0].seen) == ["refit"] * 20 + ["train"] * 20
    assert all(r.seen == ranks[0].seen for r in ranks), [r.seen[:8] for r in ranks]
