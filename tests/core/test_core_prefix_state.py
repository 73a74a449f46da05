"""Issue 18 in the pure core: the online pool (refill, dedup, ageing, cap), the adaptive rho
controller (a hand-derived trajectory), correct prefixes, and resume equality of both states
(state_dict -> JSON -> load gives exactly the draws of the uninterrupted run). No processes."""
from __future__ import annotations

import dataclasses
import json

import pytest

from megatron_denoise.config.loader import ConfigError, load_config
from megatron_denoise.config.schema import (DenoiseConfig, OnlinePoolConfig, PoolSource, PrefixKind, RhoConfig,
                                            RhoScope, RhoStrategy)
from megatron_denoise.core.prefix import build_step_requests
from megatron_denoise.core.prefix_state import DenoiseState, OnlinePool, RhoController
from megatron_denoise.core.types import Completion, FallbackReason, Problem, Rollout, RowKind

from core_testlib import EOS, char_encode

R = 40


def cfg(n=2, k=2, source=PoolSource.ONLINE, kind=PrefixKind.WRONG, rho=None, pool=None, sampling="first"):
    return DenoiseConfig(n_main=n, k_denoise=k, pool_sampling=sampling, seed=3, pool_source=source,
                         prefix_kind=kind, rho=rho or RhoConfig(strategy=RhoStrategy.FIXED, value=0.5),
                         online_pool=pool or OnlinePoolConfig(max_size=3, max_age=2, dedup=True, share=0.5))


def prob(uid, wrong=(), correct=None):
    extra = {} if correct is None else {"correct_answer_with_boxed": list(correct)}
    return Problem(uid=uid, index=0, prompt=({"role": "user", "content": uid},), ground_truth="1",
                   wrong_pool=tuple(wrong), extra=extra)


def verified(plan, answer):
    """Rollouts of a plan: answer(request) -> (text, accuracy, status); the completion ends with EOS."""
    out = []
    for req in plan.requests:
        text, acc, status = answer(req)
        comp = Completion(token_ids=tuple(char_encode(text)) + (EOS,), finish_reason="stop")
        out.append(Rollout(request=req, completion=comp, reward=acc, accuracy=acc, verifier_status=status))
    g = plan.group_size
    return [out[b * g:(b + 1) * g] for b in range(plan.num_problems)]


def build(problems, dn, step, state):
    return build_step_requests(problems, [(9, 9)] * len(problems), char_encode, dn, R, step, state=state)


# --------------------------------------------------------------------------------------------
# the online pool

def test_pool_dedup_cap_and_ageing_by_hand():
    pool = OnlinePool(max_size=2, max_age=3, dedup=True)
    assert pool.add("a", (1, 2), step=0) and not pool.add("a", (1, 2), step=1)      # duplicate skipped
    assert not pool.add("a", (), step=1)                                             # nothing to keep
    assert pool.add("a", (3,), step=1) and pool.add("a", (4,), step=2)               # cap 2: (1, 2) evicted
    assert [e.token_ids for e in pool.entries("a", 2)] == [(3,), (4,)]
    assert pool.add("a", (1, 2), step=2)  # no longer in the pool: not a duplicate any more; (3,) evicted
    assert pool.take_counts() == {"added": 4, "duplicates": 1, "evicted": 2, "expired": 0}
    # ageing: added at 2 -> drawable up to step 5 (5 - 2 = 3 = max_age), gone at 6
    assert [e.token_ids for e in pool.entries("a", 5)] == [(4,), (1, 2)]
    assert pool.entries("a", 6) == () and pool.expire(5) == 0 and pool.expire(6) == 2
    assert pool.sizes() == {} and pool.take_counts()["expired"] == 2
    nodedup = OnlinePool(max_size=5, max_age=None, dedup=False)
    nodedup.add("b", (7,), 0), nodedup.add("b", (7,), 0)
    assert len(nodedup.entries("b", 10 ** 6)) == 2  # max_age null: never ages


