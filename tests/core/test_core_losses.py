"""The policy-loss reference: hand-computed values, dual clip, force_on_policy, KL/entropy, and the
micro-batch split invariance of every aggregation mode (property test)."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from megatron_denoise.core.losses import LOSS_AGG_MODES, kl_penalty, local_loss_counts, policy_loss

F64 = torch.float64  # property tests compare to 1e-12: float64 throughout (never set the global default)
T_NORM = 5.0  # the Dr. GRPO constant of seq-mean-token-sum-norm in the property tests


def leaf(values):
    return torch.tensor(values, dtype=torch.float64, requires_grad=True)


def test_clipped_surrogate_by_hand():
    # ratios (1.5, 0.5, 1.0), advantages (1, -1, 2), clip 0.2 / 0.28 (DAPO clip-higher):
    #  t0: A=1,  r=1.5: max(-1.5, -1.28) = -1.28 (clipped)
    #  t1: A=-1, r=0.5: max(0.5, 0.8)    =  0.8  (clipped)
    #  t2: A=2,  r=1.0: -2
    #  token-mean = (-1.28 + 0.8 - 2) / 3 = -0.8266667; clip fraction 2/3; ratio mean 1.0
    old = torch.zeros(1, 3)
    logp = leaf([[math.log(1.5), math.log(0.5), 0.0]])
    adv = torch.tensor([[1.0, -1.0, 2.0]])
    loss, m = policy_loss(logp, old, adv, torch.ones(1, 3), clip_low=0.2, clip_high=0.28,
                          global_num_tokens=3)
    assert loss.item() == pytest.approx(-2.48 / 3, abs=1e-12)
    assert m["clip_fraction"].item() == pytest.approx(2 / 3)
    assert m["ratio_mean"].item() == pytest.approx(1.0)
    assert m["pg_loss"].item() == pytest.approx(-2.48 / 3)
    loss.backward()
    # Clipped tokens carry no gradient; t2: d(-A r)/dlogp = -A r / 3 = -2/3.
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, 0.0, -2 / 3]], dtype=F64))
    # The clip fraction (and the other token metrics) use the global count: 2 clipped of 6 tokens.
    _, m6 = policy_loss(logp, old, adv, torch.ones(1, 3), clip_low=0.2, clip_high=0.28, global_num_tokens=6)
    assert m6["clip_fraction"].item() == pytest.approx(1 / 3)


def test_dual_clip_caps_negative_advantage_losses():
    # A = -1, r = 20: PPO gives max(20, 1.28) = 20; dual clip c = 10 caps it to 10 with no gradient.
    # A = -1, r = 5: 5 < 10, unchanged, gradient -A r = 5.  A = +1, r = 20: clipped to -1.28 either way.
    logp = leaf([[math.log(20.0), math.log(5.0), math.log(20.0)]])
    adv = torch.tensor([[-1.0, -1.0, 1.0]])
    mask = torch.ones(1, 3)
    plain, _ = policy_loss(logp, torch.zeros(1, 3), adv, mask, clip_low=0.2, clip_high=0.28, global_num_tokens=3)
    assert plain.item() == pytest.approx((20 + 5 - 1.28) / 3)
    dual, m = policy_loss(logp, torch.zeros(1, 3), adv, mask, clip_low=0.2, clip_high=0.28, dual_clip=10.0,
                          global_num_tokens=3)
    assert dual.item() == pytest.approx((10 + 5 - 1.28) / 3)
    assert m["dual_clip_fraction"].item() == pytest.approx(1 / 3)
    dual.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, 5 / 3, 0.0]], dtype=F64))
    with pytest.raises(ValueError, match="dual_clip"):
        policy_loss(logp, torch.zeros(1, 3), adv, mask, dual_clip=1.0)


def test_force_on_policy_ratio_is_one_and_gradient_is_minus_advantage():
    logp = leaf([[-1.0, -2.0, -0.5], [-0.3, -0.2, -4.0]])
    adv = torch.tensor([2.0, -1.0])  # per row, broadcast over tokens
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    garbage_old = torch.full((2, 3), 50.0)  # ignored: old := logp.detach()
    loss, m = policy_loss(logp, garbage_old, adv, mask, force_on_policy=True, global_num_tokens=3)
    # loss = (-2 - 2 + 1) / 3 = -1; gradient = -A * mask / 3
    assert loss.item() == pytest.approx(-1.0)
    assert m["ratio_mean"].item() == pytest.approx(1.0) and m["clip_fraction"].item() == 0.0
    assert m["approx_kl"].item() == 0.0
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-2 / 3, -2 / 3, 0.0], [1 / 3, 0.0, 0.0]], dtype=F64))
    with pytest.raises(ValueError, match="old_logprobs is required"):
        policy_loss(logp, None, adv, mask)


@pytest.mark.parametrize("agg,expected", [
    # rows: A = +1 on 2 tokens, A = -3 on 1 token (force_on_policy -> per-token loss -A)
    ("token-mean", (-1 - 1 + 3) / 3),                 # 1/3
    ("seq-mean-token-sum", ((-1 - 1) + 3) / 2),       # 0.5
    ("seq-mean-token-mean", ((-2 / 2) + 3 / 1) / 2),  # 1.0
])
def test_each_aggregation_by_hand(agg, expected):
    logp = leaf([[-1.0, -1.0, -1.0], [-1.0, -1.0, -1.0]])
    adv = torch.tensor([1.0, -3.0])
    mask = torch.tensor([[1., 1., 0.], [1., 0., 0.]])
    tokens, seqs = local_loss_counts(mask)
    assert (tokens.item(), seqs.item()) == (3.0, 2.0)
    loss, _ = policy_loss(logp, None, adv, mask, force_on_policy=True, loss_agg=agg,
                          global_num_tokens=tokens, global_num_seqs=seqs)
    assert loss.item() == pytest.approx(expected)
    # The defaults (local counts) equal the explicit global counts for an unsplit batch.
    local, _ = policy_loss(logp, None, adv, mask, force_on_policy=True, loss_agg=agg)
    assert local.item() == pytest.approx(expected)
    # Doubling the global denominator (another rank holds as much again) halves this part.
    half, _ = policy_loss(logp, None, adv, mask, force_on_policy=True, loss_agg=agg,
                          global_num_tokens=2 * tokens, global_num_seqs=2 * seqs)
    assert half.item() == pytest.approx(expected / 2)


def test_packed_layout_matches_padded():
    logp2 = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.7, 0.0]])
    old2 = logp2 + torch.tensor([[0.1, -0.3, 0.0], [0.2, 0.05, 0.0]])
    mask2 = torch.tensor([[1., 1., 1.], [1., 1., 0.]])
    adv = torch.tensor([1.0, -2.0])
    keep = mask2.reshape(-1) > 0
    seq_ids = torch.tensor([0, 0, 0, 1, 1])
    for agg in LOSS_AGG_MODES:
        a, _ = policy_loss(logp2, old2, adv, mask2, loss_agg=agg, loss_norm_tokens=4)
        b, _ = policy_loss(logp2.reshape(-1)[keep], old2.reshape(-1)[keep], adv[seq_ids], torch.ones(5),
                           loss_agg=agg, seq_ids=seq_ids, loss_norm_tokens=4)
        assert a.item() == pytest.approx(b.item()), agg
    with pytest.raises(ValueError, match="need seq_ids"):
        policy_loss(torch.zeros(3), None, torch.zeros(3), torch.ones(3), force_on_policy=True,
                    loss_agg="seq-mean-token-sum")


def test_kl_and_entropy_terms_by_hand():
    # logp = log .5, ref = log .25: k1 = log 2 = 0.6931472, k3 = .5 + log 2 - 1 = 0.1931472
    lp, ref = torch.tensor([math.log(.5)]), torch.tensor([math.log(.25)])
    assert kl_penalty(lp, ref, "k1").item() == pytest.approx(math.log(2))
    assert kl_penalty(lp, ref, "k3").item() == pytest.approx(0.5 + math.log(2) - 1)
    assert kl_penalty(lp, ref, "k2").item() == pytest.approx(0.5 * math.log(2) ** 2)
    with pytest.raises(ValueError, match="algorithm.kl.type"):
        kl_penalty(lp, ref, "k5")
    logp = leaf([[math.log(.5), math.log(.5)]])
    ref2 = torch.full((1, 2), math.log(.25))
    ent = torch.tensor([[1.0, 2.0]])
    adv = torch.tensor([1.0])
    # per token: -A + 0.1 * k3 - 0.01 * H; mean over 2 tokens = -1 + 0.1 * 0.1931472 - 0.01 * 1.5
    loss, m = policy_loss(logp, None, adv, torch.ones(1, 2), force_on_policy=True, entropy=ent, entropy_coef=0.01,
                          ref_logprobs=ref2, kl_coef=0.1, kl_type="k3")
    assert loss.item() == pytest.approx(-1 + 0.1 * (0.5 + math.log(2) - 1) - 0.015)
    assert m["entropy"].item() == pytest.approx(1.5) and m["kl"].item() == pytest.approx(0.5 + math.log(2) - 1)
    assert m["pg_loss"].item() == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="kl_coef != 0 needs ref_logprobs"):
        policy_loss(logp, None, adv, torch.ones(1, 2), force_on_policy=True, kl_coef=0.1)
    with pytest.raises(ValueError, match="algorithm.loss_agg"):
        policy_loss(logp, None, adv, torch.ones(1, 2), force_on_policy=True, loss_agg="sum")


def test_all_masked_batch_is_zero_not_nan():
    logp = leaf([[-1.0, -2.0]])
    for agg in LOSS_AGG_MODES:
        loss, m = policy_loss(logp, None, torch.tensor([1.0]), torch.zeros(1, 2), force_on_policy=True, loss_agg=agg,
                              loss_norm_tokens=2)
        assert loss.item() == 0.0 and not math.isnan(m["clip_fraction"].item())


# ---------------------------------------------------------------- micro-batch split invariance
@st.composite
def batches(draw):
    rows = draw(st.integers(1, 6))
    T = draw(st.integers(1, 5))
    seed = draw(st.integers(0, 2**31 - 1))
    cuts = sorted(set(draw(st.lists(st.integers(1, rows - 1), max_size=rows - 1)))) if rows > 1 else []
    on_policy = draw(st.booleans())
    dual = draw(st.sampled_from([None, 3.0]))
    return rows, T, seed, cuts, on_policy, dual


def _loss_and_grad(logp_all, old, adv, mask, pieces, agg, on_policy, dual, **extra):
    tokens, seqs = local_loss_counts(mask)  # the global counts (summed over every micro-batch)
    logp = logp_all.detach().clone().requires_grad_(True)
    total = torch.zeros((), dtype=F64)
    metrics_sum = torch.zeros((), dtype=F64)
    for sl in pieces:
        loss, m = policy_loss(logp[sl], old[sl], adv[sl], mask[sl], clip_low=0.2, clip_high=0.28, dual_clip=dual,
                              force_on_policy=on_policy, loss_agg=agg, global_num_tokens=tokens,
                              global_num_seqs=seqs, loss_norm_tokens=T_NORM, **extra)
        loss.backward()  # gradients accumulate over micro-batches as in the trainer
        total = total + loss.detach()
        metrics_sum = metrics_sum + m["clip_fraction"]
    return total, logp.grad, metrics_sum


@settings(max_examples=60, deadline=None, database=None)  # no .hypothesis/ folder in the repo
@given(batches())
def test_micro_batch_split_gives_whole_batch_loss_and_gradient(batch):
    rows, T, seed, cuts, on_policy, dual = batch
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(rows, T, generator=g, dtype=F64) * 3
    old = logp + 0.5 * torch.randn(rows, T, generator=g, dtype=F64)  # ratios in a range where the clips bind
    adv = torch.randn(rows, generator=g, dtype=F64)
    mask = (torch.rand(rows, T, generator=g, dtype=F64) > 0.3).to(torch.float64)
    whole = [slice(0, rows)]
    bounds = [0] + cuts + [rows]
    split = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
    for agg in LOSS_AGG_MODES:
        l1, g1, c1 = _loss_and_grad(logp, old, adv, mask, whole, agg, on_policy, dual)
        l2, g2, c2 = _loss_and_grad(logp, old, adv, mask, split, agg, on_policy, dual)
        torch.testing.assert_close(l2, l1, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(g2, g1, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(c2, c1, rtol=1e-12, atol=1e-12)


@settings(max_examples=40, deadline=None, database=None)
@given(st.integers(2, 12), st.integers(0, 2**31 - 1), st.data())
def test_packed_token_split_inside_a_sequence(T, seed, data):
    """Packed tokens cut anywhere (a sequence spread over micro-batches or CP ranks): with the global
    counts and each sequence's full token count, the sum equals the whole batch for every mode."""
    g = torch.Generator().manual_seed(seed)
    seq_ids = torch.sort(torch.randint(0, 3, (T,), generator=g)).values
    logp = -torch.rand(T, generator=g, dtype=F64) * 3
    old = logp + 0.5 * torch.randn(T, generator=g, dtype=F64)
    adv = torch.randn(3, generator=g, dtype=F64)[seq_ids]
    mask = (torch.rand(T, generator=g, dtype=F64) > 0.2).to(torch.float64)
    tokens, seqs = local_loss_counts(mask, seq_ids)
    full_counts = torch.zeros(3, dtype=torch.float64).index_add(0, seq_ids, mask)
    cuts = sorted(set(data.draw(st.lists(st.integers(1, T - 1), max_size=3))))
    bounds = [0] + cuts + [T]
    for agg in LOSS_AGG_MODES:
        grads = []
        totals = []
        for pieces in ([slice(0, T)], [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]):
            x = logp.clone().requires_grad_(True)
            total = torch.zeros((), dtype=F64)
            for sl in pieces:
                # Each micro-batch keeps the global sequence ids (unused ids simply contribute 0).
                loss, _ = policy_loss(x[sl], old[sl], adv[sl], mask[sl], loss_agg=agg, seq_ids=seq_ids[sl],
                                      seq_num_tokens=full_counts[: int(seq_ids[sl].max()) + 1],
                                      global_num_tokens=tokens, global_num_seqs=seqs, loss_norm_tokens=T_NORM)
                loss.backward()
                total = total + loss.detach()
            grads.append(x.grad)
            totals.append(total)
        torch.testing.assert_close(totals[1], totals[0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(grads[1], grads[0], rtol=1e-12, atol=1e-12)
