"""The ONLY module that touches megatron.core.parallel_state (megatron's global process groups).

`initialize(layout, backend=..., seed=...)` builds megatron-core's groups from the pure
`ParallelLayout`, seeds the model-parallel RNG tracker, and returns a `ProcessGroups` value that
is handed to everyone else (model construction, the actor, checkpointing, the converter).
`teardown()` destroys them so a test process can build another layout.

Rank order is megatron's default "tp-cp-ep-dp-pp": tp varies fastest, pp slowest.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist

from megatron_denoise.megatron.cpu_shims import apply_cpu_shims, needs_cpu_shims


@dataclass
class ProcessGroups:
    """Process groups and this rank's coordinates in them, for one layout.

    Groups are torch ProcessGroups (gloo on CPU, nccl on GPU). `pg_collection` is megatron-core's
    ProcessGroupCollection for APIs that accept one.
    """

    layout: Any
    tp: Any
    pp: Any
    dp: Any              # data parallel, without context parallel ranks
    cp: Any
    dp_cp: Any           # data x context parallel: where gradients and token counts are reduced
    ep: Any
    expt_tp: Any
    expt_dp: Any
    mp: Any              # tensor x pipeline (model parallel)
    embedding: Any       # first and last pipeline stage (tied embeddings); None if pp == 1
    tp_rank: int
    pp_rank: int
    dp_rank: int
    cp_rank: int
    ep_rank: int
    rank: int
    world_size: int
    pg_collection: Any
    device: torch.device

    @property
    def tp_size(self) -> int:
        return self.layout.tp

    @property
    def pp_size(self) -> int:
        return self.layout.pp

    @property
    def cp_size(self) -> int:
        return self.layout.cp

    @property
    def dp_size(self) -> int:
        return self.layout.dp

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.layout.pp - 1


# how long a rank waits for the others at the rendezvous and in a collective (torch's default too)
RENDEZVOUS_TIMEOUT_MINUTES = 30


def _layout_value(layout: Any, name: str, default: Any) -> Any:
    v = getattr(layout, name, default)
    return default if v is None else v


def host_store(world_size: int, timeout_minutes: int = RENDEZVOUS_TIMEOUT_MINUTES) -> dist.TCPStore:
    """The rendezvous store, served by this process on a port the OS picks while binding it
    (`.port`). A port probed free and bound later can be taken in between by any outgoing
    connection on the node (Ray opens many): the group's rank 0, or a parent that spawns the
    ranks, hosts the store instead and hands out its port. Serve one group with it: torch wraps
    only its own rendezvous in PrefixStore("default_pg") (torch 2.13, init_process_group), so the
    default group's keys sit in a given store unprefixed."""
    return dist.TCPStore("127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False,
                         timeout=datetime.timedelta(minutes=timeout_minutes))


def join_store(addr: str, port: int, world_size: int, timeout_minutes: int = RENDEZVOUS_TIMEOUT_MINUTES) -> dist.TCPStore:
    """A client of the store another process hosts (host_store) at addr:port."""
    return dist.TCPStore(addr, int(port), world_size, is_master=False,
                         timeout=datetime.timedelta(minutes=timeout_minutes))


def init_distributed(backend: str = "auto", timeout_minutes: int = RENDEZVOUS_TIMEOUT_MINUTES,
                     store: Optional[dist.Store] = None) -> None:
    """Initialise torch.distributed if not done yet: through `store` (host_store/join_store; RANK
    and WORLD_SIZE from the environment) or, without one, from the torchrun environment."""
    if dist.is_initialized():
        return
    pg_backend = process_group_backend(backend, torch.cuda.is_available())
    if "nccl" in pg_backend:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if store is None:
        dist.init_process_group(backend=pg_backend, timeout=timeout)
    else:
        dist.init_process_group(backend=pg_backend, timeout=timeout, store=store,
                                rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))


def process_group_backend(backend: str, cuda: bool) -> str:
    """The torch.distributed backend string of the default group, which megatron's groups inherit
    (megatron creates them without a backend). With NCCL it is "cpu:gloo,cuda:nccl": the actor's
    CPU tensors (micro-batch plans, token counts, metrics) get gloo, CUDA tensors NCCL — an
    NCCL-only group raises "No backend type associated with device type cpu" on step 1.
    megatron_denoise.collectives still checks every collective's device (one helper)."""
    if backend == "auto":
        backend = "nccl" if cuda else "gloo"
    if backend == "nccl":
        return "cpu:gloo,cuda:nccl"
    return backend


