"""Where a rank sits in the parallel layout, and the index arithmetic of conversion:
PP layer renumbering (global layer index <-> stage/virtual stage/local index) and EP expert
slicing (global expert index <-> expert-parallel rank/local index), plus the TP slice a rank holds
of a Hugging Face tensor. Pure integer arithmetic; no process groups.

megatron-core (0.16.1, uniform split, no first/last-stage adjustments) places layers as
  layers per virtual stage  c = L / (pp * vpp)
  global index of local layer i in model chunk v on stage p = v * (L / vpp) + p * c + i
(megatron/core/transformer/transformer_layer.py get_transformer_layer_offset), and experts as
  experts per EP rank  n = E / ep;   global expert = ep_rank * n + local expert.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

# How a tensor is split over tensor-parallel ranks, per megatron-core's parallel linear layers.
REPLICATED = "replicated"   # norms, router: every rank holds the full tensor
COLUMN = "column"           # ColumnParallelLinear: output features (dim 0) are split
ROW = "row"                 # RowParallelLinear: input features (dim 1) are split
VOCAB = "vocab"             # VocabParallelEmbedding / output layer: rows padded to Vp, then split
SHARD_DIM = {REPLICATED: None, COLUMN: 0, ROW: 1, VOCAB: 0}


@dataclass(frozen=True)
class ShardInfo:
    """A rank's coordinates. Expert weights are split over ``etp`` (expert tensor parallel) and
    ``ep``; everything else over ``tp`` and ``pp``. Defaults describe a single process."""
    tp_size: int = 1
    tp_rank: int = 0
    pp_size: int = 1
    pp_rank: int = 0
    vpp_size: Optional[int] = None
    ep_size: int = 1
    ep_rank: int = 0
    etp_size: int = 1
    etp_rank: int = 0

    def tp_for(self, expert: bool) -> tuple[int, int]:
        """(size, rank) of the tensor-parallel group that splits a weight."""
        return (self.etp_size, self.etp_rank) if expert else (self.tp_size, self.tp_rank)

    @property
    def num_chunks(self) -> int:
        return self.vpp_size or 1

    def validate(self, num_layers: int, num_experts: int = 0) -> None:
        stages = self.pp_size * self.num_chunks
        if num_layers % stages:
            raise ValueError(f"num_layers ({num_layers}) must be divisible by pp x vpp ({stages})")
        if num_experts and num_experts % self.ep_size:
            raise ValueError(f"num_experts ({num_experts}) must be divisible by ep ({self.ep_size})")


def layers_per_chunk(num_layers: int, pp_size: int, vpp_size: Optional[int] = None) -> int:
    stages = pp_size * (vpp_size or 1)
    if num_layers % stages:
        raise ValueError(f"num_layers ({num_layers}) must be divisible by pp x vpp ({stages})")
    return num_layers // stages


def layer_offset(num_layers: int, pp_size: int, pp_rank: int, vpp_size: Optional[int] = None,
                 vpp_rank: int = 0) -> int:
    """Global index of the first layer of model chunk ``vpp_rank`` on stage ``pp_rank``."""
    c = layers_per_chunk(num_layers, pp_size, vpp_size)
    return vpp_rank * (num_layers // (vpp_size or 1)) + pp_rank * c


def global_layer(local: int, num_layers: int, pp_size: int, pp_rank: int,
                 vpp_size: Optional[int] = None, vpp_rank: int = 0) -> int:
    c = layers_per_chunk(num_layers, pp_size, vpp_size)
    if not 0 <= local < c:
        raise ValueError(f"local layer {local} out of range [0, {c})")
    return layer_offset(num_layers, pp_size, pp_rank, vpp_size, vpp_rank) + local


def locate_layer(layer: int, num_layers: int, pp_size: int,
                 vpp_size: Optional[int] = None) -> tuple[int, int, int]:
    """Global layer -> (pp_rank, vpp_rank, local index): the inverse of ``global_layer``."""
    if not 0 <= layer < num_layers:
        raise ValueError(f"layer {layer} out of range [0, {num_layers})")
    c = layers_per_chunk(num_layers, pp_size, vpp_size)
    per_virtual = num_layers // (vpp_size or 1)
    vpp_rank, within = divmod(layer, per_virtual)
    pp_rank, local = divmod(within, c)
    return pp_rank, vpp_rank, local


def expert_range(num_experts: int, ep_size: int, ep_rank: int) -> range:
    """Global indices of the experts held by ``ep_rank``."""
    if num_experts % ep_size:
        raise ValueError(f"num_experts ({num_experts}) must be divisible by ep ({ep_size})")
    n = num_experts // ep_size
    return range(ep_rank * n, (ep_rank + 1) * n)


def locate_expert(expert: int, num_experts: int, ep_size: int) -> tuple[int, int]:
    """Global expert -> (ep_rank, local index)."""
    n = num_experts // ep_size
    return divmod(expert, n)


def shard_range(kind: str, full_len: int, size: int, rank: int,
                padded_len: Optional[int] = None) -> tuple[int, int]:
    """[start, stop) of a rank's slice along the shard dimension of a Hugging Face tensor.
    For VOCAB, ``padded_len`` is megatron's padded vocabulary; the slice is clipped to the real
    rows (the caller pads the rest with zeros) and may be empty."""
    if kind == VOCAB:
        total = padded_len if padded_len is not None else full_len
        if total % size:
            raise ValueError(f"padded vocabulary ({total}) is not divisible by tp ({size})")
        per = total // size
        return min(rank * per, full_len), min((rank + 1) * per, full_len)
    if full_len % size:
        raise ValueError(f"dimension of size {full_len} is not divisible by tensor parallel size {size}")
    per = full_len // size
    return rank * per, (rank + 1) * per
