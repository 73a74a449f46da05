"""Step metrics on a hand-built step (METHOD.md section 4)."""
from __future__ import annotations

import math

import pytest

from core_testlib import make_rollout
from megatron_denoise.core.metrics import step_metrics
from megatron_denoise.core.types import FallbackReason, RowKind

M, D, F = RowKind.MAIN, RowKind.DENOISE, RowKind.FALLBACK
R = 10


def den(acc, p, cont):
    return make_rollout(D, acc, cont_len=cont, p=p, max_tokens=R - p)  # cutdown budget R - p


def test_step_metrics_worked_example():
    groups = [
        # solved by main only; denoise p = 2, 4
        [make_rollout(M, 1, cont_len=3), make_rollout(M, 0, cont_len=5), den(0, 2, 2), den(0, 4, 4)],
        # empty pool: both denoise slots fell back (ordinary rows, counted as main rows)
        [make_rollout(M, 0, cont_len=1), make_rollout(M, 0, cont_len=1),
         make_rollout(F, 1, cont_len=1, fallback_reason=FallbackReason.EMPTY_POOL),
         make_rollout(F, 0, cont_len=1, fallback_reason=FallbackReason.EMPTY_POOL)],
        # solved by denoise only; p = 3, 3; one main row hit the length limit
        [make_rollout(M, 0, cont_len=6), make_rollout(M, 0, cont_len=6, finish="length"), den(1, 3, 2), den(1, 3, 2)],
    ]
    m = step_metrics(groups, R, dynamic_sampling={"dapo/kept": 3, "dapo/dropped": 5})
    assert m["rows"] == 12 and m["problems"] == 3
    assert m["accuracy"] == pytest.approx(4 / 12)
    assert m["main_accuracy"] == pytest.approx(2 / 8)       # 8 rows without a prefix, 2 correct
    assert m["denoise_accuracy"] == pytest.approx(2 / 4)
    assert m["recovery_rate"] == m["denoise_accuracy"]
    assert m["solved_by_main_not_denoise"] == 0.5            # of the 2 problems with both kinds
    assert m["solved_by_denoise_not_main"] == 0.5
    assert m["continuation_length_mean"] == pytest.approx(34 / 12)
    assert m["continuation_length_max"] == 6
    assert m["folded_length_mean"] == pytest.approx((34 + 12) / 12)
    assert m["denoise_continuation_length_mean"] == pytest.approx(10 / 4)
    assert m["prefix_length_mean"] == 3.0
    assert m["tokens_saved_by_cap"] == 12.0                 # sum of p over the capped rows: 2 + 4 + 3 + 3
    assert m["fallback_count"] == 2 and m["fallback/empty_pool"] == 2
    assert m["fallback/prefix_too_long"] == 0 and m["fallback/unbuildable_prefix"] == 0
    assert m["problems_without_pool"] == 1
    assert m["truncated_fraction"] == pytest.approx(1 / 12)
    assert {k: v for k, v in m.items() if k.startswith("problem_correct_hist/")} == {
        "problem_correct_hist/1_of_4": 2.0, "problem_correct_hist/2_of_4": 1.0}
    assert m["dapo/kept"] == 3.0 and m["dapo/dropped"] == 5.0


def test_uncapped_none_mode_saves_nothing_and_k0_has_no_recovery_rate():
    none_mode = [[make_rollout(M, 1), make_rollout(D, 0, p=3, max_tokens=R)]]
    assert step_metrics(none_mode, R)["tokens_saved_by_cap"] == 0.0
    plain = step_metrics([[make_rollout(M, 1), make_rollout(M, 0)]], R)
    assert math.isnan(plain["recovery_rate"]) and math.isnan(plain["solved_by_main_not_denoise"])
    assert plain["main_accuracy"] == 0.5 and plain["fallback_count"] == 0


def test_no_box_fraction_counts_only_missing_answers():
    from dataclasses import replace

    rows = [make_rollout(M, 1), make_rollout(M, 0), make_rollout(M, 0), make_rollout(M, 0)]
    rows[1] = replace(rows[1], verifier_status="no_box")
    rows[2] = replace(rows[2], verifier_status="timeout")   # a failure, but not a format one
    m = step_metrics([rows], R)
    assert m["no_box_fraction"] == 0.25 and m["verifier_failures"] == 2.0
