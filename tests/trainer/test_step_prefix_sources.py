"""Issue 18 through the training step (scripted engine/policy/scorer from test_step, no processes):
the online pool refilled by main rows and drawn by the next step, with DAPO and every partial mode;
the adaptive rho logged per step; correct prefixes with their pass rate named as such."""
from __future__ import annotations

import math

import pytest

from megatron_denoise.core.types import RowKind
from megatron_denoise.trainer.step import train_step

from test_step import make_ctx, problems  # noqa: E402  (the scripted fakes)


def truth(r):  # problems(n) gives problem p<i> the ground truth i
    return int(r.problem_uid[1:])


def wrong_main(r):  # main rows: a wrong boxed answer; denoise/fallback rows: the right one
    return f"so \\boxed{{{truth(r) + 100}}}" if r.kind is RowKind.MAIN else f"\\boxed{{{truth(r)}}}"


@pytest.mark.parametrize("mode", ["cutdown", "shift", "none"])
def test_online_pool_step0_falls_back_then_draws_the_policys_own_wrong_answers(mode):
    ctx, engine, scorer, policy = make_ctx([f"denoise.partial_mode={mode}", "denoise.pool_source=online"],
                                           wrong_main, problems(2, pool=()))
    m0 = train_step(ctx, step=0)
    # no entry yet: the denoise slots are ordinary rollouts, counted as empty-pool fallbacks
    assert [r.kind for r in engine.calls[0]].count(RowKind.FALLBACK) == 4
    assert m0["fallback/empty_pool"] == 4.0 and m0["problems_without_pool"] == 2.0
    assert math.isnan(m0["online_share"]) and m0["online_pool/entries"] == 2.0  # "so \boxed{100}" deduped
    m1 = train_step(ctx, step=1)
    den = [r for r in engine.calls[1] if r.kind is RowKind.DENOISE]
    assert len(den) == 4 and m1["fallbacks"] == 0.0 and m1["online_share"] == 1.0
    assert m1["online_age_mean"] == 1.0 and m1["rho_mean"] == 0.5
    # |w| = 14 ids ("so \boxed{100}" without its EOS) -> p = 7, the first 7 ids, token level
    assert den[0].prefix.token_ids == tuple(ord(c) + 2 for c in "so \\box")
    assert den[0].max_tokens == (40 if mode == "none" else 40 - 7)
    assert m1["recovery_rate"] == 1.0  # the denoise rows answered right


def test_online_with_dapo_and_adaptive_rho_logged_per_step():
    over = ["denoise.pool_source=mixed", "denoise.rho.strategy=adaptive", "denoise.rho.value=0.2",
            "denoise.rho.low=0.1", "denoise.rho.high=0.5", "denoise.rho.gain=0.2", "denoise.rho.scope=global",
            "algorithm.dynamic_sampling.enabled=true", "algorithm.dynamic_sampling.max_gen_batches=4"]
    ctx, engine, _, _ = make_ctx(over, wrong_main, problems(4))
    m0 = train_step(ctx, step=0)
    # denoise rows all right (r = 1): rho 0.2 -> 0.3 after the first generation batch
    assert m0["rho/controller"] == pytest.approx(0.3) and m0["rho_mean"] == pytest.approx(0.2)
    m1 = train_step(ctx, step=1)
    assert m1["rho_mean"] == pytest.approx(0.3) and m1["rho/controller"] == pytest.approx(0.4)
    # mixed: step 1's problems (p2, p3) have no online entry yet -> offline only; step 2 meets p0, p1
    # again, whose main rows of step 0 refilled their online pools (age 2 at most max_age 20)
    assert m1["online_share"] == 0.0 and m1["fallbacks"] == 0.0
    m2 = train_step(ctx, step=2)
    assert m2["online_share"] > 0.0 and m2["online_age_mean"] == 2.0


def test_correct_prefixes_rename_the_recovery_metric():
    right_main = lambda r: f"\\boxed{{{truth(r)}}}" if r.kind is RowKind.MAIN else "x"  # noqa: E731
    ctx, engine, _, _ = make_ctx(["denoise.pool_source=online", "denoise.prefix_kind=correct"], right_main,
                                 problems(2))
    train_step(ctx, step=0)
    m1 = train_step(ctx, step=1)
    den = [r for r in engine.calls[1] if r.kind is RowKind.DENOISE]
    assert den and den[0].prefix.token_ids == tuple(ord(c) + 2 for c in "\\box")  # "\boxed{0}": 9 ids -> p = 4
    assert "recovery_rate" not in m1 and m1["correct_prefix_pass_rate"] == 0.0  # "\box" + "x": no answer