def initialize(layout: Any, *, backend: str = "auto", seed: int = 1,
               timeout_minutes: int = RENDEZVOUS_TIMEOUT_MINUTES, store: Optional[dist.Store] = None) -> ProcessGroups:
    """Build megatron's process groups for `layout` and seed the RNG tracker.

    `layout` is a ParallelLayout (megatron_denoise.layout) or any object with tp, pp, vpp, cp, ep,
    etp, world_size, sequence_parallel. The world size must equal torch.distributed's.
    `store`: the rendezvous (host_store/join_store) when torch.distributed is not up yet.
    """
    from megatron.core import parallel_state as mpu
    from megatron.core import tensor_parallel

    apply_cpu_shims()
    init_distributed(backend, timeout_minutes, store)
    world = dist.get_world_size()
    if layout.world_size != world:
        raise ValueError(f"layout.world_size ({layout.world_size}) != torch.distributed world size ({world})")
    if mpu.model_parallel_is_initialized():
        teardown()
    vpp = _layout_value(layout, "vpp", None)
    mpu.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=vpp if vpp and vpp > 1 else None,
        context_parallel_size=_layout_value(layout, "cp", 1),
        expert_model_parallel_size=_layout_value(layout, "ep", 1),
        expert_tensor_parallel_size=_layout_value(layout, "etp", layout.tp),
        distributed_timeout_minutes=timeout_minutes,
        create_gloo_process_groups=True,
    )
    seed_model_parallel_rng(seed)
    return current_groups(layout)


def seed_model_parallel_rng(seed: int) -> None:
    """Seed torch and megatron's tracker: the same formula as megatron's
    model_parallel_cuda_manual_seed (data-parallel state = seed, tensor-parallel state =
    seed + 2718 + tp_rank, expert state = seed + 1024 + 100 * ep_rank + etp_rank), applied to the
    CPU generator on CPU (the tracker is the shimmed CpuRNGStatesTracker)."""
    from megatron.core import parallel_state as mpu
    from megatron.core import tensor_parallel

    torch.manual_seed(seed)
    if not needs_cpu_shims():
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
        return
    tracker = tensor_parallel.get_cuda_rng_tracker()
    tracker.reset()
    random = tensor_parallel.random
    tp_rank = mpu.get_tensor_model_parallel_rank()
    ep_rank = mpu.get_expert_model_parallel_rank()
    etp_rank = mpu.get_expert_tensor_parallel_rank()
    tracker.add(random._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(random._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
    tracker.add(random._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024 + 100 * ep_rank + etp_rank)


def current_groups(layout: Any) -> ProcessGroups:
    """The ProcessGroups of the initialised layout."""
    from megatron.core import parallel_state as mpu
    from megatron.core.process_groups_config import ProcessGroupCollection

    pp = layout.pp
    return ProcessGroups(
        layout=layout,
        tp=mpu.get_tensor_model_parallel_group(),
        pp=mpu.get_pipeline_model_parallel_group(),
        dp=mpu.get_data_parallel_group(with_context_parallel=False),
        cp=mpu.get_context_parallel_group(),
        dp_cp=mpu.get_data_parallel_group(with_context_parallel=True),
        ep=mpu.get_expert_model_parallel_group(),
        expt_tp=mpu.get_expert_tensor_parallel_group(),
        expt_dp=mpu.get_expert_data_parallel_group(),
        mp=mpu.get_model_parallel_group(),
        embedding=mpu.get_embedding_group() if pp > 1 else None,
        tp_rank=mpu.get_tensor_model_parallel_rank(),
        pp_rank=mpu.get_pipeline_model_parallel_rank(),
        dp_rank=mpu.get_data_parallel_rank(with_context_parallel=False),
        cp_rank=mpu.get_context_parallel_rank(),
        ep_rank=mpu.get_expert_model_parallel_rank(),
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        pg_collection=ProcessGroupCollection.use_mpu_process_groups(),
        device=torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"),
    )


def set_virtual_pipeline_rank(rank: Optional[int]) -> None:
    """megatron reads the current model chunk from global state while building interleaved
    (VPP) chunks; the model builder sets it here."""
    from megatron.core import parallel_state as mpu

    mpu.set_virtual_pipeline_model_parallel_rank(rank)


def is_initialized() -> bool:
    from megatron.core import parallel_state as mpu

    return mpu.model_parallel_is_initialized()


def get_rng_tracker_states() -> dict:
    """The tracker's named RNG states (for checkpoints)."""
    from megatron.core import tensor_parallel

    return tensor_parallel.get_cuda_rng_tracker().get_states()


def set_rng_tracker_states(states: dict) -> None:
    from megatron.core import tensor_parallel

    tensor_parallel.get_cuda_rng_tracker().set_states(states)


def teardown(destroy_process_group: bool = False) -> None:
    """Destroy megatron's model-parallel groups (and optionally torch.distributed's default
    group) so another layout can be initialised in the same process."""
    from megatron.core import parallel_state as mpu

    if dist.is_initialized():
        dist.barrier()
    mpu.destroy_model_parallel()
    if destroy_process_group and dist.is_initialized():
        dist.destroy_process_group()
