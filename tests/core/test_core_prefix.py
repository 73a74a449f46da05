"""Building a step's rows: prefix lengths, budgets, pool sampling, rho samplers, fallbacks."""
from __future__ import annotations

import random

import pytest

from core_testlib import BosAddingTokenizer, char_encode, denoise_cfg, problem
from megatron_denoise.config.schema import RhoConfig
from megatron_denoise.core.prefix import (
    as_encoder,
    build_step_requests,
    generation_budget,
    prefix_length,
    sample_rho,
    validate_rho_config,
)
from megatron_denoise.core.types import FallbackReason, RowKind

PROMPT = (10, 11, 12)  # stands for "<|im_start|>user ... <|im_start|>assistant\n"


def build(problems, cfg, R=16, step=0, tokenizer=char_encode, **kw):
    return build_step_requests(problems, [PROMPT] * len(problems), tokenizer, cfg, R, step, **kw)


def test_prefix_length_edge_cases():
    assert prefix_length(0.2, 1) == 1      # |w| = 1: floor(0.2) = 0 -> max(1, 0) = 1
    assert prefix_length(0.2, 4) == 1      # rho*|w| = 0.8 < 1 -> 1
    assert prefix_length(0.2, 5) == 1      # exactly 1.0
    assert prefix_length(0.2, 10) == 2
    assert prefix_length(0.2, 14) == 2     # 2.8 floors to 2
    assert prefix_length(1.0, 7) == 7      # the whole wrong text
    with pytest.raises(ValueError, match="source_num_tokens"):
        prefix_length(0.2, 0)


def test_one_token_wrong_text_gives_one_token_prefix_at_token_level():
    reqs = build([problem("a", ["x"])], denoise_cfg(n=1, k=1), R=8)
    main, den = reqs.requests
    assert main.kind is RowKind.MAIN and main.engine_input_ids == PROMPT and main.max_tokens == 8
    assert den.kind is RowKind.DENOISE
    assert den.prefix.length == 1 and den.prefix.source_num_tokens == 1
    assert den.engine_input_ids == PROMPT + (ord("x"),)
    assert den.max_tokens == 7  # cutdown: R - p = 8 - 1


def test_prefix_is_first_p_policy_tokens_without_bos_or_end_of_turn():
    w = "The answer is \\boxed{41}"  # 24 chars -> |w| = 24, p = floor(0.2 * 24) = 4
    reqs = build([problem("a", [w])], denoise_cfg(n=0, k=1), R=100, tokenizer=BosAddingTokenizer())
    (den,) = reqs.requests
    assert den.prefix.source_num_tokens == 24 and den.prefix.length == 4
    assert den.prefix.token_ids == tuple(char_encode("The "))  # no BOS (add_special_tokens=False)
    assert den.engine_input_ids == PROMPT + tuple(char_encode("The "))
    assert den.max_tokens == 96


@pytest.mark.parametrize("mode,budget", [("cutdown", 16 - 3), ("shift", 16 - 3), ("none", 16)])
def test_generation_budget_per_partial_mode(mode, budget):
    # |w| = 15, rho 0.2 -> p = 3
    reqs = build([problem("a", ["a" * 15])], denoise_cfg(n=1, k=1, mode=mode), R=16)
    main, den = reqs.requests
    assert den.prefix.length == 3 and den.max_tokens == budget
    assert main.max_tokens == 16
    assert generation_budget(mode, 16, 3) == budget


def test_p_at_least_R_falls_back_and_p_just_below_R_keeps_one_token():
    # |w| = 50, rho 0.2 -> p = 10
    at = build([problem("a", ["z" * 50])], denoise_cfg(n=0, k=1), R=10)
    (row,) = at.requests
    assert row.kind is RowKind.FALLBACK and row.fallback_reason is FallbackReason.PREFIX_TOO_LONG
    assert row.prefix is None and row.max_tokens == 10 and row.engine_input_ids == PROMPT
    assert at.fallbacks == {"prefix_too_long": 1}
    below = build([problem("a", ["z" * 50])], denoise_cfg(n=0, k=1), R=11)
    (row,) = below.requests
    assert row.kind is RowKind.DENOISE and row.prefix.length == 10 and row.max_tokens == 1


