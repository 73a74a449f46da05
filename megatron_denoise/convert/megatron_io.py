"""megatron-core model <-> Hugging Face tensors, on any TP/PP(+VPP)/EP/ETP layout.

- ``canonical_name`` maps a parameter name of a model chunk on this rank to the table's canonical
  megatron name (global layer and expert indices, local-spec spelling).
- ``load_hf_into_megatron`` fills this rank's model chunks from a Hugging Face folder, reading
  only the slices this rank holds (safetensors ``get_slice``), after checking the folder against
  the name table: missing/extra tensors and shape mismatches are errors naming the tensors.
- ``megatron_to_hf`` yields (HF name, full tensor) for every tensor of the table, gathered over
  TP (all_gather), EP and PP (broadcast from the owner). Every rank of the job must iterate it
  together (collectives are matched by order). The rollout engine's refit and the HF export use it.

Process groups are passed in (``ProcessGroups`` from megatron_denoise.megatron.parallel_state or
any object with ``tp``, ``pp``, ``ep``, ``expt_tp`` groups); none are fetched from globals.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence

import torch

from megatron_denoise.config.schema import ModelConfig
from megatron_denoise.convert.errors import (ConversionError, MissingTensorsError, ShapeMismatchError,
                                             UnexpectedTensorsError)
from megatron_denoise.convert.hf_io import HFReader
from megatron_denoise.convert.sharding import (SHARD_DIM, VOCAB, ShardInfo, expert_range, global_layer,
                                               locate_expert, locate_layer, shard_range)
from megatron_denoise.convert.tables import Entry, NameTable
from megatron_denoise.convert.transforms import TRANSFORMS, Dims, pad_vocab, unpad_vocab

# Transformer Engine spec spellings -> local spec spellings (layer-relative).
_TE_ALIASES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_LOCAL_EXPERT = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(.+)$")
_GROUPED_EXPERT = re.compile(r"^mlp\.experts\.(linear_fc[12])\.weight(\d+)$")  # TEGroupedMLP
# Tensors of a HF folder that are not weights of the model (recomputed buffers).
_IGNORED_HF = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


def shard_info(groups: Any = None, vpp: Optional[int] = None) -> ShardInfo:
    """This rank's ShardInfo from a ProcessGroups value (None: a single process)."""
    if groups is None:
        return ShardInfo()
    import torch.distributed as dist

    lay = groups.layout
    etp = getattr(lay, "etp", None) or lay.tp
    etp_rank = dist.get_rank(groups.expt_tp) if etp > 1 and groups.expt_tp is not None else 0
    v = vpp if vpp is not None else getattr(lay, "vpp", None)
    return ShardInfo(tp_size=lay.tp, tp_rank=groups.tp_rank, pp_size=lay.pp, pp_rank=groups.pp_rank,
                     vpp_size=v if v and v > 1 else None, ep_size=getattr(lay, "ep", 1) or 1,
                     ep_rank=groups.ep_rank, etp_size=etp, etp_rank=etp_rank)


def _unwrap(m: Any) -> Any:
    while hasattr(m, "module"):
        m = m.module
    return m


def _chunk_index(chunk: Any, i: int) -> int:
    v = getattr(chunk, "vp_stage", None)
    return i if v is None else v


def canonical_name(name: str, cfg: ModelConfig, shard: ShardInfo, vpp_rank: int = 0,
                   layer_module: Any = None) -> str:
    """Parameter name on this rank -> canonical megatron name (global layer/expert indices).

    PP/VPP: local layer i of chunk ``vpp_rank`` -> sharding.global_layer; cross-checked against
    the layer's own ``layer_number`` (1-based, global) when the module is given.
    EP: local expert j -> expert_range(E, ep, ep_rank)[j].
    """
    m = _LAYER.match(name)
    if not m:
        return name
    local, rest = int(m.group(1)), m.group(2)
    g = global_layer(local, cfg.num_layers, shard.pp_size, shard.pp_rank, shard.vpp_size, vpp_rank)
    if layer_module is not None and getattr(layer_module, "layer_number", g + 1) != g + 1:
        raise ConversionError(
            f"{name}: the layer reports global number {layer_module.layer_number - 1}, the layout "
            f"(pp={shard.pp_size}, pp_rank={shard.pp_rank}, vpp={shard.vpp_size}, chunk={vpp_rank}) gives {g}")
    rest = _TE_ALIASES.get(rest, rest)
    experts = expert_range(cfg.moe.num_experts, shard.ep_size, shard.ep_rank) if cfg.moe.num_experts else None
    me = _LOCAL_EXPERT.match(rest)
    if me:
        rest = f"mlp.experts.local_experts.{experts[int(me.group(1))]}.{me.group(2)}"
    mg = _GROUPED_EXPERT.match(rest)
    if mg:
        rest = f"mlp.experts.local_experts.{experts[int(mg.group(2))]}.{mg.group(1)}.weight"
    return f"decoder.layers.{g}.{rest}"


