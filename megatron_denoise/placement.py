"""Placement on Ray: the ONE module that decides where every process of a run lives.

    plan = plan_placement(cfg, gpu=True)       # pure: bundles, and a slot for every actor
    live = Placement.create(plan)             # placement groups, ready or a named error
    opts = live.options(plan.policy[3])       # ray .options(...) of policy rank 3
    live.wait_ready({"policy rank 0": ref, ...})  # actors started, or an error naming what is missing

Picture (1 node x 4 GPUs, actor world 4, rollout.tensor_parallel_size 2, colocate: true)::

    placement group 0 (node 0, STRICT_PACK)
      bundle 0 {GPU 1, CPU 1}: policy rank 0 (GPU 0.5) + replica 0 tp-rank 0 (GPU 0.5)
      bundle 1 {GPU 1, CPU 1}: policy rank 1 (GPU 0.5) + replica 0 tp-rank 1 (GPU 0.5)
      bundle 2 {GPU 1, CPU 1}: policy rank 2 (GPU 0.5) + replica 1 tp-rank 0 (GPU 0.5)
      bundle 3 {GPU 1, CPU 1}: policy rank 3 (GPU 0.5) + replica 1 tp-rank 1 (GPU 0.5)

- One placement group per node (STRICT_PACK), so bundle order is node order and a rollout TP
  group (tensor_parallel_size consecutive bundles, tensor_parallel_size dividing gpus_per_node)
  never straddles two nodes. Policy rank r sits in bundle r % gpus_per_node of group
  r // gpus_per_node; rank 0's node (group 0) hosts the torch.distributed rendezvous.
- Colocated (`rollout.colocate: true`): every GPU is shared by one policy rank and one slice of
  one engine replica through fractional GPU requests (POLICY_GPU_SHARE + ENGINE_GPU_SHARE = 1).
  The fractions are Ray scheduling tokens only; the engine's memory is bounded by
  rollout.gpu_memory_utilization and freed by sleep mode while the actor trains.
  world / rollout.tensor_parallel_size replicas; each TP rank of a replica is its own actor in
  its own bundle (vLLM's external-launcher executor: the TP ranks form their own
  torch.distributed group, rendezvous on the replica's first bundle), so vLLM never places
  processes itself.
- Not colocated: the engines get their own placement groups (rollout.num_gpus GPUs, one group
  per node-sized block) and a whole GPU per TP rank.
- Without GPUs (cluster.device cpu, or no GPU in the Ray cluster) the same shapes hold with CPU
  bundles only: a policy rank takes the bundle's CPU, the colocated engine takes none.

The old layout's hang (bundles {"GPU": 1} fully taken by policy ranks, then an engine asking
bundle 0 for 0.01 GPU more) cannot be planned: `PlacementPlan.check()` sums every bundle's
demands, and `Placement.wait_ready` turns a start-up that never happens into an error that names
the actor, its demand and its bundle, after `timeout_s`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Optional

__all__ = ["POLICY_GPU_SHARE", "ENGINE_GPU_SHARE", "Slot", "PlacementPlan", "PlacementError", "plan_placement",
           "plan_from_config", "use_gpus", "Placement"]

POLICY_GPU_SHARE = 0.5
ENGINE_GPU_SHARE = 0.5
DEFAULT_TIMEOUT_S = 120.0


class PlacementError(RuntimeError):
    """Resources that cannot be had (or were not granted in time), named."""


@dataclass(frozen=True)
class Slot:
    """Where one Ray actor runs: bundle `bundle` of placement group `group`, with its demand."""

    role: str          # "policy" | "rollout"
    index: int         # policy rank, or replica id
    tp_rank: int       # rank inside the replica's TP group (0 for policy ranks)
    group: int         # placement group index (Placement.pgs)
    bundle: int        # bundle index inside that group
    num_gpus: float
    num_cpus: float

    @property
    def name(self) -> str:
        if self.role == "policy":
            return f"policy rank {self.index}"
        return f"rollout replica {self.index} tp-rank {self.tp_rank}"


@dataclass(frozen=True)
class PlacementPlan:
    """Pure description of a run's placement (no Ray)."""

    world_size: int
    gpus_per_node: int
    rollout_tp: int
    colocate: bool
    gpu: bool
    groups: tuple             # tuple of bundle lists, one list per placement group
    group_roles: tuple        # "policy" (shared with colocated engines) | "rollout"
    policy: tuple             # Slot per policy rank
    replicas: tuple           # tuple of Slot tuples, one per engine replica (its TP ranks in order)

    @property
    def num_replicas(self) -> int:
        return len(self.replicas)

    def slots(self) -> list[Slot]:
        return list(self.policy) + [s for rep in self.replicas for s in rep]

    def demand(self) -> dict[tuple[int, int], dict[str, float]]:
        """Summed demand per (group, bundle)."""
        out: dict[tuple[int, int], dict[str, float]] = {}
        for s in self.slots():
            d = out.setdefault((s.group, s.bundle), {"GPU": 0.0, "CPU": 0.0})
            d["GPU"] += s.num_gpus
            d["CPU"] += s.num_cpus
        return out

    def check(self) -> list[str]:
        """Every bundle whose actors ask for more than it holds, named (empty: the plan fits)."""
        errors = []
        for (g, b), d in sorted(self.demand().items()):
            if g >= len(self.groups) or b >= len(self.groups[g]):
                errors.append(f"placement group {g} has no bundle {b}")
                continue
            have = self.groups[g][b]
            for res in ("GPU", "CPU"):
                if d[res] > have.get(res, 0.0) + 1e-9:
                    who = ", ".join(f"{s.name} ({res} {getattr(s, 'num_gpus' if res == 'GPU' else 'num_cpus')})"
                                    for s in self.slots() if (s.group, s.bundle) == (g, b))
                    errors.append(f"bundle {b} of placement group {g} holds {res} {have.get(res, 0.0)} but its "
                                  f"actors ask for {d[res]:g}: {who}")
        return errors

    def describe(self) -> str:
        lines = []
        for g, bundles in enumerate(self.groups):
            lines.append(f"placement group {g} ({self.group_roles[g]}, STRICT_PACK on one node)")
            for b, res in enumerate(bundles):
                who = [f"{s.name} (GPU {s.num_gpus:g})" for s in self.slots() if (s.group, s.bundle) == (g, b)]
                lines.append(f"  bundle {b} {res}: " + " + ".join(who))
        return "\n".join(lines)


