"""End-to-end conversions between a Hugging Face folder and a megatron-core distributed checkpoint.

- ``import_hf_to_dist_checkpoint``: HF folder -> model chunks of this rank's layout (each rank
  reads only its slices) -> ``dist_checkpointing.save``. The checkpoint is layout-independent
  (megatron-core reshards on load). A ``mdn_convert.json`` beside it records the ModelConfig and
  the source folder so that an export needs no further arguments.
- ``export_dist_checkpoint_to_hf``: a distributed checkpoint saved in ANY layout -> model chunks of
  the current layout (a single process by default) -> ``megatron_to_hf`` -> safetensors shards,
  index, config.json, generation_config.json and the source's tokenizer files; then every expected
  tensor is verified to be in the written index.

State-dict layout on disk follows Megatron-LM: the model's sharded state dict under ``model``
(``model0``, ``model1``, ... with virtual pipeline chunks); tensors are matched by their sharded
keys, so the top-level key does not matter when loading in another layout.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from megatron_denoise.config.schema import ModelBuildConfig, ModelConfig, MoEConfig, RopeScalingConfig
from megatron_denoise.convert.errors import ConversionError, MissingTensorsError, UnexpectedTensorsError
from megatron_denoise.convert.hf_config import (check_same_model, generation_config_from,
                                                hf_config_from_model, model_config_from_hf, read_hf_config)
from megatron_denoise.convert.hf_io import INDEX, WriteSummary, copy_tokenizer_files, write_hf_shards, write_json
from megatron_denoise.convert.tables import NameTable

SIDECAR = "mdn_convert.json"


# ------------------------------------------------------------------------------------------------
# ModelConfig <-> json (the sidecar)

def model_config_to_dict(cfg: ModelConfig) -> dict:
    return dataclasses.asdict(cfg)


def model_config_from_dict(d: dict) -> ModelConfig:
    d = dict(d)
    rope = RopeScalingConfig(**d.pop("rope_scaling", {}) or {})
    moe = MoEConfig(**d.pop("moe", {}) or {})
    build = ModelBuildConfig(**d.pop("build", {}) or {})
    return ModelConfig(rope_scaling=rope, moe=moe, build=build, **d)


def read_sidecar(ckpt_dir: str) -> Optional[dict]:
    p = os.path.join(ckpt_dir, SIDECAR)
    if not os.path.isfile(p):
        return None
    with open(p) as fh:
        return json.load(fh)


# ------------------------------------------------------------------------------------------------
# process groups for a plain (non-torchrun) process

def single_process_groups(layout: Any = None) -> Any:
    """Initialise torch.distributed (gloo, world size 1) and megatron's groups for one process,
    unless already initialised. Returns ProcessGroups."""
    import torch.distributed as dist

    from megatron_denoise.layout import ParallelLayout
    from megatron_denoise.megatron import parallel_state

    store = None
    if not dist.is_initialized() and "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        store = parallel_state.host_store(1)
    world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    layout = layout or ParallelLayout(world_size=world)
    return parallel_state.initialize(layout, store=store)


def _state_dict_for(models: Sequence[Any], metadata: Optional[dict] = None, prefix: str = "") -> dict:
    from megatron_denoise.megatron.model import unwrap

    def one(m: Any) -> dict:
        return unwrap(m).sharded_state_dict(prefix=prefix, metadata=metadata)

    if len(models) == 1:
        return {"model": one(models[0])}
    return {f"model{i}": one(m) for i, m in enumerate(models)}


def refuse_existing(folder: str, overwrite: bool) -> None:
    """Raise unless ``folder`` is absent, empty, or may be replaced. Called on every rank before
    any collective, so that a refusal cannot leave other ranks waiting."""
    if os.path.exists(folder) and (not os.path.isdir(folder) or os.listdir(folder)) and not overwrite:
        raise FileExistsError(f"{folder} exists and is not empty; pass overwrite=True (--overwrite) to replace it")


def _prepare_out(folder: str, overwrite: bool) -> None:
    refuse_existing(folder, overwrite)
    if os.path.exists(folder) and (not os.path.isdir(folder) or os.listdir(folder)):
        shutil.rmtree(folder) if os.path.isdir(folder) else os.remove(folder)


# ------------------------------------------------------------------------------------------------
# HF -> megatron

@dataclass
class ImportSummary:
    folder: str
    tensors: int
    bytes_read: int
    model_config: ModelConfig


def build_and_load(hf_dir: str, groups: Any, cfg: Optional[ModelConfig] = None,
                   build_opts: Any = None, on_tensor=None) -> tuple[list, ModelConfig, Any]:
    """Model chunks of this rank filled from ``hf_dir``. ``cfg`` (a run's model config) must
    describe the same model as the folder's config.json."""
    from megatron_denoise.convert.megatron_io import load_hf_into_megatron, shard_info
    from megatron_denoise.megatron.model import build_model

    hf_cfg = model_config_from_hf(read_hf_config(hf_dir), hf_path=hf_dir, source=os.path.join(hf_dir, "config.json"))
    if cfg is not None:
        check_same_model(cfg, hf_cfg, "run config", os.path.join(hf_dir, "config.json"))
    else:
        cfg = hf_cfg
    models = build_model(cfg, groups, build_opts)
    report = load_hf_into_megatron(models, hf_dir, cfg, shard_info(groups), on_tensor=on_tensor)
    return models, cfg, report


def save_dist_checkpoint(models: Sequence[Any], ckpt_dir: str) -> None:
    from megatron.core import dist_checkpointing

    os.makedirs(ckpt_dir, exist_ok=True)
    dist_checkpointing.save(_state_dict_for(models), ckpt_dir)


def import_hf_to_dist_checkpoint(hf_dir: str, ckpt_dir: str, groups: Any, cfg: Optional[ModelConfig] = None,
                                 overwrite: bool = False, build_opts: Any = None,
                                 on_tensor=None) -> ImportSummary:
    """HF folder -> megatron-core distributed checkpoint, in the layout of ``groups``. Call on
    every rank."""
    import torch.distributed as dist

    refuse_existing(ckpt_dir, overwrite)
    dist.barrier()
    if groups.rank == 0:
        _prepare_out(ckpt_dir, overwrite)
    dist.barrier()
    models, cfg, report = build_and_load(hf_dir, groups, cfg, build_opts, on_tensor)
    save_dist_checkpoint(models, ckpt_dir)
    if groups.rank == 0:
        write_json(os.path.join(ckpt_dir, SIDECAR),
                   {"model": model_config_to_dict(cfg), "source_hf": os.path.abspath(hf_dir),
                    "layout": dataclasses.asdict(groups.layout) if dataclasses.is_dataclass(groups.layout) else None})
    dist.barrier()
    # totals over all ranks (each rank read only its slices)
    import torch

    from megatron_denoise import collectives as coll

    totals = torch.tensor([report.tensors, report.bytes_read], dtype=torch.int64)
    coll.all_reduce(totals)
    return ImportSummary(ckpt_dir, int(totals[0]), int(totals[1]), cfg)


def resolve_checkpoint(path: str) -> str:
    """The distributed-checkpoint folder behind ``path``: the folder itself (it has
    metadata.json), an actor checkpoint ``step_N/`` (its ``dist/``), or an actor checkpoint root
    (the step named in ``latest``)."""
    if os.path.isfile(os.path.join(path, "metadata.json")):
        return path
    if os.path.isfile(os.path.join(path, "dist", "metadata.json")):
        return os.path.join(path, "dist")
    latest = os.path.join(path, "latest")
    if os.path.isfile(latest):
        with open(latest) as fh:
            return resolve_checkpoint(os.path.join(path, fh.read().strip()))
    raise ConversionError(f"{path} is not a megatron-core distributed checkpoint (no metadata.json), an actor "
                          f"checkpoint (no dist/metadata.json) or a checkpoint root (no 'latest' file)")


def load_dist_checkpoint(ckpt_dir: str, groups: Any, cfg: ModelConfig, build_opts: Any = None) -> list:
    """Model chunks of the current layout filled from a distributed checkpoint of any layout.
    Checkpoints of DDP-wrapped chunks (the actor's: keys ``module.decoder...``) load too: the key
    prefix is detected from the checkpoint's metadata."""
    from megatron.core import dist_checkpointing

    from megatron_denoise.megatron.model import build_model, unwrap

    ckpt_dir = resolve_checkpoint(ckpt_dir)
    models = build_model(cfg, groups, build_opts)
    try:
        meta = dist_checkpointing.load_content_metadata(ckpt_dir)
    except Exception:  # older checkpoints carry no content metadata
        meta = None
    have = set(dist_checkpointing.load_tensors_metadata(ckpt_dir))
    prefix = _key_prefix(have)
    sharded = _state_dict_for(models, meta, prefix)
    _check_checkpoint_keys(ckpt_dir, sharded, have)
    loaded = dist_checkpointing.load(sharded, ckpt_dir)
    for i, m in enumerate(models):
        sd = loaded["model" if len(models) == 1 else f"model{i}"]
        sd = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in sd.items()}
        unwrap(m).load_state_dict(sd, strict=True)
    return models


