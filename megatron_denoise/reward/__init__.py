"""Verifiable 0/1 math reward: last `\\boxed{}` vs the ground truth, judged by math-verify in a
pool of sandboxed worker processes with per-answer deadlines.

Public API (importing this package loads no sympy/math-verify; only the workers do):
    VerifierPool(num_workers, deadline_s, ...).score_batch(texts, ground_truths) -> list[VerifyResult]
    VerifyResult(score, status, answer, elapsed_s, detail), VerifyStatus (ok|no_box|timeout|error)
    summarize(results) -> counts per status
    last_boxed(text) -> str | None, normalize_ground_truth(gt) -> list[str]
"""
from megatron_denoise.reward.boxed import last_boxed, normalize_ground_truth
from megatron_denoise.reward.pool import VerifierPool
from megatron_denoise.reward.result import VerifyResult, VerifyStatus, summarize

__all__ = ["VerifierPool", "VerifyResult", "VerifyStatus", "summarize", "last_boxed", "normalize_ground_truth"]