def test_fallback_accounting_never_raises_and_keeps_group_size():
    def flaky(text):
        if text == "boom":
            raise RuntimeError("tokenizer exploded")
        return char_encode(text)

    problems = [
        problem("empty", []),                 # 2 x empty_pool
        problem("blank", ["", "ok text"]),    # first -> "" -> 0 tokens -> 2 x unbuildable
        problem("nonstr", [5]),               # 2 x unbuildable (not a string)
        problem("boom", ["boom"]),            # tokenizer error -> 2 x unbuildable
        problem("long", ["y" * 100]),         # p = 20 >= R = 16 -> 2 x prefix_too_long
        problem("good", ["g" * 20]),          # p = 4 -> 2 denoise rows
    ]
    reqs = build(problems, denoise_cfg(n=2, k=2), R=16, tokenizer=flaky)
    assert len(reqs.requests) == 6 * 4 and reqs.group_size == 4
    assert reqs.fallbacks == {"empty_pool": 2, "unbuildable_prefix": 6, "prefix_too_long": 2}
    assert reqs.fallback_count == 10
    assert reqs.problems_without_pool == 1
    for b in range(6):
        group = reqs.group(b)
        assert [r.slot for r in group] == [0, 1, 2, 3]
        assert {r.group_id for r in group} == {b}
        assert [r.kind for r in group[:2]] == [RowKind.MAIN, RowKind.MAIN]
        expected = RowKind.DENOISE if b == 5 else RowKind.FALLBACK
        assert [r.kind for r in group[2:]] == [expected, expected]
        for r in group[2:]:
            assert r.max_tokens == (12 if b == 5 else 16)


def test_pool_sampling_first_takes_entry_zero_in_every_slot():
    pool = ["first wrong", "second wrong one", "third"]
    reqs = build([problem("a", pool)], denoise_cfg(n=0, k=4, pool="first"), R=64)
    assert [r.prefix.pool_index for r in reqs.requests] == [0, 0, 0, 0]
    assert all(r.prefix.source_num_tokens == len("first wrong") for r in reqs.requests)


def test_pool_sampling_random_is_seeded_and_independent_of_batch_composition():
    pool = [f"wrong solution number {i} " * 3 for i in range(5)]
    cfg = denoise_cfg(n=1, k=4, pool="random", rho=RhoConfig(strategy="uniform", low=0.1, high=0.9))
    a, b, c = problem("a", pool), problem("b", pool), problem("c", pool)
    one = build([a, b], cfg, R=200, step=3)
    again = build([a, b], cfg, R=200, step=3)
    assert one.requests == again.requests
    # Problem a in another batch (other neighbours, other position): the same draws and seeds.
    other = build([c, b, a], cfg, R=200, step=3)
    strip = lambda rs: [(r.slot, r.kind, r.prefix, r.max_tokens, r.seed) for r in rs]
    assert strip(one.group(0)) == strip(other.group(2))
    assert other.group(2)[0].group_id == 2
    # Another step or another denoise.seed redraws.
    idx = lambda reqs: [r.prefix.pool_index for r in reqs.requests if r.prefix]
    draws = [tuple(idx(build([a, b], cfg, R=200, step=s))) for s in range(12)]
    assert len(set(draws)) > 1
    assert set(i for d in draws for i in d) == set(range(5))  # every entry gets drawn
    reseeded = build([a, b], denoise_cfg(n=1, k=4, pool="random", seed=8,
                                         rho=RhoConfig(strategy="uniform", low=0.1, high=0.9)), R=200, step=3)
    assert [r.prefix for r in reseeded.requests] != [r.prefix for r in one.requests]
    # Per-request engine seeds: distinct per slot, stable, a function of sampling_seed.
    seeds = [r.seed for r in one.requests]
    assert len(set(seeds)) == len(seeds) and all(0 <= s < 2**31 for s in seeds)
    assert [r.seed for r in build([a, b], cfg, R=200, step=3, sampling_seed=1).requests] != seeds
    # A second generation batch of the same step (DAPO) redraws.
    assert build([a, b], cfg, R=200, step=3, gen_batch=1).requests != one.requests


