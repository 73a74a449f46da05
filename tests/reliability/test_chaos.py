"""The chaos harness in CI: 3 seeded kill points (benchmarks/chaos.py, seed 20: a policy rank during
its refit, the driver while the ranks write a checkpoint, a verifier worker while it judges), each a
real kill -9, played as one chain of resumed attempts of the e2e config (4 steps), against one
uninterrupted run. The chain's metrics of every step (but wall times and fault counts), its
problems.jsonl and its final weights are BIT-IDENTICAL to the uninterrupted run's; every checkpoint
on disk is complete and readable. The dead policy rank's attempt ends with an error naming the rank
and the last complete checkpoint; the verifier kill is survived and counted.
"""
from __future__ import annotations

import importlib.util
import re
import shutil
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.dist, pytest.mark.megatron, pytest.mark.engine]

REPO = Path(__file__).resolve().parents[2]
SEED, KILLS, STEPS = 20, 3, 4


def _harness():
    spec = importlib.util.spec_from_file_location("mdn_chaos", REPO / "benchmarks" / "chaos.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # (its dataclasses look their module up)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def played(tmp_path_factory):
    chaos = _harness()
    work = tmp_path_factory.mktemp("chaos")
    data = work / "problems.jsonl"
    chaos.write_problems(data)
    plan = chaos.kill_plan(KILLS, SEED)
    ref = chaos.reference(work, data, STEPS, timeout=900)
    chains = chaos.play(plan, work, data, STEPS, timeout=900)
    yield chaos, plan, ref, chains
    shutil.rmtree(work, ignore_errors=True)


def test_plan_is_seeded_and_covers_the_roles():
    chaos = _harness()
    plan = chaos.kill_plan(KILLS, SEED)
    assert plan == chaos.kill_plan(KILLS, SEED) and plan != chaos.kill_plan(KILLS, SEED + 1)
    assert [p.split(":")[0] for p in plan] == ["policy0", "driver", "verifier"]
    assert all(chaos.POINTS[r] for r in ("driver", "policy0", "policy1", "rollout", "verifier"))


def test_every_kill_fired_and_every_chain_is_bit_identical(played):
    chaos, plan, ref, chains = played
    assert [s for c in chains for s, *_ in c.kills] == plan
    assert all(fired for c in chains for _, fired, _, _ in c.kills), [c.kills for c in chains]
    for c in chains:
        assert chaos.compare(ref, c.run_dir, STEPS) == []
    assert chaos.check_checkpoints(ref / "checkpoints") == []


def test_dead_policy_rank_names_rank_and_checkpoint_and_survived_kills_are_counted(played):
    chaos, plan, ref, chains = played
    (chain,) = chains
    log = (chain.run_dir.parent / f"{chain.run_dir.name}.log").read_text(errors="replace")
    first = log.split("===== attempt:")[1]  # the attempt whose policy rank 0 was killed in its refit
    m = re.search(r"policy rank 0 died during refit.*last complete checkpoint: (\S+)", first)
    assert m, first[-3000:]
    assert re.fullmatch(r".*/checkpoints/step_0000000[1-9]", m.group(1)), m.group(1)
    # the verifier worker killed in the last attempt: replaced, its answer judged again, counted
    total = {}
    for d in chaos.read_metrics(chain.run_dir).values():
        for k in ("faults/verifier_restarts", "faults/verifier_rescored"):
            total[k] = total.get(k, 0) + d[k]
    # the harness stops the worker before sending it the answer and kills it after: the answer is
    # always in flight when it dies, so it is always judged again (once)
    assert total == {"faults/verifier_restarts": 1.0, "faults/verifier_rescored": 1.0}