def test_refill_takes_wrong_boxed_main_rows_only_as_policy_ids_without_eos():
    dn = cfg()
    state = DenoiseState(dn)
    probs = [prob("p0"), prob("p1")]
    plan = build(probs, dn, 0, state)
    # step 0: no entry yet -> every denoise slot is an ordinary rollout (FALLBACK, empty_pool), counted
    assert [r.kind for r in plan.requests] == [RowKind.MAIN] * 2 + [RowKind.FALLBACK] * 2 + \
        [RowKind.MAIN] * 2 + [RowKind.FALLBACK] * 2
    assert plan.fallbacks == {FallbackReason.EMPTY_POOL.value: 4} and plan.problems_without_pool == 2

    def answer(r):  # p0: slot 0 wrong boxed, slot 1 correct; p1: slot 0 no box, slot 1 wrong; fallbacks wrong
        table = {("p0", 0): ("w0 \\boxed{5}", 0.0, "ok"), ("p0", 1): ("\\boxed{1}", 1.0, "ok"),
                 ("p1", 0): ("no box", 0.0, "no_box"), ("p1", 1): ("w1 \\boxed{6}", 0.0, "ok")}
        return table.get((r.problem_uid, r.slot), ("fallback \\boxed{9}", 0.0, "ok"))

    state.observe(verified(plan, answer), step=0)
    assert {u: [e.token_ids for e in state.online_entries(u, 1)] for u in ("p0", "p1")} == {
        "p0": [tuple(char_encode("w0 \\boxed{5}"))], "p1": [tuple(char_encode("w1 \\boxed{6}"))]}
    m = state.metrics()
    assert m["online_pool/entries"] == 2 and m["online_pool/problems"] == 2 and m["online_pool/added"] == 2

    # step 1: prefixes are the first p = floor(0.5 * 12) = 6 ids of the entry (token level), age 1
    plan = build(probs, dn, 1, state)
    den = [r for r in plan.requests if r.kind is RowKind.DENOISE]
    assert len(den) == 4 and plan.fallback_count == 0
    assert den[0].prefix.token_ids == tuple(char_encode("w0 \\bo")) and den[0].prefix.length == 6
    assert all(r.prefix.source == PoolSource.ONLINE and r.prefix.age == 1 for r in den)
    assert den[0].max_tokens == R - 6  # cutdown budget, as for offline prefixes


def test_correct_kind_takes_correct_rows_and_offline_correct_column():
    dn = cfg(kind=PrefixKind.CORRECT)
    state = DenoiseState(dn)
    plan = build([prob("p0")], dn, 0, state)
    state.observe(verified(plan, lambda r: ("\\boxed{1}", 1.0, "ok") if r.slot == 0 else ("\\boxed{2}", 0.0, "ok")),
                  step=0)
    assert [e.token_ids for e in state.online_entries("p0", 1)] == [tuple(char_encode("\\boxed{1}"))]
    # offline correct pool: the problem's correct_answer_with_boxed column, never its wrong pool
    off = cfg(source=PoolSource.OFFLINE, kind=PrefixKind.CORRECT)
    plan = build([prob("p0", wrong=["WRONG WRONG"], correct=["right answer"])], off, 0, None)
    den = [r for r in plan.requests if r.kind is RowKind.DENOISE]
    assert den[0].prefix.token_ids == tuple(char_encode("right "))  # floor(0.5 * 12) = 6
    plan = build([prob("p0", wrong=["WRONG WRONG"])], off, 0, None)  # no correct sample: fallback, counted
    assert plan.fallbacks == {FallbackReason.EMPTY_POOL.value: 2} and plan.problems_without_pool == 1


