"""Rollout throughput: the vLLM engine vs transformers `generate`, same model, same requests,
side by side in one run (timings on shared machines swing; compare the ratio within a run).

    python benchmarks/bench_rollout.py [--model HF_DIR] [--problems 8] [--n 6] [--k 2] \\
        [--max-tokens 128] [--temperature 1.0] [--hf-batch-size 0] [--hf-sequential]

Requests are one DenoiseRL step's rows: per GSM8K problem, N main rows and K denoise rows whose
prompt is followed by the first p tokens of a wrong solution (max_tokens R - p), all sent in
ONE generate call. Default model: SmolLM2-135M-Instruct (megatron_denoise.prepare.models). transformers runs
batched (left-padded, rows grouped by budget; --hf-batch-size 0 = all rows of a budget at once)
and, with --hf-sequential, one row at a time (how the parity oracle runs). Also prints the engine's
start-up and weight-refit times.
"""
from __future__ import annotations

import argparse
import os
import time


def build_requests(tokenizer, problems: int, n: int, k: int, R: int):
    from megatron_denoise.core.types import PrefixSpan, RolloutRequest, RowKind
    from megatron_denoise.core.prefix import render_prompt_ids
    from megatron_denoise.data.sources import load_named_set

    table, _ = load_named_set("gsm8k")
    prompts = table.column("prompt").to_pylist()[:problems]
    wrong = ("Let's compute step by step. First we add the numbers and get 42, then we divide by 3 "
             "to get 14, so the final answer is \\boxed{14}.")
    w = tuple(tokenizer.encode(wrong, add_special_tokens=False))
    reqs = []
    for i, msgs in enumerate(prompts):
        ids = render_prompt_ids(tokenizer, msgs)
        for s in range(n):
            reqs.append(RolloutRequest(f"q{i}", i, s, RowKind.MAIN, ids, None, R, seed=1000 * i + s))
        for j in range(k):
            p = max(1, int(0.2 * len(w)) + 3 * j)
            span = PrefixSpan(0, len(w), min(1.0, p / len(w)), p, w[:p])
            reqs.append(RolloutRequest(f"q{i}", i, n + j, RowKind.DENOISE, ids, span, R - p, seed=1000 * i + n + j))
    return reqs


def timed_generate(engine, reqs, sampling):
    t0 = time.perf_counter()
    out = engine.generate(reqs, sampling)
    dt = time.perf_counter() - t0
    tokens = sum(len(c.token_ids) for c in out)
    return out, dt, tokens


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--problems", type=int, default=8)
    ap.add_argument("--n", type=int, default=6, help="main rows per problem")
    ap.add_argument("--k", type=int, default=2, help="denoise rows per problem")
    ap.add_argument("--max-tokens", type=int, default=128, help="R")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--hf-batch-size", type=int, default=0, help="0: all rows of a budget in one batch")
    ap.add_argument("--hf-sequential", action="store_true",
                    help="also time transformers one row at a time (slow: minutes per 1k tokens on 2 cores)")
    ap.add_argument("--run-dir", default="/tmp/mdn_bench_rollout")
    args = ap.parse_args(argv)

    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers import AutoTokenizer

    from megatron_denoise.config.schema import RolloutConfig
    from megatron_denoise.prepare.models import smollm2_path
    from megatron_denoise.rollout.engine import SamplingSpec
    from megatron_denoise.rollout.hf_engine import HFEngine
    from megatron_denoise.rollout.vllm_engine import VLLMEngine

    model = args.model or smollm2_path()
    tok = AutoTokenizer.from_pretrained(model)
    reqs = build_requests(tok, args.problems, args.n, args.k, args.max_tokens)
    sampling = SamplingSpec(temperature=args.temperature)
    max_len = max(len(r.engine_input_ids) + r.max_tokens for r in reqs)
    print(f"model {model}\n{len(reqs)} rows ({args.problems} problems x (N={args.n} + K={args.k})), R={args.max_tokens}, "
          f"temperature {args.temperature}, torch threads {__import__('torch').get_num_threads()}")

    results = {}
    t0 = time.perf_counter()
    eng = VLLMEngine(model, RolloutConfig(), max_model_len=max_len + 8, run_dir=args.run_dir)
    startup = time.perf_counter() - t0
    eng.generate(reqs[:2], sampling)  # warm-up
    _, dt, tokens = timed_generate(eng, reqs, sampling)
    results["vllm (one call)"] = (dt, tokens)
    print(f"vllm: {tokens} tokens in {dt:.1f} s", flush=True)
    from safetensors.torch import load_file
    weights = load_file(os.path.join(model, "model.safetensors"))
    refit = [eng.update_weights(weights.items()) for _ in range(2)]
    eng.close()

    hf = HFEngine(model, dtype="float32", batch_size=args.hf_batch_size or len(reqs))
    hf.generate(reqs[:2], sampling)  # warm-up
    _, dt, tokens = timed_generate(hf, reqs, sampling)
    results[f"transformers generate (batched {args.hf_batch_size or 'all'})"] = (dt, tokens)
    print(f"transformers batched: {tokens} tokens in {dt:.1f} s", flush=True)
    if args.hf_sequential:
        hf.batch_size = 1
        _, dt, tokens = timed_generate(hf, reqs, sampling)
        results["transformers generate (one row at a time)"] = (dt, tokens)
    hf.close()

    base = results["vllm (one call)"][1] / results["vllm (one call)"][0]
    print(f"\nvLLM engine start-up {startup:.1f} s; refit of {len(weights)} tensors: "
          + ", ".join(f"{s:.2f} s" for s in refit))
    print(f"{'engine':<45} {'seconds':>8} {'tokens':>7} {'tokens/s':>9} {'vllm speed-up':>14}")
    for name, (dt, tokens) in results.items():
        tps = tokens / dt
        print(f"{name:<45} {dt:8.1f} {tokens:7d} {tps:9.1f} {base / tps:13.2f}x")


if __name__ == "__main__":
    main()