def test_rho_strategies_stay_in_bounds():
    rng = random.Random(0)
    fixed = RhoConfig(strategy="fixed", value=0.35)
    assert {sample_rho(fixed, rng) for _ in range(50)} == {0.35}
    uni = RhoConfig(strategy="uniform", low=0.1, high=0.5)
    xs = [sample_rho(uni, rng) for _ in range(2000)]
    assert all(0.1 <= x <= 0.5 for x in xs) and min(xs) < 0.12 and max(xs) > 0.48
    # A wide normal is clipped: both bounds are hit exactly, nothing escapes them.
    nor = RhoConfig(strategy="normal", mean=0.3, std=1.0, low=0.1, high=0.5)
    ys = [sample_rho(nor, rng) for _ in range(2000)]
    assert all(0.1 <= y <= 0.5 for y in ys)
    assert ys.count(0.1) > 100 and ys.count(0.5) > 100 and len(set(ys)) > 100
    # Zero std: exactly the mean (inside the bounds).
    assert sample_rho(RhoConfig(strategy="normal", mean=0.3, std=0.0, low=0.1, high=0.5), rng) == 0.3


def test_rho_is_seeded_per_slot_in_built_rows():
    cfg = denoise_cfg(n=0, k=6, rho=RhoConfig(strategy="normal", mean=0.3, std=0.2, low=0.1, high=0.6))
    w = "q" * 1000
    rows = build([problem("a", [w])], cfg, R=2000).requests
    rhos = [r.prefix.rho for r in rows]
    assert len(set(rhos)) == 6 and all(0.1 <= x <= 0.6 for x in rhos)
    assert [r.prefix.length for r in rows] == [max(1, int(x * 1000)) for x in rhos]
    assert [r.prefix.rho for r in build([problem("a", [w])], cfg, R=2000).requests] == rhos


@pytest.mark.parametrize("rho,key", [
    (RhoConfig(strategy="fixed", value=0.0), "denoise.rho.value (0.0)"),
    (RhoConfig(strategy="fixed", value=1.5), "denoise.rho.value (1.5)"),
    (RhoConfig(strategy="uniform", low=0.6, high=0.4), "denoise.rho.low (0.6) must be <= denoise.rho.high (0.4)"),
    (RhoConfig(strategy="normal", low=0.0, high=0.4), "denoise.rho.low (0.0)"),
    (RhoConfig(strategy="normal", std=-1.0), "denoise.rho.std (-1.0)"),
    (RhoConfig(strategy="normal", std=0.0), "denoise.rho.std (0.0) must be > 0"),  # as the loader says
])
def test_bad_rho_config_names_the_key(rho, key):
    with pytest.raises(ValueError) as err:
        validate_rho_config(rho)
    assert key in str(err.value)


def test_bad_denoise_config_and_inputs_are_reported():
    with pytest.raises(ValueError, match=r"denoise.pool_sampling \('last'\)"):
        build([problem("a", ["w"])], denoise_cfg(pool="last"))
    with pytest.raises(ValueError, match=r"denoise.k_denoise \(-1\)"):
        build([problem("a", ["w"])], denoise_cfg(k=-1))
    with pytest.raises(ValueError, match="3 entries for 1 problems"):
        build_step_requests([problem("a")], [PROMPT] * 3, char_encode, denoise_cfg(), 16, 0)


def test_k_zero_is_plain_grpo():
    reqs = build([problem("a", ["w" * 30]), problem("b")], denoise_cfg(n=3, k=0), R=16)
    assert [r.kind for r in reqs.requests] == [RowKind.MAIN] * 6
    assert reqs.fallback_count == 0 and reqs.problems_without_pool == 1


def test_as_encoder_accepts_callables_and_encode_objects():
    assert list(as_encoder(char_encode)("ab")) == [97, 98]
    assert list(as_encoder(BosAddingTokenizer())("ab")) == [97, 98]

    class EncodeOnly:  # encode(text) without the keyword
        def encode(self, text):
            return [len(text)]
    assert list(as_encoder(EncodeOnly())("abc")) == [3]
    with pytest.raises(TypeError, match="no encode"):
        as_encoder(42)