def test_mixed_draws_both_sources_with_the_configured_share_and_offline_default_is_unchanged():
    dn = cfg(source=PoolSource.MIXED, k=6)
    state = DenoiseState(dn)
    for step in range(3):  # fill each problem's online pool with one wrong answer
        probs = [prob(f"p{i}", wrong=["offline wrong text"]) for i in range(40)]
        plan = build(probs, dn, step, state)
        state.observe(verified(plan, lambda r: ("online \\boxed{3}", 0.0, "ok")), step)
    den = [r for r in plan.requests if r.kind is RowKind.DENOISE]
    share = sum(r.prefix.source == PoolSource.ONLINE for r in den) / len(den)
    assert len(den) == 240 and 0.4 < share < 0.6  # share 0.5: ~N(0.5, 0.03) over 240 seeded slots
    # the paper's configuration keeps no state and draws exactly what it drew before this issue
    paper = dataclasses.replace(cfg(source=PoolSource.OFFLINE), pool_sampling="random")
    assert DenoiseState.for_config(paper) is None
    a = build(probs, paper, 5, None)
    assert all(r.prefix.source == PoolSource.OFFLINE and r.prefix.age is None
               for r in a.requests if r.prefix is not None)


# --------------------------------------------------------------------------------------------
# the adaptive rho controller

def adaptive(scope=RhoScope.PROBLEM):
    return RhoConfig(strategy=RhoStrategy.ADAPTIVE, value=0.2, low=0.1, high=0.5, target=0.5, gain=0.2, scope=scope)


def test_controller_trajectory_for_a_given_pass_rate_sequence():
    # rho <- clip(rho + 0.2 * (r - 0.5), 0.1, 0.5), wrong prefixes (sign +1), start 0.2
    c = RhoController(adaptive(), PrefixKind.WRONG)
    rates = [1.0, 1.0, 1.0, 1.0, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.75]
    #            0.3  0.4  0.5  0.5(0.6 clipped)  0.5  0.4  0.3  0.2  0.1  0.1(0.0 clipped)  0.15
    want = [0.3, 0.4, 0.5, 0.5, 0.5, 0.4, 0.3, 0.2, 0.1, 0.1, 0.15]
    got = []
    for r in rates:
        c.update({"p": [1.0] * int(r * 4) + [0.0] * (4 - int(r * 4))})  # 4 denoise rows, r of them right
        got.append(c.rho("p"))
    assert got == pytest.approx(want, abs=1e-12)
    assert c.rho("other") == 0.2  # per problem: untouched problems keep the start value
    c.update({"other": []})        # no denoise row (all fallbacks): no update
    assert c.rho("other") == 0.2
    # correct prefixes: sign -1 (a longer correct prefix is easier): r = 1 shortens it
    # correct prefixes: sign -1 (a longer correct prefix is easier): 0.2 - 0.1 = 0.1; 0.1 + 0.1; 0.2 + 0.1
    c3 = RhoController(adaptive(), PrefixKind.CORRECT)
    seq = []
    for accs in ([1.0, 1.0], [0.0, 0.0], [0.0, 0.0]):
        c3.update({"p": accs})
        seq.append(c3.rho("p"))
    assert seq == pytest.approx([0.1, 0.2, 0.3])


def test_global_scope_pools_all_denoise_rows_of_a_batch():
    c = RhoController(adaptive(RhoScope.GLOBAL), PrefixKind.WRONG)
    c.update({"a": [1.0, 1.0, 1.0], "b": [0.0]})  # r = 3/4 over the batch -> 0.2 + 0.2 * 0.25 = 0.25
    assert c.rho("a") == c.rho("b") == c.rho("unseen") == pytest.approx(0.25)


def test_adaptive_rho_reaches_the_built_prefixes_and_follows_denoise_outcomes():
    dn = cfg(source=PoolSource.OFFLINE, rho=adaptive())
    state = DenoiseState.for_config(dn)
    probs = [prob("easy", wrong=["x" * 20]), prob("hard", wrong=["y" * 20])]
    lengths = []
    for step in range(3):
        plan = build(probs, dn, step, state)
        den = [r for r in plan.requests if r.kind is RowKind.DENOISE]
        lengths.append([r.prefix.length for r in den])
        state.observe(verified(plan, lambda r: ("\\boxed{1}", 1.0 if r.problem_uid == "easy" else 0.0, "ok")), step)
    # rho easy 0.2 -> 0.3 -> 0.4, hard 0.2 -> 0.1 -> 0.1; p = floor(rho * 20)
    assert lengths == [[4, 4, 4, 4], [6, 6, 2, 2], [8, 8, 2, 2]]
    with pytest.raises(ValueError, match="controller"):
        build(probs, dn, 0, None)


