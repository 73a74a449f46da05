"""Placement (megatron_denoise/placement.py): the pure plan, then the same plans on a fake-GPU Ray
cluster of two nodes x 2 GPUs, where every actor reports what Ray gave it (CUDA_VISIBLE_DEVICES,
GPU ids, its fractional share, its node). The old single-engine layout's hang (bug 1 of issue 14)
becomes a named error within a timeout."""
from __future__ import annotations

import time

import pytest

from megatron_denoise.placement import (
    ENGINE_GPU_SHARE,
    POLICY_GPU_SHARE,
    Placement,
    PlacementError,
    PlacementProbe,
    PlacementPlan,
    Slot,
    plan_placement,
    quiet_port,
)

# ---------------------------------------------------------------------------------------------
# pure plans


def test_plan_tp1_colocated_one_replica_per_gpu():
    p = plan_placement(4, 2, rollout_tp=1, colocate=True, gpu=True)
    assert p.groups == (({"CPU": 1.0, "GPU": 1.0},) * 2,) * 2          # one group (node) of 2 bundles each
    assert [(s.group, s.bundle, s.num_gpus) for s in p.policy] == [(0, 0, .5), (0, 1, .5), (1, 0, .5), (1, 1, .5)]
    assert p.num_replicas == 4
    assert [[(s.group, s.bundle, s.num_gpus) for s in r] for r in p.replicas] == [
        [(0, 0, .5)], [(0, 1, .5)], [(1, 0, .5)], [(1, 1, .5)]]
    assert p.check() == []
    assert POLICY_GPU_SHARE + ENGINE_GPU_SHARE == 1.0


def test_plan_tp2_replicas_on_their_group_bundles_never_across_nodes():
    p = plan_placement(4, 2, rollout_tp=2, colocate=True, gpu=True)
    assert p.num_replicas == 2
    assert [[(s.group, s.bundle, s.tp_rank) for s in r] for r in p.replicas] == [
        [(0, 0, 0), (0, 1, 1)], [(1, 0, 0), (1, 1, 1)]]
    with pytest.raises(PlacementError, match="straddles two nodes"):
        plan_placement(6, 3, rollout_tp=2)               # a TP-2 group would span nodes 0 and 1
    with pytest.raises(PlacementError, match="multiple of cluster.gpus_per_node"):
        plan_placement(5, 2)


def test_plan_not_colocated_engines_get_their_own_groups_and_whole_gpus():
    p = plan_placement(2, 2, rollout_tp=1, colocate=False, gpu=True)
    assert p.group_roles == ("policy", "rollout")
    assert [s.num_gpus for s in p.policy] == [1.0, 1.0]
    assert [[(s.group, s.bundle, s.num_gpus) for s in r] for r in p.replicas] == [[(1, 0, 1.0)], [(1, 1, 1.0)]]
    p3 = plan_placement(2, 2, rollout_tp=1, colocate=False, gpu=True, rollout_gpus=3)
    assert [len(g) for g in p3.groups] == [2, 2, 1] and p3.num_replicas == 3
    with pytest.raises(PlacementError, match="rollout.num_gpus"):
        plan_placement(2, 2, rollout_tp=2, colocate=False, rollout_gpus=3)


def test_plan_cpu_only_keeps_the_shapes_without_gpus():
    p = plan_placement(2, 2, rollout_tp=1, colocate=True, gpu=False)
    assert p.groups == (({"CPU": 1.0}, {"CPU": 1.0}),)
    assert all(s.num_gpus == 0 for s in p.slots())
    assert [s.num_cpus for s in p.policy] == [1.0, 1.0] and all(s.num_cpus == 0 for r in p.replicas for s in r)
    assert p.check() == []


