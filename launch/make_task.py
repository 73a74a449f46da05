"""Generate a synthetic verifiable reasoning task file (the science testbed's data).

    python -m megatron_denoise.launch.make_task --output data/train.parquet --kind arith --seed 1 --count 4000 \\
        [--min-steps 2] [--max-steps 4] [--max-operand 50] [--max-modulus 12] [--distractors 0] \\
        [--exclude data/heldout.parquet ...] [--split train] [--config RUN.yaml]

Kinds: arith (multi-step arithmetic with carries), dial (a modular word problem with distractor
sentences), mix (both). Writes the reference schema (chat `prompt`, `reward_model.ground_truth`,
`extra_info` with the question, the step-by-step solution ending in \\boxed{}, the kind and the
difficulty bucket) as parquet or JSONL by the output's extension. The same flags write a
byte-identical file; problems are distinct, and distinct from every --exclude file. The prompt is
rendered with --config's data.prompt (the run that will train on it), else the testbed's template
(the question alone).
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    from megatron_denoise.config.schema import TaskConfig, TaskKind

    d = TaskConfig()
    ap = argparse.ArgumentParser(prog="megatron_denoise.launch.make_task", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", type=Path, required=True, help="file to write (.parquet or .jsonl)")
    ap.add_argument("--kind", choices=TaskKind.values(), default=d.kind)
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--count", type=int, default=d.count)
    ap.add_argument("--min-steps", type=int, default=d.min_steps)
    ap.add_argument("--max-steps", type=int, default=d.max_steps)
    ap.add_argument("--max-operand", type=int, default=d.max_operand)
    ap.add_argument("--max-modulus", type=int, default=d.max_modulus)
    ap.add_argument("--distractors", type=int, default=d.distractors)
    ap.add_argument("--boxed-fraction", type=float, default=d.boxed_fraction,
                    help="share of solutions ending in \\boxed{} (the rest: 'The answer is N.')")
    ap.add_argument("--exclude", type=Path, nargs="*", default=[], help="task files whose problems must not recur")
    ap.add_argument("--split", default="train", help="extra_info.split of every row")
    ap.add_argument("--config", type=Path, default=None, help="run config whose data.prompt renders the prompts")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from megatron_denoise.config.schema import TaskConfig
    from megatron_denoise.prepare.tasks import TESTBED_PROMPT, write_task_file

    settings = TaskConfig(kind=args.kind, seed=args.seed, count=args.count, min_steps=args.min_steps,
                          max_steps=args.max_steps, max_operand=args.max_operand, max_modulus=args.max_modulus,
                          distractors=args.distractors, boxed_fraction=args.boxed_fraction)
    prompt = TESTBED_PROMPT
    if args.config is not None:
        from megatron_denoise.config.loader import load_config

        prompt = load_config(args.config, validate=False).data.prompt
    try:
        problems = write_task_file(args.output, settings, prompt, split=args.split, exclude_files=args.exclude)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    buckets = Counter(p.bucket for p in problems)
    print(json.dumps({"output": str(args.output), "problems": len(problems),
                      "kinds": dict(Counter(p.kind for p in problems)), "buckets": dict(sorted(buckets.items()))}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
