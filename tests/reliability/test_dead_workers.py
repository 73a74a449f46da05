"""Dead workers, on one Ray stack shared by the module (the e2e config: 2 policy ranks at tp=2, one
colocated vLLM replica; CPU). Real kill -9 of the worker processes.

- a rollout replica killed between calls: the next generate re-creates it, refits it from the
  policy and retries once; the rows are the ones the dead replica gave (same weights, same seeds),
  and the fleet counts one restart and one retry. Killed before a refit: the refit re-creates it.
- a call that outlives trainer.call_timeout_s: CallTimeout naming the call and the worker.
- a dead policy rank (last: it breaks the group): the next call, in which the surviving rank waits
  in a collective, raises WorkerDied naming the dead rank, within seconds, not gloo's 30 minutes.
(The verifier pool's dead workers: tests/reward/test_reward_pool_recovery.py; the trainer's
error naming the last complete checkpoint, and the resume from it: tests/reliability/test_chaos.py.)
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from megatron_denoise.core.types import RolloutRequest, RowKind
from megatron_denoise.rollout.engine import SamplingSpec

pytestmark = [pytest.mark.slow, pytest.mark.dist, pytest.mark.megatron, pytest.mark.engine]

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "tiny-denoise-grpo-cpu-1n2g-tp2.yaml"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    import ray

    from megatron_denoise.config.loader import load_config
    from megatron_denoise.trainer.run import resolve_model_path
    from megatron_denoise.trainer.workers import PolicyGroup, RolloutFleet, init_ray

    run = tmp_path_factory.mktemp("dead")
    cfg = load_config(CONFIG, [f"logging.output_dir={run}", "trainer.call_timeout_s=300"])
    hf = resolve_model_path(cfg)
    saved_env = dict(os.environ)  # ray.init sets RAY_AUTH_MODE in this process; later tests start
    os.environ["MDN_RAY_TMPDIR"] = f"/tmp/mdnray-dead-{os.getpid()}"  # clusters from this environment
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:  # also when the set-up fails: the environment is restored (a CI run once left
        init_ray(cfg, str(run))  # RAY_AUTH_MODE=token behind for the Slurm tests after it)
        policy = PolicyGroup.create(cfg, hf)
        fleet = RolloutFleet.create(cfg, hf, str(run), policy)
        policy.refit(fleet)
        yield cfg, policy, fleet
        fleet.close()
        policy.shutdown()
    finally:
        ray.shutdown()
        os.environ.clear()
        os.environ.update(saved_env)


def rows() -> list:
    out = []
    for g in range(2):
        prompt = tuple(range(5 + g, 25 + g))
        for slot in range(3):
            out.append(RolloutRequest(f"p{g}", g, slot, RowKind.MAIN, prompt, None, 8, 100 * g + slot + 1))
    return out


SAMPLED = SamplingSpec(temperature=1.0)


def tokens(completions) -> list:
    return [tuple(c.token_ids) for c in completions]


def test_dead_rollout_replica_is_recreated_refitted_and_generate_retried(stack):
    cfg, policy, fleet = stack
    before = tokens(fleet.generate(rows(), SAMPLED))
    pid = fleet.where()[0][0]["pid"]
    os.kill(pid, signal.SIGKILL)
    after = tokens(fleet.generate(rows(), SAMPLED))
    assert fleet.faults == {"rollout_restarts": 1, "generate_retries": 1}
    assert fleet.where()[0][0]["pid"] != pid
    assert after == before  # refitted from the policy: the same weights, the same seeded rows

    # killed before a refit: the refit re-creates it and refits it (no generate retry counted)
    os.kill(fleet.where()[0][0]["pid"], signal.SIGKILL)
    policy.refit(fleet)
    assert fleet.faults == {"rollout_restarts": 2, "generate_retries": 1}
    assert tokens(fleet.generate(rows(), SAMPLED)) == before


def test_call_timeout_names_the_call_and_the_worker(stack):
    import ray

    from megatron_denoise.trainer.faults import CallTimeout

    cfg, policy, fleet = stack
    h = fleet.replicas[0][0]
    ref = h.generate.remote(rows(), SAMPLED)
    with pytest.raises(CallTimeout, match=r"generate: no answer from rollout replica 0 tp-rank 0 within 0.01 s "
                                          r"\(trainer.call_timeout_s\)"):
        fleet._wait([ref], ["rollout replica 0 tp-rank 0"], "generate", timeout_s=0.01)
    ray.get(ref, timeout=300)  # let it finish before the next test


def test_dead_policy_rank_is_named_within_seconds(stack):
    from megatron_denoise.trainer.faults import WorkerDied

    cfg, policy, fleet = stack
    pid = policy.call_all("where")[1]["pid"]
    os.kill(pid, signal.SIGKILL)
    t0 = time.monotonic()
    # rank 0 gathers the TP shards for the refit: its peer is gone; the driver names rank 1
    with pytest.raises(WorkerDied, match=r"policy rank 1 died during refit"):
        policy.refit(fleet)
    assert time.monotonic() - t0 < 60
