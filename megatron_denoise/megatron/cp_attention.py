"""Context-parallel attention for the local (CPU) layer spec: the CPU twin of TE's CP attention.

megatron-core 0.16.1 accepts context parallelism only with Transformer Engine's attention
(dot_product_attention.py:58), and Transformer Engine cannot load without CUDA. On GPU the TE
spec is used unchanged; on CPU this module replaces the local spec's core attention so that the
CP data path around it (load-balanced sequence splitting, RoPE positions per CP rank, log-prob
scattering, loss normalisation across CP ranks, gradient reduction over dp x cp) runs for real
and is checked for parity with the single-process model.

Each CP rank holds 2 of the 2*cp equal chunks of the (packed) sequence: chunks r and 2cp-1-r
(megatron's causal load balancing). Here every rank all-gathers K and V over the CP group
(backward: reduce-scatter, summing the key/value gradients of all ranks' queries), puts them back
in global position order, and runs megatron's own DotProductAttention on its local queries
against all keys with the mask the batcher built for those queries ([b, 1, sq_local, S], True =
masked: block-diagonal causal in global positions). Memory is O(S) keys per rank, like all-gather
CP; the ring variants are a GPU optimisation.
"""
from __future__ import annotations

import copy
from typing import Any, Optional

import torch

from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
from megatron.core.transformer.dot_product_attention import DotProductAttention

from megatron_denoise.megatron.batching import cp_chunk_positions


class CPAllGatherAttention(DotProductAttention):
    """DotProductAttention whose keys/values are gathered over the context-parallel group."""

    def __init__(self, config: Any, layer_number: int, attn_mask_type: Any, attention_type: str,
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type: Optional[str] = None, pg_collection: Any = None) -> None:
        local = copy.copy(config)
        local.context_parallel_size = 1  # the parent's guard: CP is handled here, around it
        super().__init__(local, layer_number, attn_mask_type, attention_type, attention_dropout,
                         softmax_scale, cp_comm_type, pg_collection)
        self.config = config
        if pg_collection is None or getattr(pg_collection, "cp", None) is None:
            raise ValueError("CPAllGatherAttention needs a pg_collection with the context-parallel group")
        self.cp_group = pg_collection.cp
        self._order: dict[int, torch.Tensor] = {}

    def _global_order(self, s_local: int) -> torch.Tensor:
        """Permutation putting the gathered [rank0 chunks, rank1 chunks, ...] in position order."""
        if s_local not in self._order:
            cp = self.cp_group.size()
            gathered = torch.cat([cp_chunk_positions(s_local * cp, cp, r) for r in range(cp)])
            self._order[s_local] = torch.argsort(gathered)
        return self._order[s_local]

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: Optional[torch.Tensor], attn_mask_type: Any = None,
                attention_bias: Any = None, packed_seq_params: Any = None) -> torch.Tensor:
        # key/value: [s_local, b, ng, hn] -> [S, b, ng, hn] in global position order
        if attention_mask is None:
            raise ValueError("context-parallel attention needs the batcher's explicit mask "
                             "[b, 1, sq_local, S] (global key positions)")
        order = self._global_order(key.shape[0]).to(key.device)
        k = gather_from_sequence_parallel_region(key, tensor_parallel_output_grad=True, group=self.cp_group)
        v = gather_from_sequence_parallel_region(value, tensor_parallel_output_grad=True, group=self.cp_group)
        k = k.index_select(0, order)
        v = v.index_select(0, order)
        return super().forward(query, k.contiguous(), v.contiguous(), attention_mask, attn_mask_type,
                               attention_bias, packed_seq_params)
