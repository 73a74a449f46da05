"""Step metrics of METHOD.md section 4 computed from a step's verified rollouts.

Row classes: "denoise" rows carry a prefix (p > 0); "main" rows do not (kind MAIN, plus FALLBACK
rows, which are ordinary rollouts from the prompt; fallbacks are also counted on their own).
All values are plain floats, keyed for JSONL/TensorBoard. Rates over an empty class are NaN
(e.g. the recovery rate of a K = 0 run), never a misleading 0.

Pass all generated groups of the step (before the DAPO filter) to see the recovery rate of
everything that was sampled; pass `dynamic_sampling` (DynamicSampler.stats()) to merge its counts.
The loss-side metrics (entropy, clip fraction, grad norm) and the time split come from the actor
and the trainer.
"""
from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

from megatron_denoise.core.types import FallbackReason, Rollout, RowKind

__all__ = ["step_metrics"]


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


def step_metrics(groups: Sequence[Sequence[Rollout]], max_response_length: int,
                 dynamic_sampling: Optional[Mapping[str, float]] = None) -> dict[str, float]:
    """Metrics of one step from rollouts grouped per problem (each group = a problem's N + K rows).

    max_response_length: R, to count the tokens saved by capping denoise rows at R - p.
    """
    rows = [r for g in groups for r in g]
    denoise = [r for r in rows if r.prefix_length > 0]
    main = [r for r in rows if r.prefix_length == 0]
    m: dict[str, float] = {}
    m["rows"] = float(len(rows))
    m["problems"] = float(len(groups))
    m["accuracy"] = _mean([r.accuracy for r in rows])
    m["reward_mean"] = _mean([r.reward for r in rows])
    m["main_accuracy"] = _mean([r.accuracy for r in main])
    m["denoise_accuracy"] = _mean([r.accuracy for r in denoise])
    m["recovery_rate"] = m["denoise_accuracy"]  # METHOD.md's name: accuracy of rows with p > 0

    # Problems with both kinds of rows: solved only by main rows / only by denoise rows.
    both = main_only = denoise_only = 0
    for g in groups:
        gm = [r.accuracy > 0 for r in g if r.prefix_length == 0]
        gd = [r.accuracy > 0 for r in g if r.prefix_length > 0]
        if gm and gd:
            both += 1
            main_only += any(gm) and not any(gd)
            denoise_only += any(gd) and not any(gm)
    m["solved_by_main_not_denoise"] = main_only / both if both else math.nan
    m["solved_by_denoise_not_main"] = denoise_only / both if both else math.nan

    # Lengths: continuation (generated tokens, without the prefix) and folded (prefix + continuation).
    m["continuation_length_mean"] = _mean([float(r.continuation_length) for r in rows])
    m["continuation_length_max"] = float(max((r.continuation_length for r in rows), default=0))
    m["folded_length_mean"] = _mean([float(r.prefix_length + r.continuation_length) for r in rows])
    m["denoise_continuation_length_mean"] = _mean([float(r.continuation_length) for r in denoise])
    m["main_continuation_length_mean"] = _mean([float(r.continuation_length) for r in main])
    m["prefix_length_mean"] = _mean([float(r.prefix_length) for r in denoise])
    m["truncated_fraction"] = _mean([float(r.completion.finish_reason == "length") for r in rows])
    m["aborted"] = float(sum(r.completion.finish_reason == "abort" for r in rows))
    m["verifier_failures"] = float(sum(r.verifier_status != "ok" for r in rows))
    # answer format: rows whose response has no \boxed{} answer at all (scored 0 before any judging)
    m["no_box_fraction"] = _mean([float(r.verifier_status == "no_box") for r in rows])

    # Fallbacks and pools.
    fallbacks = [r for r in rows if r.request.kind is RowKind.FALLBACK]
    m["fallback_count"] = float(len(fallbacks))
    for reason in FallbackReason:
        m[f"fallback/{reason.value}"] = float(sum(r.request.fallback_reason is reason for r in fallbacks))
    m["problems_without_pool"] = float(sum(
        any(r.request.fallback_reason is FallbackReason.EMPTY_POOL for r in g) for g in groups))

    # Tokens the R - p cap saved: the reference decodes R tokens and drops the last p of them.
    m["tokens_saved_by_cap"] = float(sum(max_response_length - r.request.max_tokens
                                         for r in denoise if r.request.max_tokens < max_response_length))

    # Per-problem accuracy histogram: how many of the group's rows are correct.
    for g in groups:
        key = f"problem_correct_hist/{sum(r.accuracy > 0 for r in g)}_of_{len(g)}"
        m[key] = m.get(key, 0.0) + 1.0

    if dynamic_sampling is not None:
        m.update({k: float(v) for k, v in dynamic_sampling.items()})
    return m