# --------------------------------------------------------------------------------------------
# resume equality

def scripted(req):
    """Deterministic outcomes from the request alone (its seed): varied texts, right and wrong."""
    right = req.seed % 3 == 0
    return (f"a{req.seed % 5} \\boxed{{{1 if right else 2}}}", 1.0 if right else 0.0, "ok")


def run_steps(dn, state, steps, probs):
    plans = []
    for step in steps:
        state.begin_step(step)
        plan = build(probs, dn, step, state)
        plans.append(plan.requests)
        state.observe(verified(plan, scripted), step)
    return plans


@pytest.mark.parametrize("source,kind,scope", [(PoolSource.ONLINE, PrefixKind.WRONG, RhoScope.PROBLEM),
                                               (PoolSource.MIXED, PrefixKind.CORRECT, RhoScope.GLOBAL)])
def test_resume_from_state_dict_draws_exactly_what_the_uninterrupted_run_draws(source, kind, scope):
    dn = dataclasses.replace(cfg(source=source, kind=kind, sampling="random",
                                 pool=OnlinePoolConfig(max_size=2, max_age=2, dedup=True, share=0.5)),
                             rho=adaptive(scope))
    probs = [prob(f"p{i}", wrong=["offline wrong " * 2], correct=["offline right " * 2]) for i in range(4)]
    whole = DenoiseState(dn)
    ref = run_steps(dn, whole, range(8), probs)
    first = DenoiseState(dn)
    part1 = run_steps(dn, first, range(4), probs)
    saved = json.loads(json.dumps(first.state_dict()))  # it travels in the checkpoint's meta.json
    resumed = DenoiseState(dn)
    resumed.load_state_dict(saved)
    part2 = run_steps(dn, resumed, range(4, 8), probs)
    assert part1 + part2 == ref
    assert resumed.state_dict() == whole.state_dict()
    den = [r for reqs in ref for r in reqs if r.prefix is not None]
    assert any(r.prefix.source == PoolSource.ONLINE for r in den)  # the online pool did act
    assert len({r.prefix.rho for r in den}) > 1                  # and the controller moved
    # a state saved by another configuration is refused, naming what differs
    with pytest.raises(ValueError, match="pool"):
        DenoiseState(dataclasses.replace(dn, pool_source=PoolSource.OFFLINE)).load_state_dict(saved)


# --------------------------------------------------------------------------------------------
# validation

@pytest.mark.parametrize("overrides,key", [
    (["denoise.pool_source=online", "denoise.k_denoise=0"], "denoise.pool_source"),
    (["denoise.prefix_kind=correct", "denoise.k_denoise=0"], "denoise.prefix_kind"),
    (["denoise.rho.strategy=adaptive", "denoise.k_denoise=0"], "denoise.rho.strategy"),
    (["denoise.pool_source=online", "denoise.n_main=0"], "denoise.n_main"),
    (["denoise.pool_source=mixed", "denoise.online_pool.share=0"], "denoise.online_pool.share"),
    (["denoise.pool_source=online", "denoise.online_pool.max_size=0"], "denoise.online_pool.max_size"),
    (["denoise.pool_source=online", "denoise.online_pool.max_age=0"], "denoise.online_pool.max_age"),
    (["denoise.rho.strategy=adaptive", "denoise.rho.value=0.05"], "denoise.rho.value"),
    (["denoise.rho.strategy=adaptive", "denoise.rho.target=1.0"], "denoise.rho.target"),
    (["denoise.rho.strategy=adaptive", "denoise.rho.gain=0"], "denoise.rho.gain"),
    (["denoise.prefix_kind=correct", "denoise.correct_pool_column=wrong_answer_with_boxed"],
     "denoise.correct_pool_column"),
])
def test_inconsistent_settings_fail_naming_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, overrides, world_size=1)