def _key_prefix(keys: set) -> str:
    """The prefix of the model's tensors in a checkpoint ('' for a bare GPTModel, 'module.' per
    wrapper such as DDP)."""
    for p in ("", "module.", "module.module."):
        if p + "decoder.final_layernorm.weight" in keys or p + "embedding.word_embeddings.weight" in keys:
            return p
    return ""


def _check_checkpoint_keys(ckpt_dir: str, sharded: dict, have: set) -> None:
    """Tensors the model needs that the checkpoint lacks, by name (megatron-core would fail with a
    less readable message)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    need = {v.key for v in nested_values(sharded) if isinstance(v, ShardedTensor)}
    missing = sorted(need - have)
    if missing:
        raise MissingTensorsError(missing, f"distributed checkpoint {ckpt_dir}")


# ------------------------------------------------------------------------------------------------
# megatron -> HF

@dataclass
class ExportSummary(WriteSummary):
    config_files: tuple = ()
    tokenizer_files: tuple = ()


def write_hf_folder(named, out_dir: str, cfg: ModelConfig, source_hf: Optional[str] = None,
                    overwrite: bool = False, max_shard_bytes: int = 2 * 1024 ** 3, dtype: Any = None,
                    on_tensor: Optional[Callable[[str, int], None]] = None) -> ExportSummary:
    """Write (HF name, tensor) pairs plus configs and tokenizer into ``out_dir``; verify that every
    tensor of the name table was written and nothing else."""
    import torch

    _prepare_out(out_dir, overwrite)
    os.makedirs(out_dir, exist_ok=True)
    summary = write_hf_shards(named, out_dir, max_shard_bytes=max_shard_bytes, dtype=dtype, on_tensor=on_tensor)
    base = read_hf_config(source_hf) if source_hf and os.path.isfile(os.path.join(source_hf, "config.json")) else None
    dtype_name = summary.dtype or cfg.params_dtype  # what was written, for config.json
    hf_cfg = hf_config_from_model(cfg, base=base, dtype=dtype_name)
    write_json(os.path.join(out_dir, "config.json"), hf_cfg)
    gen_base = None
    if source_hf and os.path.isfile(os.path.join(source_hf, "generation_config.json")):
        with open(os.path.join(source_hf, "generation_config.json")) as fh:
            gen_base = json.load(fh)
    write_json(os.path.join(out_dir, "generation_config.json"), generation_config_from(hf_cfg, gen_base))
    tok = copy_tokenizer_files(source_hf, out_dir) if source_hf else []
    verify_hf_folder(out_dir, cfg)
    out = ExportSummary(**dataclasses.asdict(summary))
    out.config_files, out.tokenizer_files = ("config.json", "generation_config.json"), tuple(tok)
    return out


def verify_hf_folder(folder: str, cfg: ModelConfig) -> None:
    """The written index names exactly the table's tensors, each with its expected shape."""
    from megatron_denoise.convert.hf_io import HFReader
    from megatron_denoise.convert.megatron_io import check_hf_folder

    with open(os.path.join(folder, INDEX)) as fh:
        written = set(json.load(fh)["weight_map"])
    expected = set(NameTable(cfg).hf_names())
    if expected - written:
        raise MissingTensorsError(sorted(expected - written), f"the exported folder {folder}")
    if written - expected:
        raise UnexpectedTensorsError(sorted(written - expected), f"the exported folder {folder}")
    check_hf_folder(HFReader(folder), NameTable(cfg))