def old_layout_plan() -> PlacementPlan:
    """The layout before issue 14: bundles {GPU 1}, policy ranks take a whole GPU, ONE engine asks
    bundle 0 for 0.01 GPU more."""
    pol = tuple(Slot("policy", r, 0, 0, r, 1.0, 1.0) for r in range(2))
    eng = ((Slot("rollout", 0, 0, 0, 0, 0.01, 0.0),),)
    return PlacementPlan(world_size=2, gpus_per_node=2, rollout_tp=1, colocate=True, gpu=True,
                         groups=(({"CPU": 1.0, "GPU": 1.0},) * 2,), group_roles=("policy",), policy=pol, replicas=eng)


def test_quiet_port_is_free_and_below_the_ephemeral_range(monkeypatch):
    """A TP engine's rendezvous port: bindable, from 20000 up to where the node's ephemeral range
    (the OS's pick for outgoing connections and port 0) starts; the OS's pick when no room is left."""
    import socket

    import megatron_denoise.placement as placement

    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        ephemeral_from, ephemeral_to = (int(v) for v in f.read().split())
    ports = {quiet_port() for _ in range(20)}
    assert all(20000 <= p < ephemeral_from for p in ports), (sorted(ports), ephemeral_from)
    assert len(ports) > 1  # random picks: two jobs on a node do not walk the same sequence
    for p in ports:
        with socket.socket() as sk:
            sk.bind(("", p))
    monkeypatch.setattr(placement, "QUIET_PORTS_FROM", ephemeral_from - 10)
    assert ephemeral_from <= quiet_port() <= ephemeral_to


def test_old_layout_is_refused_by_the_plan_check():
    errors = old_layout_plan().check()
    assert len(errors) == 1
    assert "bundle 0 of placement group 0 holds GPU 1.0 but its actors ask for 1.01" in errors[0]
    assert "rollout replica 0 tp-rank 0 (GPU 0.01)" in errors[0]


# ---------------------------------------------------------------------------------------------
# on the fake-GPU cluster


def launch(live: Placement) -> dict:
    """A probe actor in every slot of the plan; {slot: what Ray gave it}."""
    import ray

    remote = ray.remote(PlacementProbe)
    actors = {s: remote.options(**live.options(s)).remote() for s in live.plan.slots()}
    try:
        return live.wait_ready({s: a.where.remote() for s, a in actors.items()}, timeout_s=120)
    finally:
        for a in actors.values():
            ray.kill(a)


def assert_shared_gpus(plan, got):
    """Every bundle's actors see ONE and the same GPU; bundles of a node see distinct GPUs; every
    actor holds exactly its planned share; a group's actors are on one node."""
    by_bundle = {}
    for s, w in got.items():
        assert w["resources"].get("GPU", 0.0) == pytest.approx(s.num_gpus), (s, w)
        assert len(w["gpu_ids"]) == 1 and w["CUDA_VISIBLE_DEVICES"] == w["gpu_ids"][0], (s, w)
        by_bundle.setdefault((s.group, s.bundle), set()).add((w["node_id"], w["CUDA_VISIBLE_DEVICES"]))
    assert all(len(v) == 1 for v in by_bundle.values()), by_bundle
    for g in range(len(plan.groups)):
        devs = [next(iter(v)) for (gg, _), v in by_bundle.items() if gg == g]
        assert len({n for n, _ in devs}) == 1, f"group {g} spans nodes: {devs}"
        assert len({d for _, d in devs}) == len(devs), f"group {g} reuses a GPU: {devs}"
    return by_bundle


@pytest.mark.parametrize("rollout_tp", [1, 2])
def test_colocated_on_two_fake_gpu_nodes(fake_gpu_cluster, rollout_tp):
    plan = plan_placement(4, 2, rollout_tp=rollout_tp, colocate=True, gpu=True)
    live = Placement.create(plan, timeout_s=60)
    try:
        got = launch(live)
        by_bundle = assert_shared_gpus(plan, got)
        nodes = {next(iter(v))[0] for v in by_bundle.values()}
        assert len(nodes) == 2                                  # one group per node
        assert len([s for s in got if s.role == "rollout"]) == 4 and plan.num_replicas == 4 // rollout_tp
        for rep in plan.replicas:                               # a replica's TP ranks: one node, distinct GPUs
            devs = {(got[s]["node_id"], got[s]["CUDA_VISIBLE_DEVICES"]) for s in rep}
            assert len({n for n, _ in devs}) == 1 and len(devs) == rollout_tp
        assert len({w["pid"] for w in got.values()}) == 8      # every slot its own process
        # the rendezvous node: rank 0's bundle
        assert live.node_ip(0, 0)
    finally:
        live.remove()


