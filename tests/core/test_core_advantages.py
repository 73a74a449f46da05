"""GRPO / Dr. GRPO advantages on worked examples, DAPO dynamic sampling, overlong shaping."""
from __future__ import annotations

import math

import pytest
import torch

from core_testlib import make_rollout
from megatron_denoise.config.schema import AlgorithmConfig, OverlongConfig
from megatron_denoise.core.advantages import (
    DynamicSampler,
    DynamicSamplingExhausted,
    apply_overlong_shaping,
    compute_advantages,
    group_advantages,
    group_keys,
    keep_group,
    overlong_penalty,
)
from megatron_denoise.core.types import FallbackReason, RowKind

M, D, F = RowKind.MAIN, RowKind.DENOISE, RowKind.FALLBACK


def group(*spec, gid=0):
    """spec: (kind, accuracy) pairs -> one problem's rows."""
    out = []
    for slot, (kind, acc) in enumerate(spec):
        out.append(make_rollout(kind, acc, p=2 if kind is D else 0, group_id=gid, slot=slot,
                                fallback_reason=FallbackReason.EMPTY_POOL if kind is F else None))
    return out


def test_grpo_worked_example_unbiased_and_population():
    # Problem 0: rewards [1, 0, 0, 1] (2 main, 2 denoise), mean 0.5.
    #   unbiased std = sqrt((4 * 0.25) / 3) = sqrt(1/3) = 0.5773503 -> A = +-0.5 / 0.5773513 = +-0.8660239
    #   population std = sqrt(1/4) = 0.5 -> A = +-0.5 / 0.500001 = +-0.999998
    # Problem 1: rewards [1, 0, 0], mean 1/3, deviations (2/3, -1/3, -1/3),
    #   unbiased var = (4/9 + 1/9 + 1/9) / 2 = 1/3 -> std 0.5773503 ->
    #   A = (2/3) / 0.5773513 = 1.1546985, -(1/3) / 0.5773513 = -0.5773493
    # Problem 2: one row -> 0. Problem 3: all equal [1, 1] -> std 0 -> 0 / (0 + eps) = 0.
    groups = [group((M, 1), (M, 0), (D, 0), (D, 1)), group((M, 1), (F, 0), (D, 0)), group((M, 1)),
              group((M, 1), (D, 1))]
    adv = compute_advantages(groups, AlgorithmConfig(name="grpo", std="unbiased"))
    s = math.sqrt(1 / 3) + 1e-6
    expected = [0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s, (2 / 3) / s, -(1 / 3) / s, -(1 / 3) / s, 0.0, 0.0, 0.0]
    assert adv.dtype == torch.float32 and adv.shape == (10,)
    torch.testing.assert_close(adv, torch.tensor(expected), rtol=0, atol=1e-6)
    assert abs(adv[0].item() - 0.8660239) < 1e-6 and abs(adv[4].item() - 1.1546985) < 1e-6
    pop = compute_advantages(groups[:1], AlgorithmConfig(name="grpo", std="population"))
    torch.testing.assert_close(pop, torch.tensor([0.999998, -0.999998, -0.999998, 0.999998]), rtol=0, atol=1e-6)
    # dapo uses the same GRPO advantage.
    torch.testing.assert_close(compute_advantages(groups, AlgorithmConfig(name="dapo")), adv)


def test_dr_grpo_is_mean_centred_only():
    # [1, 0, 0, 1] -> +-0.5; [1, 0, 0] -> 2/3, -1/3, -1/3; singleton -> 0.
    groups = [group((M, 1), (M, 0), (D, 0), (D, 1)), group((M, 1), (F, 0), (D, 0)), group((D, 1))]
    adv = compute_advantages(groups, AlgorithmConfig(name="dr_grpo"))
    torch.testing.assert_close(adv, torch.tensor([.5, -.5, -.5, .5, 2 / 3, -1 / 3, -1 / 3, 0.]), rtol=0, atol=1e-7)


def test_separate_baselines_split_main_and_denoise_rows():
    # Not shared: ordinary rows (main + fallback) [1, 0, 1] vs denoise rows [0, 0].
    #   ordinary: mean 2/3, dev (1/3, -2/3, 1/3), unbiased var = (1/9 + 4/9 + 1/9)/2 = 1/3
    #   -> A = (1/3)/0.5773513 = 0.5773493, -(2/3)/0.5773513 = -1.1546985; denoise: all 0 -> 0.
    g = group((M, 1), (M, 0), (F, 1), (D, 0), (D, 0))
    assert group_keys([g], shared_baseline=False) == [(0, 0), (0, 0), (0, 0), (0, 1), (0, 1)]
    assert group_keys([g, g], shared_baseline=True) == [(0, 0)] * 5 + [(1, 0)] * 5
    adv = compute_advantages([g], AlgorithmConfig(), shared_baseline=False)
    s = math.sqrt(1 / 3) + 1e-6
    torch.testing.assert_close(adv, torch.tensor([(1 / 3) / s, -(2 / 3) / s, (1 / 3) / s, 0., 0.]), rtol=0, atol=1e-6)
    # Shared: mean 2/5, unbiased var = (3*.36 + 2*.16... ) computed directly: rewards [1,0,1,0,0]
    #   dev (.6, -.4, .6, -.4, -.4), squares sum = .36*2 + .16*3 = 1.2, /4 = .3 -> std .5477226
    shared = compute_advantages([g], AlgorithmConfig(), shared_baseline=True)
    s2 = math.sqrt(0.3) + 1e-6
    torch.testing.assert_close(shared, torch.tensor([.6 / s2, -.4 / s2, .6 / s2, -.4 / s2, -.4 / s2]), rtol=0, atol=1e-6)


