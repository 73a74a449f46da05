"""Distributed checkpoints of the actor (megatron.core.dist_checkpointing), saved atomically.

Folder layout under the checkpoint root:

    step_00000010/            a complete checkpoint
        dist/                 megatron distributed checkpoint: model (+ optimizer) shards
        meta.json             step, layout, data cursor (opaque dict from the trainer), scheduler
        rng/rank_00000.pt     each rank's torch + tracker RNG states
    latest                    name of the newest complete checkpoint (written last, atomically)
    .tmp-step_00000010/       a save in progress (or one killed mid-way): ignored, removed by
                              the next save

A save writes everything into `.tmp-<name>/`, all ranks meet at a barrier, then rank 0 renames
the folder to `<name>/` and atomically replaces `latest` (write a temp file, fsync, os.replace).
A crash at any point before the rename leaves the previous checkpoint and `latest` untouched.

Model weights reshard: the shards carry global keys and offsets, so a checkpoint saved with one
TP/PP/VPP layout loads into another (optimizer state and RNG are restored only when the layout
is the same; the data-parallel-reshardable optimizer format also allows another DP size).
Scripts that save need an `if __name__ == "__main__":` guard and psutil installed (the writer).
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

LATEST = "latest"
# on-disk formats of the optimizer state that load at any layout ("model_space": a regular, not
# distributed, optimizer keeps per-parameter state next to the model's sharded tensors)
_RESHARDABLE = ("fully_reshardable", "model_space")


def _optimizer_format(actor: Any) -> str:
    """checkpoint.optimizer_format for the distributed optimizer, else "model_space"."""
    if not actor.cfg.parallel.use_distributed_optimizer:
        return "model_space"
    return actor.cfg.checkpoint.optimizer_format


def _opt_metadata(fmt: str) -> dict:
    """The distributed optimizer's sharded_state_dict metadata; a regular optimizer needs none."""
    if fmt == "model_space":
        return {}
    meta = {"distrib_optim_sharding_type": fmt}
    if fmt == "fully_reshardable":
        # gather each model-parallel shard's optimizer state on its DP rank 0 only (over the gloo
        # DP group), not on every DP rank: the state of a whole shard is large
        meta["distrib_optim_fully_reshardable_mem_efficient"] = True
    return meta