def export_dist_checkpoint_to_hf(ckpt_dir: str, out_dir: str, groups: Any, cfg: Optional[ModelConfig] = None,
                                 source_hf: Optional[str] = None, overwrite: bool = False,
                                 max_shard_bytes: int = 2 * 1024 ** 3, dtype: Any = None,
                                 on_tensor: Optional[Callable[[str, int], None]] = None,
                                 build_opts: Any = None) -> Optional[ExportSummary]:
    """Distributed checkpoint (any layout) -> HF folder. Call on every rank of ``groups``; rank 0
    writes and returns the summary (others return None)."""
    refuse_existing(out_dir, overwrite)
    ckpt_dir = resolve_checkpoint(ckpt_dir)
    side = read_sidecar(ckpt_dir) or {}
    if cfg is None:
        if "model" in side:
            cfg = model_config_from_dict(side["model"])
        elif source_hf:
            cfg = model_config_from_hf(read_hf_config(source_hf), hf_path=source_hf)
        else:
            raise ConversionError(f"{ckpt_dir} has no {SIDECAR}: pass the run config (--config) or the source "
                                  f"HF folder (--source-hf)")
    source_hf = source_hf or side.get("source_hf") or cfg.hf_path
    if source_hf and os.path.isfile(os.path.join(source_hf, "config.json")):
        check_same_model(cfg, model_config_from_hf(read_hf_config(source_hf)), "checkpoint model config",
                         os.path.join(source_hf, "config.json"))
    models = load_dist_checkpoint(ckpt_dir, groups, cfg, build_opts)
    return export_models_to_hf(models, cfg, groups, out_dir, source_hf, overwrite, max_shard_bytes, dtype, on_tensor)


def export_models_to_hf(models: Sequence[Any], cfg: ModelConfig, groups: Any, out_dir: str,
                        source_hf: Optional[str] = None, overwrite: bool = False,
                        max_shard_bytes: int = 2 * 1024 ** 3, dtype: Any = None,
                        on_tensor: Optional[Callable[[str, int], None]] = None) -> Optional[ExportSummary]:
    """In-memory model chunks (any layout) -> HF folder. Call on every rank; rank 0 writes and
    returns the summary, the others take part in the gathers and return None."""
    import torch.distributed as dist

    from megatron_denoise.convert.megatron_io import megatron_to_hf

    refuse_existing(out_dir, overwrite)
    if dist.is_initialized():
        dist.barrier()  # every rank has checked before rank 0 starts writing
    named = megatron_to_hf(models, cfg, groups)
    if groups is None or groups.rank == 0:
        summary = write_hf_folder(named, out_dir, cfg, source_hf, overwrite, max_shard_bytes, dtype, on_tensor)
    else:
        for _ in named:  # take part in the collectives
            pass
        summary = None
    if dist.is_initialized():
        dist.barrier()
    return summary
