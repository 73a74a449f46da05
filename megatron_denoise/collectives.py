"""The ONE place that chooses the device of a collective's tensor.

On a GPU cluster the process groups are created as "cpu:gloo,cuda:nccl" (parallel_state), so CPU
tensors (token counts, plans, metrics) and CUDA tensors both have a backend. Should a group have
only NCCL (built elsewhere, e.g. by a library), a CPU tensor would raise "No backend type associated
with device type cpu": every collective of this package therefore goes through the functions
below, which run it on a device the group supports and copy the result back in place. A test
(tests/cluster/test_collectives.py) checks that no module calls torch.distributed's tensor
collectives directly.

    from megatron_denoise import collectives as coll
    coll.all_reduce(t, op=coll.ReduceOp.MAX, group=g)
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist

ReduceOp = dist.ReduceOp

__all__ = ["ReduceOp", "group_device_types", "device_for", "all_reduce", "all_gather", "broadcast"]

# backends and the device types they take tensors of
_BACKEND_DEVICES = {"gloo": {"cpu", "cuda"}, "nccl": {"cuda"}, "mpi": {"cpu", "cuda"}, "ucc": {"cpu", "cuda"}}


def backend_device_types(backend: str) -> set[str]:
    """Device types a backend string supports: "nccl" -> {cuda}; "cpu:gloo,cuda:nccl" -> {cpu, cuda}."""
    backend = str(backend).lower()
    if ":" in backend:
        return {part.split(":")[0].strip() for part in backend.split(",") if ":" in part}
    return set(_BACKEND_DEVICES.get(backend, {"cpu"}))


def group_device_types(group: Any = None) -> set[str]:
    """Device types `group` (None: the default group) can run collectives on."""
    pg = group if group is not None else dist.group.WORLD
    types = getattr(pg, "_device_types", None)
    if types:
        return {getattr(d, "type", str(d)) for d in types}
    return backend_device_types(dist.get_backend(pg))


def device_for(tensor_device: torch.device, supported: set[str]) -> torch.device:
    """The device a tensor on `tensor_device` must be on for a group supporting `supported`."""
    if tensor_device.type in supported:
        return tensor_device
    if "cuda" in supported:
        return torch.device("cuda")  # the current device (set per process by parallel_state)
    if "cpu" in supported:
        return torch.device("cpu")
    if supported:
        return torch.device(sorted(supported)[0])
    raise RuntimeError(f"no device for a collective on {tensor_device} (group supports {sorted(supported)})")


def _on_group_device(t: torch.Tensor, group: Any) -> torch.Tensor:
    return t.to(device_for(t.device, group_device_types(group)))


def all_reduce(t: torch.Tensor, op: Any = ReduceOp.SUM, group: Any = None) -> torch.Tensor:
    """In-place all-reduce of `t` on a device the group supports."""
    work = _on_group_device(t, group)
    dist.all_reduce(work, op=op, group=group)
    if work is not t:
        t.copy_(work)
    return t


def all_gather(parts: list, t: torch.Tensor, group: Any = None) -> list:
    """Fill `parts` (one tensor per group rank, like t) with every rank's t."""
    work = _on_group_device(t, group)
    if work is t and all(p.device == t.device for p in parts):
        dist.all_gather(parts, t, group=group)
        return parts
    tmp = [torch.empty_like(work) for _ in parts]
    dist.all_gather(tmp, work, group=group)
    for p, x in zip(parts, tmp):
        p.copy_(x)
    return parts


def broadcast(t: torch.Tensor, src: Optional[int] = None, group: Any = None,
              group_src: Optional[int] = None) -> torch.Tensor:
    """In-place broadcast of `t` from `src` (global rank) or `group_src` (rank in the group)."""
    work = _on_group_device(t, group)
    if group_src is not None:
        dist.broadcast(work, group=group, group_src=group_src)
    else:
        dist.broadcast(work, src=src, group=group)
    if work is not t:
        t.copy_(work)
    return t
