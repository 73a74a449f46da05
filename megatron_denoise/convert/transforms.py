"""Named tensor transforms between Hugging Face and megatron-core layouts.

Every transform is a pair (forward: HF tensors -> one megatron tensor, inverse: megatron tensor ->
HF tensors) of pure slicing/concatenation, so a round trip is bit-exact. Transforms work on
whatever slice of the model a rank holds: the caller passes the LOCAL head/group counts.

megatron-core layouts (verified against megatron/core/transformer/attention.py and mlp.py):
- linear_qkv.weight [groups * (heads/groups + 2) * d, hidden]: rows are interleaved per query
  group g: [q heads of g (heads/groups * d rows), k_g (d rows), v_g (d rows)]. A TP shard of it is
  a contiguous block of whole groups, which is why TP splits q, k and v by groups.
- linear_fc1.weight of a gated MLP (SwiGLU) [2 * ffn, hidden]: [gate; up]. Under TP a rank holds
  [gate_r; up_r], NOT a contiguous block of the full tensor: shard gate and up, then fuse.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

Tensor = torch.Tensor


# --- grouped-query attention ------------------------------------------------------------------
def fuse_qkv(q: Tensor, k: Tensor, v: Tensor, num_heads: int, num_groups: int, head_dim: int) -> Tensor:
    """q [heads*d, ...], k/v [groups*d, ...] -> megatron linear_qkv [groups*(heads/groups+2)*d, ...].
    Works for weights (trailing hidden dim) and biases (no trailing dim)."""
    if num_heads % num_groups:
        raise ValueError(f"num_heads ({num_heads}) must be divisible by num_groups ({num_groups})")
    per = num_heads // num_groups
    rest = tuple(q.shape[1:])
    _check_rows("q", q, num_heads * head_dim)
    _check_rows("k", k, num_groups * head_dim)
    _check_rows("v", v, num_groups * head_dim)
    q = q.reshape(num_groups, per * head_dim, *rest)
    k = k.reshape(num_groups, head_dim, *rest)
    v = v.reshape(num_groups, head_dim, *rest)
    return torch.cat([q, k, v], dim=1).reshape(num_groups * (per + 2) * head_dim, *rest)


def split_qkv(qkv: Tensor, num_heads: int, num_groups: int, head_dim: int) -> tuple[Tensor, Tensor, Tensor]:
    """Inverse of ``fuse_qkv``."""
    per = num_heads // num_groups
    rest = tuple(qkv.shape[1:])
    _check_rows("linear_qkv", qkv, num_groups * (per + 2) * head_dim)
    g = qkv.reshape(num_groups, (per + 2) * head_dim, *rest)
    q, k, v = torch.split(g, [per * head_dim, head_dim, head_dim], dim=1)
    return (q.reshape(num_heads * head_dim, *rest), k.reshape(num_groups * head_dim, *rest),
            v.reshape(num_groups * head_dim, *rest))


def _check_rows(what: str, t: Tensor, rows: int) -> None:
    if t.shape[0] != rows:
        raise ValueError(f"{what} has {t.shape[0]} rows, expected {rows}")


# --- gated MLP --------------------------------------------------------------------------------
def fuse_gate_up(gate: Tensor, up: Tensor) -> Tensor:
    """gate/up [ffn, hidden] -> megatron linear_fc1 [2*ffn, hidden] = [gate; up]."""
    if gate.shape != up.shape:
        raise ValueError(f"gate {tuple(gate.shape)} and up {tuple(up.shape)} shapes differ")
    return torch.cat([gate, up], dim=0)


def split_gate_up(fc1: Tensor) -> tuple[Tensor, Tensor]:
    gate, up = torch.chunk(fc1, 2, dim=0)
    return gate, up


# --- experts ----------------------------------------------------------------------------------
def stack_experts(per_expert: Sequence[Tensor]) -> Tensor:
    """E tensors [...] -> [E, ...] (transformers' in-memory fused expert layout)."""
    return torch.stack(list(per_expert), dim=0)


def unstack_experts(stacked: Tensor) -> list[Tensor]:
    return list(torch.unbind(stacked, dim=0))


# --- tensor parallel --------------------------------------------------------------------------
def tp_shard(t: Tensor, dim: int, size: int, rank: int) -> Tensor:
    """The rank-th of ``size`` equal chunks of ``t`` along ``dim``."""
    if t.shape[dim] % size:
        raise ValueError(f"dimension {dim} of size {t.shape[dim]} is not divisible by tp={size}")
    return torch.chunk(t, size, dim=dim)[rank]


def tp_unshard(pieces: Sequence[Tensor], dim: int) -> Tensor:
    return torch.cat(list(pieces), dim=dim)


def pad_vocab(t: Tensor, padded_rows: int) -> Tensor:
    """[V, h] -> [Vp, h] with zero rows (megatron pads the vocabulary to a multiple of tp * k)."""
    if padded_rows < t.shape[0]:
        raise ValueError(f"padded vocabulary ({padded_rows}) is smaller than the vocabulary ({t.shape[0]})")
    if padded_rows == t.shape[0]:
        return t
    pad = t.new_zeros((padded_rows - t.shape[0],) + tuple(t.shape[1:]))
    return torch.cat([t, pad], dim=0)


def unpad_vocab(t: Tensor, vocab_size: int) -> Tensor:
    return t[:vocab_size]


# --- the registry used by the name tables ------------------------------------------------------
@dataclass(frozen=True)
class Dims:
    """Head counts of the slice of the model a transform sees (local to a TP rank)."""
    num_heads: int
    num_groups: int
    head_dim: int


@dataclass(frozen=True)
class Transform:
    name: str
    arity: int                                   # number of HF tensors
    forward: Callable[[list[Tensor], Dims], Tensor]
    inverse: Callable[[Tensor, Dims], list[Tensor]]


TRANSFORMS: dict[str, Transform] = {
    "copy": Transform("copy", 1, lambda ts, d: ts[0], lambda t, d: [t]),
    "qkv": Transform(
        "qkv", 3,
        lambda ts, d: fuse_qkv(ts[0], ts[1], ts[2], d.num_heads, d.num_groups, d.head_dim),
        lambda t, d: list(split_qkv(t, d.num_heads, d.num_groups, d.head_dim))),
    "gate_up": Transform("gate_up", 2, lambda ts, d: fuse_gate_up(ts[0], ts[1]),
                         lambda t, d: list(split_gate_up(t))),
}
