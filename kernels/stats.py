"""Per-token softmax statistics of one vocabulary shard, and how shards combine.

Phase 1 of every backend (chunked PyTorch, Triton) turns hidden states [T, H] and ONE vocab shard
of the output weight [V_local, H] into four [T] fp32 vectors (`ShardStats`) without keeping the
[T, V_local] logits:

    max        m_r  = max_j z_j                      over the shard's valid columns
    sumexp     s_r  = sum_j exp(z_j - m_r)
    target     t_r  = z_target if this shard owns the target id, else 0
    sum_pz     q_r  = sum_j exp(z_j - m_r) * z_j     (only needed for the entropy)

Between phase 1 and phase 2 the CALLER combines them over the tensor-parallel group (kernels
never call collectives); `combine_stats` does that with one MAX and one SUM all-reduce when a
process group is given and is a pure function otherwise:

    M = max_r m_r,  S = sum_r s_r e^{m_r - M},  Q = sum_r q_r e^{m_r - M},  tgt = sum_r t_r
    lse = M + log S,  logp = tgt - lse,  E[z] = Q / S,  entropy = lse - E[z]

A shard with no valid column (all padding) reports m = -1e30, s = q = 0: a finite floor instead of
-inf keeps e^{m_r - M} at exactly 0 without producing NaN from (-inf) - (-inf).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from megatron_denoise import collectives as coll

# Finite stand-in for -inf as the running max of an empty (all-padding) shard or tile.
NEG_FLOOR = -1.0e30


@dataclass
class ShardStats:
    """Phase-1 output of one vocab shard; every field is [T] fp32."""

    max: torch.Tensor
    sumexp: torch.Tensor
    target: torch.Tensor
    sum_pz: torch.Tensor


@dataclass
class TokenStats:
    """Globally combined per-token results; every field is [T] fp32.

    `lse` and `mean_logit` (E_p[z]) are what the backward pass needs to recompute p and the
    entropy gradient shard by shard.
    """

    lse: torch.Tensor
    mean_logit: torch.Tensor
    logprobs: torch.Tensor
    entropy: torch.Tensor


def combine_stats(stats: ShardStats, group: Optional[Any] = None) -> TokenStats:
    """Combine shard statistics over the TP `group` (None: a single shard, no communication)."""
    m, s, q, t = stats.max, stats.sumexp, stats.sum_pz, stats.target
    if group is not None:
        import torch.distributed as dist  # lazy: pure callers never import process-group code

        m_glob = m.clone()
        coll.all_reduce(m_glob, op=dist.ReduceOp.MAX, group=group)
        scale = torch.exp(m - m_glob)  # [T]; 0 for an all-padding shard
        packed = torch.stack([s * scale, q * scale, t])  # [3, T]: one SUM all-reduce for all three
        coll.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
        m, (s, q, t) = m_glob, packed.unbind(0)
    lse = m + torch.log(s)
    mean_logit = q / s
    return TokenStats(lse=lse, mean_logit=mean_logit, logprobs=t - lse, entropy=lse - mean_logit)


def local_vocab_bounds(vocab_start: int, shard_rows: int, vocab_size: Optional[int]) -> int:
    """Number of VALID rows of a shard: rows past the true vocabulary (padding) are excluded.

    vocab_size is the global number of real tokens (None: every row of every shard is real).
    """
    if vocab_start < 0:
        raise ValueError(f"vocab_start ({vocab_start}) must be >= 0")
    if vocab_size is None:
        return shard_rows
    return max(0, min(shard_rows, vocab_size - vocab_start))


def combine_shard_list(shards: list[ShardStats]) -> TokenStats:
    """The TP combine done in one process over every shard's stats (the same arithmetic as the
    all-reduces in `combine_stats`): for emulating tensor parallelism in tests and tools."""
    m = torch.stack([s.max for s in shards]).amax(0)
    scales = [torch.exp(s.max - m) for s in shards]
    total = ShardStats(max=m,
                       sumexp=sum(s.sumexp * c for s, c in zip(shards, scales)),
                       sum_pz=sum(s.sum_pz * c for s, c in zip(shards, scales)),
                       target=sum(s.target for s in shards))
    return combine_stats(total, None)
