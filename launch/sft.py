"""Supervised warm-start: cross-entropy on solution tokens, through the Megatron actor.

    python -m megatron_denoise.launch.sft --config FILE [--dry-run] [--world-size W] [key=value ...]
    mdn-sft --config configs/sft-tiny-llama-cpu-1n1g.yaml

The config is an SFTConfig (megatron_denoise/config/schema.py), loaded strictly like a training
config (defaults inheritance, ${...} interpolation, key=value overrides; every problem reported at
once). --dry-run validates against the world size (default: cluster.num_nodes x
cluster.gpus_per_node) and prints the layout and the plan (rows, tokens, steps) without starting
anything. World size 1 trains in this process; W > 1 spawns one process per rank (or run it under
torchrun, one process per rank). Writes <logging.output_dir>/metrics.jsonl, checkpoints under
checkpoint.dir (checkpoint.resume=auto continues a run), and Hugging Face folders under
<logging.output_dir>/hf/ (step_<n>/ for sft.export_hf_steps, final/ at the end).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatron_denoise.config.loader import ConfigError, load_config
from megatron_denoise.config.schema import SFTConfig


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="megatron_denoise.launch.sft", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, required=True, help="YAML config (an SFTConfig)")
    ap.add_argument("--dry-run", action="store_true", help="validate and print the layout and plan; start nothing")
    ap.add_argument("--world-size", type=int, default=None, help="processes (default: cluster.num_nodes x gpus_per_node)")
    ap.add_argument("--verbose", action="store_true",
                    help="show everything on the console (default: third-party warnings and logs go to "
                         "<logging.output_dir>/logs/driver.log)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides, e.g. sft.total_steps=100")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides, world_size=args.world_size, root=SFTConfig)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    world_size = args.world_size or cfg.cluster.world_size
    from megatron_denoise.sft import runner

    if args.dry_run:
        print(runner.dry_run(cfg, world_size))
        return 0
    from megatron_denoise.console import quiet_console

    with quiet_console(cfg.logging.output_dir, verbose=args.verbose):
        return runner.run(cfg, world_size)


if __name__ == "__main__":
    sys.exit(main())