def local_parameters(models: Sequence[Any], cfg: ModelConfig, shard: ShardInfo) -> dict[str, torch.Tensor]:
    """canonical name -> parameter tensor, over this rank's model chunks.

    With tied embeddings and pp > 1, the last stage holds its own copy of the embedding as
    ``output_layer.weight``; it maps to the embedding entry (``embedding.word_embeddings.weight``)
    under the key ``output_layer.weight`` and is filled with the same data on import."""
    out: dict[str, torch.Tensor] = {}
    for i, chunk in enumerate(models):
        chunk = _unwrap(chunk)
        v = _chunk_index(chunk, i)
        layers = chunk.decoder.layers if hasattr(chunk, "decoder") else []
        for name, p in chunk.named_parameters():
            m = _LAYER.match(name)
            mod = layers[int(m.group(1))] if m else None
            canon = canonical_name(name, cfg, shard, v, mod)
            if canon in out:
                raise ConversionError(f"parameter {canon} appears twice on this rank")
            out[canon] = p
    return out


def _entry_for(canon: str, table: NameTable) -> Optional[Entry]:
    if canon in table.by_mcore:
        return table.by_mcore[canon]
    if canon == "output_layer.weight" and table.cfg.tie_word_embeddings:
        return table.by_mcore["embedding.word_embeddings.weight"]
    return None


