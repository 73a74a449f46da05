"""AVG@k evaluation of a Hugging Face model folder on named eval sets.

    python -m megatron_denoise.launch.evaluate --model HF_DIR --sets aime24 amc23 math500 --k 16 \\
        [--config FILE] [--engine vllm|hf] [--max-tokens R] [--max-problems N] [--output DIR] \\
        [--temperature 0.6] [--top-p 0.95] [--seed 0] [--workers 2] [--save-samples] [key=value ...]

Settings come from the config's `eval` section (k per set, temperature 0.6, top_p 0.95),
`data.max_response_length` (R) and `data.prompt` (the prompt template); flags override them.
Without --k each set uses its `eval.k` entry (paper: AVG@16 on AIME/AMC, AVG@1 on MATH-500).
Writes the table to stdout and to OUTPUT/eval_results.md, and OUTPUT/eval_results.json
(OUTPUT/eval_samples.jsonl with every sampled answer when --save-samples).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    from megatron_denoise.config.schema import Engine

    ap = argparse.ArgumentParser(prog="megatron_denoise.launch.evaluate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="Hugging Face model folder (weights + tokenizer)")
    ap.add_argument("--sets", nargs="+", default=None,
                    help="eval set names (aime24 aime25 amc23 math500 gsm8k) or data files; default: eval.sets")
    ap.add_argument("--k", type=int, default=None, help="samples per problem for every set (default: eval.k per set)")
    ap.add_argument("--config", default=None, help="YAML config (eval, data.prompt, data lengths, rollout engine)")
    ap.add_argument("--engine", choices=Engine.values(), default=None, help="rollout engine (default: rollout.engine)")
    ap.add_argument("--max-tokens", type=int, default=None, help="R: max response tokens (default: data.max_response_length)")
    ap.add_argument("--max-problems", type=int, default=None, help="first n problems of each set")
    ap.add_argument("--temperature", type=float, default=None)
    ap.add_argument("--top-p", type=float, default=None)
    ap.add_argument("--seed", type=int, default=0, help="sampling seed (per sample seeds derive from it)")
    ap.add_argument("--workers", type=int, default=2, help="verifier worker processes")
    ap.add_argument("--output", type=Path, default=None, help="output folder (default: <logging.output_dir>/eval)")
    ap.add_argument("--save-samples", action="store_true", help="also write every sampled answer")
    ap.add_argument("overrides", nargs="*", help="config overrides key=value")
    return ap


def load_sets(names: list[str], cfg, tokenizer) -> dict:
    """Problems of each named set (or data file), rendered with the config's prompt template.

    Prompts longer than data.max_prompt_length are kept (they score 0 if they leave no room to
    generate); the data layer's notes about them and about skipped bad rows are printed."""
    from megatron_denoise.data import DataReport, eval_set_names, load_eval_set

    report = DataReport()
    sets = {name: load_eval_set(src, cfg.data, tokenizer=tokenizer, max_problems=cfg.eval.max_problems,
                                report=report) for name, src in eval_set_names(names).items()}
    if report.bad_rows:
        print(report.summary())  # bad rows and notes
    else:
        for note in report.notes:
            print(f"note: {note}")
    return sets


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from megatron_denoise.config.loader import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides, validate=False)
    except ConfigError as e:
        print(f"evaluate: {e}", file=sys.stderr)
        return 2
    ev = cfg.eval
    if args.sets is not None:
        ev.sets = list(args.sets)
    if args.max_problems is not None:
        ev.max_problems = args.max_problems
    if args.temperature is not None:
        ev.temperature = args.temperature
    if args.top_p is not None:
        ev.top_p = args.top_p
    if args.engine is not None:
        cfg.rollout.engine = args.engine
    R = args.max_tokens if args.max_tokens is not None else cfg.data.max_response_length
    model = Path(args.model)
    if not (model / "config.json").is_file():
        print(f"evaluate: --model {model} is not a Hugging Face model folder (no config.json)", file=sys.stderr)
        return 2
    out = args.output or Path(cfg.logging.output_dir) / "eval"
    out.mkdir(parents=True, exist_ok=True)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    from megatron_denoise.reward import VerifierPool
    from megatron_denoise.rollout.engine import make_engine
    from megatron_denoise.trainer.evaluate import evaluate

    tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer_path or str(model))
    sets = load_sets(ev.sets, cfg, tokenizer)
    engine = make_engine(str(model), cfg.rollout, max_model_len=cfg.data.max_prompt_length + R, run_dir=str(out))
    try:
        with VerifierPool(num_workers=args.workers) as pool:
            result = evaluate(engine, tokenizer, sets, ev, scorer=pool, max_tokens=R, k=args.k, seed=args.seed,
                              keep_samples=args.save_samples)
    finally:
        engine.close()

    for name, r in result.sets.items():
        if r.prompt_too_long:
            print(f"note: {name}: {r.prompt_too_long} problem(s) scored 0 because the prompt leaves no room to "
                  f"generate within data.max_prompt_length + R = {cfg.data.max_prompt_length + R} tokens")
    table = result.markdown()
    payload = result.to_dict()
    payload["model"] = str(model)
    (out / "eval_results.json").write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n")
    (out / "eval_results.md").write_text(table + "\n")
    print(table)
    if args.save_samples:
        with open(out / "eval_samples.jsonl", "w", encoding="utf-8") as f:
            for name, r in result.sets.items():
                for s in r.samples or []:
                    f.write(json.dumps({"set": name, **s}) + "\n")
    print(f"wrote {out / 'eval_results.json'} and {out / 'eval_results.md'}"
          + (f" and {out / 'eval_samples.jsonl'}" if args.save_samples else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