def plan_placement(world_size: int, gpus_per_node: int, rollout_tp: int = 1, colocate: bool = True,
                   gpu: bool = True, rollout_gpus: int = 0) -> PlacementPlan:
    """The placement of `world_size` policy ranks (gpus_per_node per node) and the rollout
    replicas of `rollout_tp` GPUs each. rollout_gpus: the engines' GPUs when not colocated
    (0: as many as the actor's). Raises PlacementError naming the keys on impossible shapes."""
    problems = []
    if world_size < 1 or gpus_per_node < 1 or rollout_tp < 1:
        raise PlacementError(f"world size ({world_size}), cluster.gpus_per_node ({gpus_per_node}) and "
                             f"rollout.tensor_parallel_size ({rollout_tp}) must be >= 1")
    if world_size % gpus_per_node:
        problems.append(f"world size ({world_size}) must be a multiple of cluster.gpus_per_node ({gpus_per_node})")
    if gpus_per_node % rollout_tp:
        problems.append(f"rollout.tensor_parallel_size ({rollout_tp}) must divide cluster.gpus_per_node "
                        f"({gpus_per_node}) so that an engine's TP group never straddles two nodes")
    engine_gpus = world_size if colocate or not rollout_gpus else rollout_gpus
    if engine_gpus % rollout_tp:
        key = "the world size" if colocate or not rollout_gpus else "rollout.num_gpus"
        problems.append(f"{key} ({engine_gpus}) must be a multiple of rollout.tensor_parallel_size ({rollout_tp})")
    if problems:
        raise PlacementError("; ".join(problems))

    bundle = {"CPU": 1.0, "GPU": 1.0} if gpu else {"CPU": 1.0}
    nodes = world_size // gpus_per_node
    groups = [[dict(bundle) for _ in range(gpus_per_node)] for _ in range(nodes)]
    roles = ["policy"] * nodes
    pol_gpu = (POLICY_GPU_SHARE if colocate else 1.0) if gpu else 0.0
    policy = tuple(Slot("policy", r, 0, r // gpus_per_node, r % gpus_per_node, pol_gpu, 1.0)
                   for r in range(world_size))
    replicas = []
    if colocate:
        eng_gpu = ENGINE_GPU_SHARE if gpu else 0.0
        for j in range(world_size // rollout_tp):
            first = j * rollout_tp
            replicas.append(tuple(Slot("rollout", j, k, (first + k) // gpus_per_node, (first + k) % gpus_per_node,
                                       eng_gpu, 0.0) for k in range(rollout_tp)))
    else:
        # the engines' own groups, node-sized blocks (a TP group stays inside one block)
        per = gpus_per_node
        base = len(groups)
        left = engine_gpus
        while left > 0:
            n = min(per, left)
            groups.append([dict(bundle) for _ in range(n)])
            roles.append("rollout")
            left -= n
        eng_gpu = 1.0 if gpu else 0.0
        eng_cpu = 0.0 if gpu else 1.0  # CPU-only: the bundle's CPU is the engine's token
        for j in range(engine_gpus // rollout_tp):
            first = j * rollout_tp
            replicas.append(tuple(Slot("rollout", j, k, base + (first + k) // per, (first + k) % per, eng_gpu, eng_cpu)
                                  for k in range(rollout_tp)))
    return PlacementPlan(world_size=world_size, gpus_per_node=gpus_per_node, rollout_tp=rollout_tp,
                         colocate=colocate, gpu=gpu, groups=tuple(tuple(g) for g in groups), group_roles=tuple(roles),
                         policy=policy, replicas=tuple(replicas))


def use_gpus(cfg: Any) -> bool:
    """Whether bundles hold GPUs: cluster.device cuda -> yes, cpu -> no, auto -> the Ray cluster
    declares GPUs (a Slurm driver node may itself have none)."""
    if cfg.cluster.device == "cuda":
        return True
    if cfg.cluster.device == "cpu":
        return False
    import ray

    return bool(ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0)


def plan_from_config(cfg: Any, gpu: Optional[bool] = None) -> PlacementPlan:
    r = cfg.rollout
    return plan_placement(cfg.cluster.world_size, cfg.cluster.gpus_per_node, r.tensor_parallel_size, r.colocate,
                          use_gpus(cfg) if gpu is None else gpu, getattr(r, "num_gpus", 0))


def _fmt(res: dict) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(res.items()) if k in ("CPU", "GPU")) + "}"


def _cluster_summary() -> str:
    import ray

    total, avail = ray.cluster_resources(), ray.available_resources()
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    per_node = "; ".join(f"node {n['NodeID'][:8]} {_fmt(n.get('Resources', {}))}" for n in nodes)
    return (f"cluster total {_fmt(total)}, available {_fmt(avail)}, {len(nodes)} alive node(s): {per_node}")


@dataclass
class Placement:
    """The live placement groups of a plan."""

    plan: PlacementPlan
    pgs: list
    timeout_s: float = DEFAULT_TIMEOUT_S
    _ips: dict = field(default_factory=dict)

    @classmethod
    def create(cls, plan: PlacementPlan, timeout_s: float = DEFAULT_TIMEOUT_S) -> "Placement":
        """Reserve every placement group; raise PlacementError naming the missing resources if
        one is not granted within timeout_s (the groups reserved so far are released)."""
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group

        errors = plan.check()
        if errors:
            raise PlacementError("the placement plan does not fit its own bundles: " + "; ".join(errors))
        pgs = [placement_group([dict(b) for b in bundles], strategy="STRICT_PACK", name="")
               for bundles in plan.groups]
        deadline = time.monotonic() + timeout_s
        for g, pg in enumerate(pgs):
            try:
                ray.get(pg.ready(), timeout=max(0.1, deadline - time.monotonic()))
            except ray.exceptions.GetTimeoutError:
                need = {}
                for b in plan.groups[g]:
                    for k, v in b.items():
                        need[k] = need.get(k, 0.0) + v
                msg = (f"placement group {g} ({plan.group_roles[g]}: {len(plan.groups[g])} bundles of "
                       f"{_fmt(plan.groups[g][0])}, {_fmt(need)} on ONE node) was not granted within "
                       f"{timeout_s:g} s; {_cluster_summary()}")
                for p in pgs:
                    remove_placement_group(p)
                raise PlacementError(msg) from None
        return cls(plan=plan, pgs=pgs, timeout_s=timeout_s)

    def options(self, slot: Slot) -> dict:
        """Ray .options(...) for the actor of `slot`."""
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        return {"num_cpus": slot.num_cpus, "num_gpus": slot.num_gpus,
                "scheduling_strategy": PlacementGroupSchedulingStrategy(
                    placement_group=self.pgs[slot.group], placement_group_bundle_index=slot.bundle,
                    placement_group_capture_child_tasks=False)}

    def node_ip(self, group: int, bundle: int = 0) -> str:
        """IP of the node holding a bundle (a zero-resource probe task placed there)."""
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        key = (group, bundle)
        if key not in self._ips:
            strategy = PlacementGroupSchedulingStrategy(placement_group=self.pgs[group],
                                                        placement_group_bundle_index=bundle)
            probe = ray.remote(num_cpus=0, scheduling_strategy=strategy)(_node_ip)
            self._ips[key] = ray.get(probe.remote(), timeout=self.timeout_s)
        return self._ips[key]

    def rendezvous(self, group: int, bundle: int = 0) -> tuple[str, int]:
        """(IP, free TCP port; quiet_port) ON the node holding a bundle: a TP engine's rendezvous
        address must be free where its rank 0 runs, not on the driver's node. (The policy group
        needs none: its rank 0 serves the store on a port it binds itself.)"""
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        strategy = PlacementGroupSchedulingStrategy(placement_group=self.pgs[group], placement_group_bundle_index=bundle)
        probe = ray.remote(num_cpus=0, scheduling_strategy=strategy)(_node_ip_and_port)
        ip, port = ray.get(probe.remote(), timeout=self.timeout_s)
        self._ips[(group, bundle)] = ip
        return ip, port

    def wait_ready(self, refs: dict, timeout_s: Optional[float] = None) -> dict:
        """Wait for {slot or name: ObjectRef of a first call}; on timeout raise PlacementError naming
        every actor that has not started, its demand and what its bundle and the cluster hold."""
        import ray

        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        keys = list(refs)
        ready, pending = ray.wait([refs[k] for k in keys], num_returns=len(keys), timeout=timeout_s)
        if pending:
            pend = set(pending)
            late = []
            demand = self.plan.demand()
            for k in keys:
                if refs[k] in pend:
                    if isinstance(k, Slot):
                        have = self.plan.groups[k.group][k.bundle]
                        asked = demand.get((k.group, k.bundle), {})
                        late.append(f"{k.name} (asks GPU {k.num_gpus:g}, CPU {k.num_cpus:g} in bundle {k.bundle} of "
                                    f"placement group {k.group}, which holds {_fmt(have)}; all its actors ask "
                                    f"{_fmt(asked)})")
                    else:
                        late.append(str(k))
            raise PlacementError(f"not started within {timeout_s:g} s: " + "; ".join(late) + f"; {_cluster_summary()}")
        values = ray.get([refs[k] for k in keys])
        return dict(zip(keys, values))

    def remove(self) -> None:
        from ray.util.placement_group import remove_placement_group

        for pg in self.pgs:
            try:
                remove_placement_group(pg)
            except Exception:  # noqa: BLE001 - already gone with the cluster
                pass
        self.pgs = []


def _node_ip() -> str:
    import ray

    return ray.util.get_node_ip_address()


def _node_ip_and_port() -> tuple[str, int]:
    import ray

    return ray.util.get_node_ip_address(), quiet_port()


QUIET_PORTS_FROM = 20000  # above Ray's default worker ports (10002-19999)


def quiet_port(attempts: int = 64) -> int:
    """A TCP port free now and below the node's ephemeral range (ip_local_port_range), for a
    rendezvous that its process binds later (vLLM's external launcher). Every outgoing connection's
    local port and every bind to port 0 come from the ephemeral range, so between this probe and
    that bind only a process choosing this very port can take it. Falls back to the OS's pick
    when the ephemeral range starts too low to leave room."""
    import random
    import socket

    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            ephemeral_from = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_from = 32768  # Linux's default
    rng = random.SystemRandom()  # not the trainer's seeded generator: concurrent jobs pick apart
    for _ in range(attempts if ephemeral_from - QUIET_PORTS_FROM >= 1024 else 0):
        port = rng.randrange(QUIET_PORTS_FROM, ephemeral_from)
        with socket.socket() as sock:
            try:
                sock.bind(("", port))
            except OSError:
                continue
            return port
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def where_am_i() -> dict:
    """What Ray gave the calling actor: visible devices, GPU ids, assigned shares, node (tests,
    logs)."""
    import os

    import ray

    ctx = ray.get_runtime_context()
    return {"CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
            "resources": dict(ctx.get_assigned_resources()),
            "node_id": ctx.get_node_id(),
            "pid": os.getpid()}


class PlacementProbe:
    """A do-nothing actor that reports `where_am_i()`: placement checks without starting engines."""

    def where(self) -> dict:
        return where_am_i()