def test_not_colocated_engines_on_their_own_gpus(fake_gpu_cluster):
    plan = plan_placement(2, 2, rollout_tp=1, colocate=False, gpu=True)
    live = Placement.create(plan, timeout_s=60)
    try:
        got = launch(live)
        assert_shared_gpus(plan, got)
        pol = {(got[s]["node_id"], got[s]["CUDA_VISIBLE_DEVICES"]) for s in plan.policy}
        eng = {(got[s]["node_id"], got[s]["CUDA_VISIBLE_DEVICES"]) for r in plan.replicas for s in r}
        assert len(pol) == 2 and len(eng) == 2 and not pol & eng   # no GPU shared, none empty
        assert all(got[s]["CUDA_VISIBLE_DEVICES"] not in (None, "") for r in plan.replicas for s in r)
    finally:
        live.remove()


def test_old_layout_hang_is_a_named_error_within_the_timeout(fake_gpu_cluster):
    """Bug 1: the engine's 0.01 GPU in a bundle fully taken by policy rank 0 is never granted.
    The old code waited forever; wait_ready names the actor, its demand and its bundle."""
    import ray
    from ray.util.placement_group import placement_group

    plan = old_layout_plan()
    with pytest.raises(PlacementError, match="does not fit its own bundles"):
        Placement.create(plan, timeout_s=5)
    pg = placement_group([dict(b) for b in plan.groups[0]], strategy="STRICT_PACK")
    ray.get(pg.ready(), timeout=60)
    live = Placement(plan=plan, pgs=[pg], timeout_s=60)
    remote = ray.remote(PlacementProbe)
    # the policy ranks are created and started first (given time: a loaded machine starts actors
    # slowly). Created together with the engine, the engine's 0.01 GPU could be granted first and
    # then starve policy rank 0 instead (seen once in CI). Only then is the engine created and its
    # wait timed, so the error can only name the engine
    actors = {s: remote.options(**live.options(s)).remote() for s in plan.slots() if s.role == "policy"}
    try:
        assert actors, "the old layout has a policy rank"
        ray.get([a.where.remote() for a in actors.values()], timeout=120)
        actors.update({s: remote.options(**live.options(s)).remote() for s in plan.slots() if s.role != "policy"})
        t0 = time.monotonic()
        with pytest.raises(PlacementError) as err:
            live.wait_ready({s: a.where.remote() for s, a in actors.items()}, timeout_s=8)
        assert time.monotonic() - t0 < 30
        msg = str(err.value)
        assert "rollout replica 0 tp-rank 0 (asks GPU 0.01" in msg and "holds {CPU: 1, GPU: 1}" in msg
        assert "policy rank" not in msg.split("; cluster total")[0]   # only the engine was starved
    finally:
        for a in actors.values():
            ray.kill(a)
        live.remove()


def test_missing_resources_are_named_after_the_timeout(fake_gpu_cluster):
    plan = plan_placement(3, 3, rollout_tp=1, gpu=True)   # 3 GPUs on one node: nodes have 2
    t0 = time.monotonic()
    with pytest.raises(PlacementError) as err:
        Placement.create(plan, timeout_s=3)
    assert time.monotonic() - t0 < 20
    msg = str(err.value)
    assert "placement group 0 (policy: 3 bundles of {CPU: 1, GPU: 1}, {CPU: 3, GPU: 3} on ONE node)" in msg
    assert "2 alive node(s)" in msg and "GPU: 2}" in msg