def test_group_advantages_errors():
    # (algorithm.std / algorithm.name values are the schema's types, checked by the config loader:
    # tests/test_config_choices.py)
    with pytest.raises(ValueError, match="3 rewards for 2 group keys"):
        group_advantages(torch.tensor([1., 0., 1.]), [0, 0])


def test_dapo_filter_keeps_only_mixed_groups():
    assert not keep_group(group((M, 0), (D, 0), (D, 0)))
    assert not keep_group(group((M, 1), (D, 1)))
    assert keep_group(group((M, 1), (D, 0)))
    assert keep_group(group((M, 0), (M, 0), (D, 1)))  # only a denoise row solved it: kept
    assert not keep_group([])


def test_dynamic_sampler_accumulates_until_B_survive():
    wrong, right = group((M, 0), (D, 0)), group((M, 1), (D, 1))
    mixed = [group((M, 1), (D, 0), gid=i) for i in range(3)]
    s = DynamicSampler(target_problems=2, max_gen_batches=3)
    s.add([wrong, mixed[0]])
    assert not s.done and s.gen_batches == 1
    s.add([right, mixed[1], mixed[2]])
    assert s.done
    taken = s.take()
    assert [g[0].request.group_id for g in taken] == [0, 1]  # arrival order, first B
    assert s.stats() == {"dapo/gen_batches": 2.0, "dapo/kept": 2.0, "dapo/dropped": 2.0,
                         "dapo/dropped_all_wrong": 1.0, "dapo/dropped_all_correct": 1.0, "dapo/surplus": 1.0}
    with pytest.raises(RuntimeError, match="after enough problems survived"):
        s.add([mixed[0]])


def test_dynamic_sampler_gives_up_with_a_clear_error():
    s = DynamicSampler(target_problems=2, max_gen_batches=2)
    s.add([group((M, 0), (D, 0)), group((M, 1), (D, 0))])
    with pytest.raises(DynamicSamplingExhausted) as err:
        s.add([group((M, 1), (D, 1))])
    msg = str(err.value)
    assert "only 1 of 2 problems" in msg and "after 2 generation batches" in msg
    assert "algorithm.dynamic_sampling.max_gen_batches=2" in msg
    assert "1 all-wrong and 1 all-correct" in msg
    with pytest.raises(RuntimeError, match="only 1 of 2"):
        s.take()
    with pytest.raises(ValueError, match="max_gen_batches"):
        DynamicSampler(target_problems=2, max_gen_batches=0)


def test_overlong_penalty_by_hand():
    # budget 10, buffer 4: free up to 6 tokens, then -1/4 per token, -1 at 10 and beyond.
    assert [overlong_penalty(n, 10, 4, 1.0) for n in (0, 6, 7, 8, 10, 12)] == [0, 0, -.25, -.5, -1, -1]
    assert overlong_penalty(9, 10, 4, 0.5) == -0.375
    with pytest.raises(ValueError, match="algorithm.overlong.buffer"):
        overlong_penalty(3, 10, 0, 1.0)


def test_overlong_shaping_uses_each_rows_own_budget():
    # main row: 9 of 12 tokens, buffer 4 -> exceed 1 -> -0.25.
    # cutdown denoise row p = 2, budget 10: 9 tokens -> exceed 9 - 6 = 3 -> -0.75 (= folded 11 vs R 12).
    # short-budget row: budget 3 < buffer -> buffer capped at 3: 3 tokens -> -1.
    rows = [make_rollout(M, 1.0, cont_len=9, max_tokens=12), make_rollout(D, 1.0, cont_len=9, p=2, max_tokens=10),
            make_rollout(D, 0.0, cont_len=3, p=9, max_tokens=3)]
    shaped = apply_overlong_shaping([rows], OverlongConfig(enabled=True, buffer=4, penalty_factor=1.0))
    assert [r.reward for r in shaped[0]] == [0.75, 0.25, -1.0]
    assert [r.accuracy for r in shaped[0]] == [1.0, 1.0, 0.0]  # accuracy untouched
    off = apply_overlong_shaping([rows], OverlongConfig(enabled=False))
    assert [r.reward for r in off[0]] == [1.0, 1.0, 0.0]
