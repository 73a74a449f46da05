"""Attention over packed sequences for the local (CPU) layer spec without an [S, S] mask.

megatron's local DotProductAttention takes an explicit [b, 1, S, S] mask: for a packed row it
computes the scores of EVERY pair of positions (S^2 per head, most of them between different
sequences, then masked), runs the softmax over all of them and keeps an [S, S] probability tensor
per head for the backward. With sequence packing the useful work is sum(n_i^2) / 2, not S^2.

`SegmentAttention` replaces the local spec's core attention (context parallelism keeps its own,
megatron_denoise.megatron.cp_attention). Its "mask" argument is a SEGMENT tensor [b, 1, 1, S]
(long: the local sequence index of every position, -1 on padding; `batching.segment_mask`), and
it runs torch's scaled_dot_product_attention with is_causal per sequence (no mask, no [S, S]
tensor kept: the CPU kernel is a flash-attention one). Padding positions attend to themselves
only, exactly as under the block-diagonal mask (their output is their own value vector). Given a
boolean [S, S] mask it is megatron's DotProductAttention unchanged.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.dot_product_attention import DotProductAttention


def is_segment_mask(mask: Optional[torch.Tensor]) -> bool:
    return mask is not None and mask.dtype == torch.long and mask.dim() == 4 and mask.shape[2] == 1


def segment_runs(segment: torch.Tensor) -> list[tuple[int, int, int]]:
    """(start, end, segment id) of each run of equal ids in a [S] tensor."""
    vals, counts = torch.unique_consecutive(segment, return_counts=True)
    out, start = [], 0
    for v, c in zip(vals.tolist(), counts.tolist()):
        out.append((start, start + c, int(v)))
        start += c
    return out


class SegmentAttention(DotProductAttention):
    """DotProductAttention that, given a segment tensor instead of a mask, attends causally within
    each packed sequence (see the module docstring)."""

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: Optional[torch.Tensor], attn_mask_type: Any = None,
                attention_bias: Any = None, packed_seq_params: Any = None) -> torch.Tensor:
        if not is_segment_mask(attention_mask):
            return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias,
                                   packed_seq_params)
        if attention_bias is not None or packed_seq_params is not None:
            raise ValueError("SegmentAttention takes neither an attention bias nor packed_seq_params")
        if self.training and self.config.attention_dropout > 0:
            raise ValueError("SegmentAttention has no attention dropout (model attention_dropout must be 0)")
        # [s, b, np|ng, hn] -> [b, np|ng, s, hn]
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))
        rep = q.shape[1] // k.shape[1]
        if rep > 1:  # grouped-query attention: repeat the key/value heads like megatron does
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        outs = []
        for b in range(q.shape[0]):
            pieces = []
            for start, end, seg in segment_runs(attention_mask[b, 0, 0]):
                if seg < 0:  # padding: each position sees only itself -> its own value vector
                    pieces.append(v[b:b + 1, :, start:end])
                    continue
                pieces.append(F.scaled_dot_product_attention(
                    q[b:b + 1, :, start:end], k[b:b + 1, :, start:end], v[b:b + 1, :, start:end],
                    is_causal=True, scale=self.softmax_scale))
            outs.append(torch.cat(pieces, dim=2) if len(pieces) > 1 else pieces[0])
        ctx = torch.cat(outs, dim=0) if len(outs) > 1 else outs[0]      # [b, np, s, hn]
        ctx = ctx.permute(2, 0, 1, 3).contiguous()                        # [s, b, np, hn]
        return ctx.view(ctx.shape[0], ctx.shape[1], -1)                   # [s, b, np * hn]
