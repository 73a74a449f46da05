"""Context parallelism for packed (THD) micro-batches on the GPU path (Transformer Engine).

The CPU twin splits a packed row as ONE sequence (batching.cp_split: chunks r and 2*cp-1-r of 2*cp,
keys gathered with a mask). With THD every packed sequence is its own causal sequence, so the
load-balanced split must be applied PER SEQUENCE, as megatron does for packed data
(get_batch_on_this_cp_rank -> TE's thd_get_partitioned_indices):

    each sequence i (length n_i) is padded to p_i = round_up(n_i, 2*cp) in a new layout,
    cut into 2*cp chunks of p_i / (2*cp), and CP rank r keeps chunks r and 2*cp-1-r of EVERY
    sequence; TE attention gets cu_seqlens (true lengths) and cu_seqlens_padded (the layout).

The index math is pure (`padded_layout`, `thd_cp_positions`) and checked against the CPU twin's
`batching.cp_chunk_positions` (one sequence filling the row gives exactly its split). `split`
builds a rank's micro-batch without any [S, S] mask. Not run on a GPU yet.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

import torch

from megatron_denoise.megatron.batching import MicroBatch, cp_chunk_positions, round_up

__all__ = ["padded_layout", "thd_cp_positions", "ThdCpMicroBatch", "split", "fixed_length", "packed_seq_params"]


def padded_layout(lengths: list[int], cp: int, total: Optional[int] = None) -> tuple[list[int], list[int], int]:
    """(starts, padded lengths, total) of sequences padded to multiples of 2*cp and laid end to end;
    `total` (a multiple of 2*cp, >= their sum) adds a tail of padding as one more sequence."""
    m = 2 * cp
    padded = [round_up(max(int(n), 1), m) for n in lengths]
    starts, off = [], 0
    for p in padded:
        starts.append(off)
        off += p
    if total is None:
        total = off
    if total < off or total % m:
        raise ValueError(f"THD-CP layout: total {total} must be a multiple of 2*cp ({m}) and >= {off}")
    if total > off:
        starts.append(off)
        padded.append(total - off)
    return starts, padded, total


def thd_cp_positions(starts: list[int], padded: list[int], cp: int, cp_rank: int) -> torch.Tensor:
    """Positions (in the padded layout) that CP rank `cp_rank` keeps: chunks cp_rank and
    2*cp-1-cp_rank of every sequence, sequence by sequence."""
    if not 0 <= cp_rank < cp:
        raise ValueError(f"cp_rank {cp_rank} not in [0, {cp})")
    parts = [cp_chunk_positions(p, cp, cp_rank) + s for s, p in zip(starts, padded)]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


def fixed_length(seq_len: int, max_seqs: int, cp: int, tp: int) -> int:
    """A padded-layout length every micro-batch fits (same shape everywhere, as pipeline
    parallelism needs): each of at most `max_seqs` sequences grows by < 2*cp, plus the tail; a
    multiple of 2*cp*tp so that sequence parallelism splits each rank's half evenly."""
    return round_up(seq_len + max_seqs * (2 * cp - 1), 2 * cp * tp)


@dataclass
class ThdCpMicroBatch(MicroBatch):
    """A CP rank's share of a packed micro-batch in the padded THD layout."""

    cu_seqlens: Optional[torch.Tensor] = None          # [n+1] int32: true lengths (padded layout offsets)
    cu_seqlens_padded: Optional[torch.Tensor] = None   # [n+1] int32: padded layout
    max_seqlen: int = 0

    def thd_packed_seq_params(self, device: torch.device) -> object:
        return packed_seq_params(self, device)

    def to(self, device: torch.device) -> "ThdCpMicroBatch":
        if device.type == "cpu":
            return self
        kw = {f.name: getattr(self, f.name) for f in fields(self)}
        return ThdCpMicroBatch(**{k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v)
                                  for k, v in kw.items()})


def split(mb: MicroBatch, cp: int, cp_rank: int, total: int) -> ThdCpMicroBatch:
    """This CP rank's share of `mb` (a packed micro-batch from batching.materialise, not CP-split)
    in the padded THD layout of length `total`. Padding positions carry no loss (loss_mask 0,
    segment -1) and map to position -1, which scatter_back skips."""
    starts, padded, total = padded_layout(mb.lengths, cp, total)
    n = len(mb.lengths)
    # where each padded-layout position comes from in the original packed row (-1: padding)
    src = torch.full((total,), -1, dtype=torch.long)
    for k in range(n):
        src[starts[k]:starts[k] + mb.lengths[k]] = torch.arange(mb.starts[k], mb.starts[k] + mb.lengths[k])
    keep = thd_cp_positions(starts, padded, cp, cp_rank)
    orig = src[keep]
    real = orig >= 0
    at = orig.clamp_min(0)

    def take(x: Optional[torch.Tensor], fill=0) -> Optional[torch.Tensor]:
        if x is None:
            return None
        out = x[at].clone()
        out[~real] = fill
        return out

    tokens = take(mb.tokens[0])[None]
    # positions restart per sequence in the padded layout too (padding continues its sequence)
    pos_full = torch.zeros(total, dtype=torch.long)
    for s, p in zip(starts, padded):
        pos_full[s:s + p] = torch.arange(p)
    true_cu = [0]
    pad_cu = [0]
    for k, (s, p) in enumerate(zip(starts, padded)):
        ln = mb.lengths[k] if k < n else 0
        true_cu.append(true_cu[-1] + ln)
        pad_cu.append(s + p)
    # TE's THD convention: cu_seqlens counts real tokens, cu_seqlens_padded the layout
    return ThdCpMicroBatch(
        tokens=tokens, position_ids=pos_full[keep][None], attn_mask=None,
        segment=take(mb.segment, -1), targets=take(mb.targets), loss_mask=take(mb.loss_mask, 0.0),
        advantages=take(mb.advantages, 0.0), old_logprobs=take(mb.old_logprobs, 0.0),
        ref_logprobs=take(mb.ref_logprobs, 0.0), seq_num_tokens=mb.seq_num_tokens, rows=mb.rows,
        starts=mb.starts, lengths=mb.lengths, positions=torch.where(real, orig, torch.full_like(orig, -1)),
        is_weights=take(mb.is_weights, 0.0),
        cu_seqlens=torch.tensor(true_cu, dtype=torch.int32), cu_seqlens_padded=torch.tensor(pad_cu, dtype=torch.int32),
        max_seqlen=max(padded))


def packed_seq_params(mb: ThdCpMicroBatch, device: torch.device) -> object:
    """megatron's PackedSeqParams for a THD-CP micro-batch (TE attention with context parallelism)."""
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = mb.cu_seqlens.to(device)
    cup = mb.cu_seqlens_padded.to(device)
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cup,
                           cu_seqlens_kv_padded=cup, max_seqlen_q=mb.max_seqlen, max_seqlen_kv=mb.max_seqlen)
