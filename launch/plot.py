"""Turn a run's metrics into PNG curves.

    python -m megatron_denoise.launch.plot RUN_DIR [--out DIR] [--dpi 100]

Reads RUN_DIR/metrics.jsonl and writes RUN_DIR/plots/{reward,accuracy,recovery_rate,lengths,
entropy,loss,clip_fraction,grad_norm,fallbacks,dapo,step_time,validation}.png and overview.png
with all of them (panels without data are skipped with a note).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="megatron_denoise.launch.plot", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path, help="run folder holding metrics.jsonl (logging.output_dir)")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default: RUN_DIR/plots)")
    ap.add_argument("--dpi", type=int, default=100)
    args = ap.parse_args(argv)

    from megatron_denoise.trainer.plot import plot_run

    try:
        result = plot_run(args.run_dir, args.out, dpi=args.dpi)
    except (FileNotFoundError, ValueError) as e:
        print(f"plot: {e}", file=sys.stderr)
        return 2
    for note in result.notes:
        print(f"note: {note}")
    for path in result.written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