def _local_dims(cfg: ModelConfig, size: int) -> Dims:
    return Dims(cfg.num_attention_heads // size, cfg.num_query_groups // size, cfg.head_dim)


@dataclass
class LoadReport:
    tensors: int = 0          # megatron parameters filled on this rank
    bytes_read: int = 0       # bytes of HF tensor slices read on this rank
    names: list[str] = field(default_factory=list)


def check_hf_folder(reader: HFReader, table: NameTable) -> None:
    """Every tensor the table expects is present with its expected shape, and nothing else."""
    have = {n for n in reader.names() if not _IGNORED_HF.search(n)}
    expected = set(table.hf_names())
    if table.cfg.tie_word_embeddings:
        have.discard("lm_head.weight")  # some tied checkpoints store the shared matrix twice
    missing, extra = expected - have, have - expected
    if missing:
        raise MissingTensorsError(sorted(missing), f"Hugging Face folder {reader.folder}")
    if extra:
        raise UnexpectedTensorsError(sorted(extra), f"Hugging Face folder {reader.folder}")
    for name in table.hf_names():
        got, want = reader.shape(name), table.hf_shape(name)
        if got != want:
            raise ShapeMismatchError(name, want, got, f"{reader.folder} vs its config.json")


def load_hf_into_megatron(models: Sequence[Any], hf: "str | HFReader", cfg: ModelConfig,
                          shard: Optional[ShardInfo] = None, on_tensor=None) -> LoadReport:
    """Fill this rank's model chunks from a Hugging Face folder; only this rank's slices are read.
    ``on_tensor(name, nbytes)`` is called after each parameter (progress bars).

    Into a live actor: load before building the optimizer, or call the megatron optimizer's
    ``reload_model_params()`` afterwards — with bf16/fp16 parameters its fp32 main copies are
    separate tensors (with fp32 parameters they are views and follow automatically)."""
    shard = shard or ShardInfo()
    reader = hf if isinstance(hf, HFReader) else HFReader(hf)
    table = NameTable(cfg)
    check_hf_folder(reader, table)
    params = local_parameters(models, cfg, shard)
    unknown = [n for n in params if _entry_for(n, table) is None]
    if unknown:
        raise UnexpectedTensorsError(unknown, "the megatron model (parameters without a table entry: "
                                              "does the model config match the checkpoint?)")
    expected = {e.mcore for e in table.entries if _owner(e, cfg, shard) == _here(e, shard)}
    missing = expected - set(params)
    if missing:
        raise MissingTensorsError(sorted(missing), f"the megatron model on pp_rank {shard.pp_rank}, "
                                                   f"ep_rank {shard.ep_rank} (the table expects them there)")
    report = LoadReport()
    with torch.no_grad():
        for canon, p in params.items():
            e = _entry_for(canon, table)
            value, nbytes = _read_local(reader, e, p, cfg, shard)
            if tuple(value.shape) != tuple(p.shape):
                raise ShapeMismatchError(canon, p.shape, value.shape,
                                         f"megatron parameter vs converted {', '.join(e.hf)}")
            p.copy_(value.to(p.dtype))
            report.tensors += 1
            report.bytes_read += nbytes
            report.names.append(canon)
            if on_tensor is not None:
                on_tensor(canon, nbytes)
    return report


def _read_local(reader: HFReader, e: Entry, p: torch.Tensor, cfg: ModelConfig,
                shard: ShardInfo) -> tuple[torch.Tensor, int]:
    """The value of parameter ``p`` (this rank's shard of entry ``e``) from the HF folder."""
    size, rank = shard.tp_for(e.expert is not None)
    kind = e.rule.shard
    dim = SHARD_DIM[kind] if size > 1 or kind == VOCAB else None
    pieces, nbytes = [], 0
    for name, full in zip(e.hf, e.hf_shapes):
        if dim is None:
            t = reader.get(name)
        else:
            padded = p.shape[0] * size if kind == VOCAB else None
            start, stop = shard_range(kind, full[dim], size, rank, padded)
            t = reader.get_range(name, dim, start, stop)
            if kind == VOCAB:
                t = pad_vocab(t, p.shape[0])  # rows past the real vocabulary are zero
        nbytes += t.numel() * t.element_size()
        pieces.append(t)
    return TRANSFORMS[e.rule.transform].forward(pieces, _local_dims(cfg, size)), nbytes


# ------------------------------------------------------------------------------------------------
# megatron -> HF (gathered)

def _owner(e: Entry, cfg: ModelConfig, shard: ShardInfo) -> tuple[int, int]:
    """(pp_rank, ep_rank) owning entry ``e`` (ep_rank 0 for non-expert tensors, which every EP
    rank holds)."""
    if e.layer is not None:
        pp_rank, _, _ = locate_layer(e.layer, cfg.num_layers, shard.pp_size, shard.vpp_size)
    elif e.mcore.startswith("embedding."):
        pp_rank = 0
    else:  # final norm, output layer
        pp_rank = shard.pp_size - 1
    ep_rank = locate_expert(e.expert, cfg.moe.num_experts, shard.ep_size)[0] if e.expert is not None else 0
    return pp_rank, ep_rank


def _here(e: Entry, shard: ShardInfo) -> tuple[int, int]:
    """This rank's (pp_rank, ep_rank) in the terms of ``_owner``."""
    return shard.pp_rank, (shard.ep_rank if e.expert is not None else 0)


def _gather_tp(pieces: list[torch.Tensor], dim: Optional[int], size: int, group: Any) -> list[torch.Tensor]:
    if size == 1 or dim is None:
        return pieces
    from megatron_denoise import collectives as coll

    out = []
    for t in pieces:
        t = t.contiguous()
        parts = [torch.empty_like(t) for _ in range(size)]
        coll.all_gather(parts, t, group=group)
        out.append(torch.cat(parts, dim=dim))
    return out


def _broadcast(t: Optional[torch.Tensor], shape: tuple, dtype: torch.dtype, device: torch.device,
               src_group_rank: int, group: Any) -> torch.Tensor:
    from megatron_denoise import collectives as coll

    if t is None:
        t = torch.empty(shape, dtype=dtype, device=device)
    else:
        t = t.contiguous()
    coll.broadcast(t, group=group, group_src=src_group_rank)
    return t


def megatron_to_hf(models: Sequence[Any], cfg: ModelConfig, groups: Any = None,
                   shard: Optional[ShardInfo] = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, full tensor) for every tensor of the family's table, in table order, on
    every rank. Bit-exact inverse of ``load_hf_into_megatron`` (slicing and concatenation only).
    ``groups`` may be None for a single process."""
    shard = shard or shard_info(groups)
    table = NameTable(cfg)
    params = local_parameters(models, cfg, shard)
    unknown = [n for n in params if _entry_for(n, table) is None]
    if unknown:
        raise UnexpectedTensorsError(unknown, "the megatron model (parameters without a table entry)")
    ref = next(iter(params.values()))
    dtype, device = ref.dtype, ref.device
    for e in table.entries:
        own_pp, own_ep = _owner(e, cfg, shard)
        on_stage = own_pp == shard.pp_rank
        expert = e.expert is not None
        pieces: Optional[list[torch.Tensor]] = None
        if on_stage and (not expert or own_ep == shard.ep_rank):
            p = params.get(e.mcore)
            if p is None:
                raise MissingTensorsError([e.mcore], f"the megatron model on pp_rank {shard.pp_rank}, "
                                                     f"ep_rank {shard.ep_rank}")
            size, _ = shard.tp_for(expert)
            local = TRANSFORMS[e.rule.transform].inverse(p.detach(), _local_dims(cfg, size))
            group = (groups.expt_tp if expert else groups.tp) if groups is not None else None
            pieces = _gather_tp(local, SHARD_DIM[e.rule.shard], size, group)
            if e.rule.shard == VOCAB:
                pieces = [unpad_vocab(t, cfg.vocab_size) for t in pieces]
        if expert and shard.ep_size > 1 and on_stage:
            pieces = [_broadcast(pieces[i] if pieces else None, e.hf_shapes[i], dtype, device, own_ep, groups.ep)
                      for i in range(len(e.hf))]
        if shard.pp_size > 1:
            pieces = [_broadcast(pieces[i] if pieces else None, e.hf_shapes[i], dtype, device, own_pp, groups.pp)
                      for i in range(len(e.hf))]
        for name, t, want in zip(e.hf, pieces, e.hf_shapes):
            if tuple(t.shape) != tuple(want):
                raise ShapeMismatchError(name, want, t.shape, f"gathered from {e.mcore}")
            yield name, t


def load_hf_into_actor(actor: Any, hf_dir: str) -> LoadReport:
    """Start a MegatronActor (``.model`` chunks, ``.cfg.model``, ``.groups``, ``.optimizer``) from a
    Hugging Face folder: the run's model config must describe the folder's model; then the
    optimizer's main parameters are refreshed from the loaded weights. Call on every rank."""
    import os

    from megatron_denoise.convert.hf_config import check_same_model, model_config_from_hf, read_hf_config

    check_same_model(actor.cfg.model, model_config_from_hf(read_hf_config(hf_dir)), "run config (model)",
                     os.path.join(hf_dir, "config.json"))
    report = load_hf_into_megatron(actor.model, hf_dir, actor.cfg.model, shard_info(actor.groups))
    if getattr(actor, "optimizer", None) is not None:
        actor.optimizer.reload_model_params()
    return report


def actor_hf_weights(actor: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """The actor's current weights as (HF name, full tensor), gathered over TP/PP/EP: what the
    rollout engine's refit pushes. Every rank of the actor must iterate it (collectives)."""
    return megatron_to_hf(actor.model, actor.cfg.model, actor.groups)


def to_transformers_module_state(named: "dict[str, torch.Tensor]", cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """HF on-disk names (per-expert tensors) -> transformers >= 5 in-memory module names, where
    the experts of a layer are stacked: experts.gate_up_proj [E, 2*MF, H] (gate first) and
    experts.down_proj [E, H, MF]. Dense families are unchanged. Used to refit a transformers
    model in place and to compare with ``model.state_dict()``."""
    from megatron_denoise.convert.transforms import fuse_gate_up, stack_experts

    out = dict(named)
    for layer in range(cfg.num_layers) if cfg.moe.num_experts else []:
        pre = f"model.layers.{layer}.mlp.experts."
        ex = range(cfg.moe.num_experts)
        out[pre + "gate_up_proj"] = stack_experts(
            [fuse_gate_up(out.pop(f"{pre}{j}.gate_proj.weight"), out.pop(f"{pre}{j}.up_proj.weight")) for j in ex])
        out[pre + "down_proj"] = stack_experts([out.pop(f"{pre}{j}.down_proj.weight") for j in ex])
    return out
