"""Convert checkpoints between Hugging Face folders and megatron-core distributed checkpoints.

    # HF folder -> megatron-core distributed checkpoint (layout-independent on disk)
    python launch/convert_checkpoint.py --from-hf --hf PATH/TO/HF --checkpoint OUT/ckpt
    # distributed checkpoint (saved in any layout) -> HF folder (safetensors + index, configs, tokenizer)
    python launch/convert_checkpoint.py --to-hf --checkpoint OUT/ckpt --hf OUT/hf [--source-hf PATH/TO/HF]

Both directions run in one process by default; under torchrun they use the layout given by
--tp/--pp/--vpp/--ep (each rank then reads only its slice of the HF tensors). The destination must
not exist (or be empty) unless --overwrite. The export verifies that every tensor of the model's
name table was written; both print a summary of tensors and bytes. Entry point: `mdn-convert`.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Optional, Sequence


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mdn-convert", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    d = p.add_mutually_exclusive_group(required=True)
    d.add_argument("--from-hf", action="store_true", help="HF folder (--hf) -> distributed checkpoint (--checkpoint)")
    d.add_argument("--to-hf", action="store_true", help="distributed checkpoint (--checkpoint) -> HF folder (--hf)")
    p.add_argument("--hf", required=True, help="HF folder: the source with --from-hf, the destination with --to-hf")
    p.add_argument("--checkpoint", required=True, help="megatron-core distributed checkpoint folder")
    p.add_argument("--source-hf", default=None,
                   help="--to-hf: HF folder to take config fields and tokenizer files from "
                        "(default: the one recorded at import)")
    p.add_argument("--config", default=None,
                   help="the run's YAML config: with --to-hf its model section describes the checkpoint (actor "
                        "checkpoints written by training); with --from-hf it must describe the same model as "
                        "the HF folder's config.json")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty destination folder")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="--to-hf: dtype of the written tensors (default: as in the model, float32 on CPU)")
    p.add_argument("--max-shard-size", default="2GB", help="--to-hf: largest safetensors file, e.g. 500MB, 2GB")
    p.add_argument("--tp", type=int, default=1, help="tensor parallel size under torchrun")
    p.add_argument("--pp", type=int, default=1, help="pipeline parallel size under torchrun")
    p.add_argument("--vpp", type=int, default=None, help="virtual pipeline stages per rank")
    p.add_argument("--ep", type=int, default=1, help="expert parallel size under torchrun")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _bytes(text: str) -> int:
    units = {"KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "TB": 1 << 40, "B": 1}
    t = text.strip().upper()
    for u, m in units.items():
        if t.endswith(u):
            return int(float(t[: -len(u)]) * m)
    return int(t)


def _human(n: float) -> str:
    for u in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or u == "TB":
            return f"{n:.1f} {u}" if u != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


class _Progress:
    """tqdm bar over tensors (rank 0 only), fed by the converters' on_tensor callbacks."""

    def __init__(self, total: Optional[int], desc: str, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="tensor", file=sys.stderr)
        self.bytes = 0

    def __call__(self, name: str, nbytes: int) -> None:
        self.bytes += nbytes
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(_human(self.bytes))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; bad input (unknown architecture, mismatching configs, missing/extra tensors,
    shape mismatches, an existing destination) ends with one clear message and exit code 2."""
    args = _parser().parse_args(argv)
    from megatron_denoise.convert.errors import ConversionError

    try:
        return _run(args)
    except (ConversionError, FileExistsError, FileNotFoundError) as e:
        print(f"mdn-convert: error: {e}", file=sys.stderr)
        return 2


def _check_layout(args: argparse.Namespace, world: int, model) -> None:
    """The requested layout against the world size and the model (heads and KV heads vs --tp,
    layers vs --pp x --vpp, experts vs --ep), every problem at once, before any process group."""
    from megatron_denoise.config.schema import ParallelConfig
    from megatron_denoise.convert.errors import ConversionError
    from megatron_denoise.layout import check_layout

    par = ParallelConfig(tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp,
                         virtual_pipeline_model_parallel_size=args.vpp, expert_model_parallel_size=args.ep,
                         expert_tensor_parallel_size=args.tp, sequence_parallel=args.tp > 1)
    errors = check_layout(par, world, model)
    if errors:
        raise ConversionError(f"--tp {args.tp} --pp {args.pp} --vpp {args.vpp} --ep {args.ep} on {world} "
                              f"process(es) does not fit this model:\n  - " + "\n  - ".join(errors))


def _run(args: argparse.Namespace) -> int:
    import torch

    from megatron_denoise.convert.errors import ConversionError
    from megatron_denoise.convert.hf_config import model_config_from_hf, read_hf_config
    from megatron_denoise.convert.pipeline import (export_dist_checkpoint_to_hf, import_hf_to_dist_checkpoint,
                                                   model_config_from_dict, read_sidecar, refuse_existing,
                                                   resolve_checkpoint, single_process_groups)
    from megatron_denoise.convert.tables import NameTable
    from megatron_denoise.layout import ParallelLayout

    dest = args.checkpoint if args.from_hf else args.hf
    refuse_existing(dest, args.overwrite)  # before any process group or model is built
    world = int(os.environ.get("WORLD_SIZE", "1"))
    layout = ParallelLayout(world_size=world, tp=args.tp, pp=args.pp, vpp=args.vpp, ep=args.ep, etp=args.tp,
                            sequence_parallel=args.tp > 1)
    t0 = time.time()
    run_cfg = None
    if args.config:
        from megatron_denoise.config.loader import load_config

        run_cfg = load_config(args.config, validate=False).model
    if args.from_hf:
        cfg = model_config_from_hf(read_hf_config(args.hf), hf_path=args.hf)
        if run_cfg is not None:
            from megatron_denoise.convert.hf_config import check_same_model

            check_same_model(run_cfg, cfg, f"{args.config} (model)", os.path.join(args.hf, "config.json"))
        n = len(NameTable(cfg).entries)
    else:
        side = read_sidecar(resolve_checkpoint(args.checkpoint)) or {}
        src = args.source_hf or side.get("source_hf")
        if run_cfg is not None:
            cfg = run_cfg
            src = src or cfg.hf_path
        elif "model" in side:
            cfg = model_config_from_dict(side["model"])
        else:
            if not src:
                raise ConversionError(f"{args.checkpoint}: no model description found; pass --config (the run's "
                                      f"YAML) or --source-hf (the HF folder it started from)")
            cfg = model_config_from_hf(read_hf_config(src), hf_path=src)
        n = len(NameTable(cfg).hf_names())
    _check_layout(args, world, cfg)
    groups = single_process_groups(layout)
    rank0 = groups.rank == 0
    bar = _Progress(n, "import" if args.from_hf else "export", rank0 and not args.no_progress)
    try:
        if args.from_hf:
            s = import_hf_to_dist_checkpoint(args.hf, args.checkpoint, groups, overwrite=args.overwrite,
                                             on_tensor=bar if rank0 else None)
            bar.close()
            if rank0:
                print(f"wrote distributed checkpoint {s.folder}: {s.tensors} megatron tensors from "
                      f"{_human(s.bytes_read)} of HF tensors read, layout {layout.describe()}, "
                      f"{time.time() - t0:.1f} s")
        else:
            dtype = getattr(torch, args.dtype) if args.dtype else None
            s = export_dist_checkpoint_to_hf(args.checkpoint, args.hf, groups, cfg=cfg, source_hf=src,
                                             overwrite=args.overwrite, max_shard_bytes=_bytes(args.max_shard_size),
                                             dtype=dtype, on_tensor=bar if rank0 else None)
            bar.close()
            if rank0:
                print(f"wrote {s.folder}: {s.tensors} tensors, {_human(s.bytes)} ({s.bytes} bytes) in "
                      f"{len(s.files)} safetensors file(s) + index; {', '.join(s.config_files)}; tokenizer: "
                      f"{', '.join(s.tokenizer_files) or 'none'}; all expected tensors verified; "
                      f"{time.time() - t0:.1f} s")
    finally:
        from megatron_denoise.megatron import parallel_state

        parallel_state.teardown(destroy_process_group=True)
    return 0


if __name__ == "__main__":  # required: the checkpoint writer spawns a helper that re-runs this file
    sys.exit(main())