def _layout_dict(layout: Any) -> dict:
    keys = ("world_size", "tp", "pp", "vpp", "cp", "ep", "etp", "sequence_parallel")
    return {k: getattr(layout, k, None) for k in keys}


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def _model_sharded_state_dict(actor: Any) -> dict:
    """The model chunks' sharded state (bare GPTModels, as megatron-LM saves them: keys such as
    `decoder.layers.self_attention.linear_qkv.weight`, layer index as a sharded axis)."""
    chunks = actor.chunks
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict()}
    return {f"model{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _write_latest(root: Path, name: str) -> None:
    tmp = root / f".{LATEST}.tmp"
    with open(tmp, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / LATEST)
    _fsync_dir(root)


def _publish(root: Path, tmp: Path, final: Path) -> None:
    """The commit point of a save (rank 0 only): rename the finished folder, then `latest`."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    _write_latest(root, final.name)


def save_checkpoint(actor: Any, root: str | os.PathLike, *, step: Optional[int] = None,
                    data_cursor: Optional[dict] = None, save_optimizer: bool = True,
                    keep_last: Optional[int] = None) -> Path:
    """Save the actor's model, optimizer, scheduler, RNG states, step and `data_cursor`
    (a JSON-serialisable dict) atomically; every rank calls it. Returns the final folder.
    A write that fails (a full disk: OSError) removes the half-written folder and raises an
    OSError naming it and the checkpoint that stays the latest."""
    from megatron_denoise.megatron import parallel_state as ps

    root = Path(root)
    step = actor.step if step is None else step
    name = checkpoint_name(step)
    tmp, final = root / f".tmp-{name}", root / name
    rank = dist.get_rank()
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-*"):  # leftovers of a killed save
            shutil.rmtree(stale, ignore_errors=True)
        (tmp / "dist").mkdir(parents=True)
        (tmp / "rng").mkdir()
    dist.barrier()

    state = _model_sharded_state_dict(actor)
    fmt = _optimizer_format(actor)
    if save_optimizer:
        state["optimizer"] = actor.optimizer.sharded_state_dict(state, metadata=_opt_metadata(fmt))
    try:
        _write_dist(state, tmp / "dist")
    except OSError as e:  # disk full, quota, I/O error: nothing is published, the last checkpoint stays
        raise _save_failed(root, tmp, step, e) from e
    from megatron_denoise import chaos

    chaos.point("save")  # chaos harness: the shards are written, nothing is published yet
    torch.save({"torch": torch.get_rng_state(), "tracker": ps.get_rng_tracker_states()},
               tmp / "rng" / f"rank_{rank:05d}.pt")
    if rank == 0:
        meta = {
            "step": step,
            "layout": _layout_dict(actor.groups.layout),
            "data_cursor": data_cursor or {},
            "scheduler": actor.scheduler.state_dict(),
            "skipped_steps": actor.skipped_steps,
            "has_optimizer": save_optimizer,
            "optimizer_format": fmt,
        }
        with open(tmp / "meta.json", "w") as f:
            json.dump(meta, f, indent=1, default=_json_default)
    dist.barrier()
    if rank == 0:
        _publish(root, tmp, final)
        if keep_last:
            done = sorted(p for p in root.glob("step_*") if p.is_dir())
            for old in done[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def _write_dist(state: dict, path: Path) -> None:
    """The shard writer (megatron's distributed checkpointing; tests replace it to simulate a full disk)."""
    from megatron.core import dist_checkpointing

    dist_checkpointing.save(state, str(path), content_metadata=None)


def _save_failed(root: Path, tmp: Path, step: int, e: OSError) -> OSError:
    """The error of a save that could not be written: the half-written folder is removed (rank 0)
    and the message names the folder, the cause and the checkpoint that is still the latest."""
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    try:
        kept = latest_checkpoint(root)
    except (FileNotFoundError, CheckpointError):
        kept = None
    keep = f"{kept} is still the latest checkpoint" if kept is not None else "no earlier checkpoint exists"
    return OSError(e.errno, f"saving the checkpoint of step {step} into {tmp} failed: "
                            f"{e.strerror or e} (errno {e.errno}); nothing was published: {keep}")


def _json_default(x: Any) -> Any:
    if is_dataclass(x):
        return asdict(x)
    if torch.is_tensor(x):
        return x.tolist()
    raise TypeError(f"checkpoint meta: {type(x).__name__} is not JSON serialisable")


def latest_checkpoint(root: str | os.PathLike) -> Optional[Path]:
    """The newest complete checkpoint under `root` (via `latest`), or None."""
    root = Path(root)
    marker = root / LATEST
    if not marker.exists():
        return None
    name = marker.read_text().strip()
    path = root / name
    if not (path / "meta.json").exists():
        found = complete_checkpoints(root)
        hint = (f"; complete checkpoints here: {', '.join(p.name for p in found)} (resume one with "
                f"checkpoint.resume={found[-1]})" if found else "; there is no complete checkpoint here")
        raise FileNotFoundError(f"{marker} names {name!r}, but {path / 'meta.json'} does not exist{hint}")
    return path


def complete_checkpoints(root: str | os.PathLike) -> list[Path]:
    """The checkpoint folders under `root` that hold a meta.json, oldest first."""
    return sorted(p for p in Path(root).glob("step_*") if (p / "meta.json").is_file())


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded; the message names the file."""


def check_checkpoint(path: str | os.PathLike) -> dict:
    """Read a checkpoint's meta.json and its shard index (dist/.metadata) and check that every shard
    file the index names exists and is as long as the index says (a truncated copy or a disk that
    filled up); returns the meta dict. Reads no tensor data."""
    path = Path(path)
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path / 'meta.json'}: unreadable ({e})") from None
    dist_dir = path / "dist"
    try:
        from torch.distributed.checkpoint import FileSystemReader

        md = FileSystemReader(str(dist_dir)).read_metadata()
    except Exception as e:  # noqa: BLE001 - a missing or cut index, whatever torch raises for it
        raise CheckpointError(f"{dist_dir / '.metadata'}: the shard index is missing or unreadable "
                              f"({type(e).__name__}: {e})") from None
    need: dict[str, int] = {}
    for info in md.storage_data.values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), int(info.offset) + int(info.length))
    for name, end in sorted(need.items()):
        f = dist_dir / name
        if not f.is_file():
            raise CheckpointError(f"{f}: shard missing (named by {dist_dir / '.metadata'})")
        size = f.stat().st_size
        if size < end:
            raise CheckpointError(f"{f} is truncated: {size} bytes, the shard index needs {end}")
    return meta


def resolve_resume(resume: str, ckpt_dir: str | os.PathLike) -> Optional[Path]:
    """What `checkpoint.resume` names: None for "none" (or "auto" with nothing saved yet), the
    newest complete checkpoint under `ckpt_dir` for "auto", else the given checkpoint folder."""
    if resume == "none":
        return None
    if resume == "auto":
        p = latest_checkpoint(ckpt_dir) if Path(ckpt_dir).exists() else None
    else:
        p = Path(os.path.expanduser(resume)).resolve()
        if not (p / "meta.json").is_file():
            raise FileNotFoundError(f"checkpoint.resume: {p} is not a complete checkpoint (no meta.json)")
    if p is not None:
        try:
            check_checkpoint(p)
        except CheckpointError as e:
            older = [c for c in complete_checkpoints(p.parent) if c.name < p.name]
            hint = f"; an older checkpoint: checkpoint.resume={older[-1]}" if older else ""
            raise CheckpointError(f"checkpoint.resume={resume}: {e}{hint}") from None
    return p


def optimizer_resume_plan(meta: dict, layout: dict, optimizer_format: str) -> tuple[bool, Optional[str]]:
    """(load the optimizer state?, why not, or None) for a checkpoint's meta at this run's layout
    (a _layout_dict) and optimizer format. Optimizer state loads at the layout it was saved at, or
    at any layout when saved in a reshardable format; otherwise the weights resume and the Adam
    moments and LR schedule start fresh, and the reason names both layouts and the setting."""
    if not meta.get("has_optimizer", False):
        return False, None
    saved_fmt = meta.get("optimizer_format", "dp_reshardable")
    same_kind = (saved_fmt == "model_space") == (optimizer_format == "model_space")
    if same_kind and (meta["layout"] == layout or saved_fmt in _RESHARDABLE):
        return True, None
    if not same_kind:
        why = (f"it was saved by a {'regular' if saved_fmt == 'model_space' else 'distributed'} optimizer and this "
               f"run uses a {'regular' if optimizer_format == 'model_space' else 'distributed'} one "
               f"(parallel.use_distributed_optimizer)")
    else:
        changed = {k: (v, layout.get(k)) for k, v in meta["layout"].items() if layout.get(k) != v}
        why = (f"it was saved as {saved_fmt} at layout {meta['layout']} and this run's layout differs in "
               f"{', '.join(f'{k} {a} -> {b}' for k, (a, b) in changed.items())}; {saved_fmt} loads only at the "
               f"layout it was saved at (save with checkpoint.optimizer_format=fully_reshardable to resume "
               f"at any layout)")
    return False, f"optimizer and LR-scheduler state start fresh: {why}; the weights are resumed"


def load_checkpoint(actor: Any, path: str | os.PathLike, *, load_optimizer: Optional[bool] = None,
                    load_rng: Optional[bool] = None) -> dict:
    """Load a checkpoint folder (or a root holding `latest`) into `actor`.

    Model weights always load (resharded to the actor's layout). Optimizer and scheduler load by
    default when the optimizer state can be read at this layout: the same layout, or a
    reshardable format (checkpoint.optimizer_format=fully_reshardable, or a regular optimizer);
    otherwise rank 0 says why they start fresh. RNG states load only at the same layout. Returns
    the meta dict (step, data_cursor, layout, ..., optimizer_loaded); sets actor.step.
    """
    from megatron.core import dist_checkpointing

    from megatron_denoise.megatron import parallel_state as ps

    path = Path(path)
    if not (path / "meta.json").exists():
        found = latest_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"{path} is neither a checkpoint folder nor a root with a '{LATEST}' marker")
        path = found
    meta = check_checkpoint(path)
    layout = _layout_dict(actor.groups.layout)
    same_layout = meta["layout"] == layout
    saved_fmt = meta.get("optimizer_format", "dp_reshardable")
    if load_optimizer is None:
        load_optimizer, why = optimizer_resume_plan(meta, layout, _optimizer_format(actor))
        if why is not None:
            meta["optimizer_note"] = f"{path}: {why}"
            if dist.get_rank() == 0:
                print(f"[megatron-denoise] {meta['optimizer_note']}", flush=True)
    if load_rng is None:
        load_rng = same_layout

    state = _model_sharded_state_dict(actor)
    if load_optimizer:
        # the optimizer's sharded state refers to the model's sharded tensors: build it from the
        # same dict, then load both in one pass
        state["optimizer"] = actor.optimizer.sharded_state_dict(state, is_loading=True,
                                                                metadata=_opt_metadata(saved_fmt))
    loaded = dist_checkpointing.load(state, str(path / "dist"), strict="assume_ok_unexpected")
    # dist_checkpointing already loaded into the parameters in place; load_state_dict (strict)
    # also checks that every key of the chunk was found
    if len(actor.chunks) == 1:
        actor.chunks[0].load_state_dict(loaded["model"], strict=True)
    else:
        for i, c in enumerate(actor.chunks):
            c.load_state_dict(loaded[f"model{i}"], strict=True)
    if load_optimizer:
        actor.optimizer.load_state_dict(loaded["optimizer"])
        actor.scheduler.load_state_dict(meta["scheduler"])
    if load_rng:
        rng = torch.load(path / "rng" / f"rank_{dist.get_rank():05d}.pt", weights_only=False)
        torch.set_rng_state(rng["torch"])
        ps.set_rng_tracker_states(rng["tracker"])
    actor.step = int(meta["step"])
    actor.skipped_steps = int(meta.get("skipped_steps", 0))
    meta["optimizer_loaded"] = bool(load_optimizer)
    dist.barrier()
    return meta
