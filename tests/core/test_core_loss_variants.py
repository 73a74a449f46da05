"""Issue 15's loss variants, by hand: GSPO, CISPO, truncated-IS weights, the Dr. GRPO constant
normaliser, the KL estimators (k1, k2, k3 clamped), empty micro-batches and CP ranks holding no
token of a sequence; and the mismatch metrics / corrections and the KL reward penalty
(core.mismatch)."""
from __future__ import annotations

import math

import pytest
import torch

from megatron_denoise.config.schema import MismatchConfig
from megatron_denoise.core.losses import LOSS_AGG_MODES, kl_penalty, policy_loss
from megatron_denoise.core.mismatch import engine_logprobs, kl_reward_penalty, measure_and_correct

F64 = torch.float64


def leaf(values):
    return torch.tensor(values, dtype=F64, requires_grad=True)


def test_gspo_sequence_ratio_and_clip_by_hand():
    # one row, two tokens, A = 1, old = 0. log ratios (log 1.1, log 1.3): the sequence ratio is the
    # geometric mean s = sqrt(1.1 * 1.3) = 1.195826 < 1.28: per-token value -s, gradient -s / 2 on
    # BOTH tokens (token-mean over 2), where PPO would give -1.1 / 2 and -1.3 / 2.
    logp = leaf([[math.log(1.1), math.log(1.3)]])
    s = math.sqrt(1.1 * 1.3)
    loss, m = policy_loss(logp, torch.zeros(1, 2), torch.tensor([1.0]), torch.ones(1, 2), clip_high=0.28,
                          policy_loss_type="gspo")
    assert loss.item() == pytest.approx(-s, abs=1e-12) and m["clip_fraction"].item() == 0.0
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.full((1, 2), -s / 2, dtype=F64))
    # (log 1.2, log 1.6): s = sqrt(1.92) = 1.3856 > 1.28 clips the WHOLE sequence, also token 0
    # whose own ratio 1.2 would not clip: value -1.28, no gradient.
    logp2 = leaf([[math.log(1.2), math.log(1.6)]])
    loss2, m2 = policy_loss(logp2, torch.zeros(1, 2), torch.tensor([1.0]), torch.ones(1, 2), clip_high=0.28,
                            policy_loss_type="gspo")
    assert loss2.item() == pytest.approx(-1.28) and m2["clip_fraction"].item() == 1.0
    loss2.backward()
    assert float(logp2.grad.abs().max()) == 0.0
    # packed layout, two sequences (the second is the first one's numbers): the same per sequence
    lp = leaf([math.log(1.1), math.log(1.3), math.log(1.1), math.log(1.3)])
    packed, _ = policy_loss(lp, torch.zeros(4), torch.ones(4), torch.ones(4), clip_high=0.28,
                            policy_loss_type="gspo", seq_ids=torch.tensor([0, 0, 1, 1]))
    assert packed.item() == pytest.approx(-s, abs=1e-12)
    packed.backward()
    torch.testing.assert_close(lp.grad, torch.full((4,), -s / 4, dtype=F64))


def test_cispo_keeps_every_token_with_a_clipped_stop_gradient_weight():
    # ratios (1.5, 0.5, 1.0), A (1, -1, 2), clip_low 0.2, cispo_clip_high 0.28: weights
    # w = (1.28, 0.8, 1.0); value -A w = (-1.28, 0.8, -2), token-mean -2.48 / 3; gradient -A w / 3
    # on EVERY token (PPO: 0 on the two clipped ones).
    logp = leaf([[math.log(1.5), math.log(0.5), 0.0]])
    adv = torch.tensor([[1.0, -1.0, 2.0]])
    loss, m = policy_loss(logp, torch.zeros(1, 3), adv, torch.ones(1, 3), clip_low=0.2, cispo_clip_high=0.28,
                          policy_loss_type="cispo")
    assert loss.item() == pytest.approx(-2.48 / 3, abs=1e-12)
    assert m["clip_fraction"].item() == pytest.approx(2 / 3)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-1.28 / 3, 0.8 / 3, -2 / 3]], dtype=F64))


def test_is_weights_scale_the_policy_term_only():
    # on-policy, A = 1, weights (0.5, 2): loss (-0.5 - 2) / 2, gradient (-0.25, -1); the entropy
    # and KL terms are not reweighted.
    logp = leaf([[-1.0, -2.0]])
    w = torch.tensor([[0.5, 2.0]])
    loss, m = policy_loss(logp, None, torch.tensor([1.0]), torch.ones(1, 2), force_on_policy=True, is_weights=w)
    assert loss.item() == pytest.approx(-1.25) and m["pg_loss"].item() == pytest.approx(-1.25)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-0.25, -1.0]], dtype=F64))
    ent = torch.tensor([[1.0, 1.0]])
    loss2, _ = policy_loss(logp.detach(), None, torch.tensor([1.0]), torch.ones(1, 2), force_on_policy=True,
                           is_weights=w, entropy=ent, entropy_coef=0.1)
    assert loss2.item() == pytest.approx(-1.25 - 0.1)


def test_dr_grpo_constant_normaliser():
    # rows A = (1, -3), masks (1 1 0) and (1 0 0), on-policy: token sum -1 - 1 + 3 = 1 over
    # 2 sequences x L = 3: 1/6, whatever the lengths; gradient -A / 6 on the loss tokens.
    logp = leaf([[-1.0, -1.0, -1.0], [-1.0, -1.0, -1.0]])
    mask = torch.tensor([[1., 1., 0.], [1., 0., 0.]])
    loss, _ = policy_loss(logp, None, torch.tensor([1.0, -3.0]), mask, force_on_policy=True,
                          loss_agg="seq-mean-token-sum-norm", loss_norm_tokens=3)
    assert loss.item() == pytest.approx(1 / 6)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-1 / 6, -1 / 6, 0.0], [0.5, 0.0, 0.0]], dtype=F64))
    with pytest.raises(ValueError, match="loss_norm_tokens"):
        policy_loss(logp, None, torch.tensor([1.0, -3.0]), mask, force_on_policy=True,
                    loss_agg="seq-mean-token-sum-norm")


def test_kl_estimators_by_hand_and_k3_clamp():
    lp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])  # log q = log 2
    assert kl_penalty(lp, ref, "k1").item() == pytest.approx(math.log(2))
    assert kl_penalty(lp, ref, "k2").item() == pytest.approx(0.5 * math.log(2) ** 2)
    assert kl_penalty(lp, ref, "k3").item() == pytest.approx(0.5 + math.log(2) - 1)
    # log q = -20: exp(20) - 21 is clamped to 10 (verl's low_var_kl), no gradient beyond the clamp
    x = leaf([-20.0])
    k3 = kl_penalty(x, torch.zeros(1, dtype=F64), "k3")
    assert k3.item() == 10.0
    k3.sum().backward()
    assert x.grad.item() == 0.0
    # gradients: d k1 / d logp = 1; d k2 = log q; d k3 = 1 - exp(-log q)  (at log q = log 2: 0.5)
    for kind, want in (("k1", 1.0), ("k2", math.log(2)), ("k3", 0.5)):
        y = leaf([math.log(0.5)])
        kl_penalty(y, torch.tensor([math.log(0.25)], dtype=F64), kind).sum().backward()
        assert y.grad.item() == pytest.approx(want), kind


def test_empty_micro_batch_and_cp_rank_without_a_sequence():
    # an empty micro-batch: padding only, seq_num_tokens of shape (0,) -> 0 for every mode (the
    # crash of issue 15: "seq_num_tokens has shape (0,), expected (1,)")
    for agg in LOSS_AGG_MODES:
        x = leaf([-1.0, -2.0, -3.0])
        loss, m = policy_loss(x, torch.zeros(3), torch.zeros(3), torch.zeros(3), loss_agg=agg,
                              seq_ids=torch.zeros(3, dtype=torch.long), seq_num_tokens=torch.zeros(0),
                              global_num_tokens=7, global_num_seqs=2, loss_norm_tokens=5)
        loss.backward()
        assert loss.item() == 0.0 and float(x.grad.abs().max()) == 0.0, agg
    # a CP rank holding tokens of local sequences 0 and 2 only (seq 1 lives on the other rank):
    # on-policy, A = (1, 5, -1) per sequence; seq-mean-token-mean = (-2 / 3 + 2 / 4) / 3 sequences
    x = leaf([-1.0, -1.0, -1.0, -1.0])
    seq_ids = torch.tensor([0, 0, 2, 2])
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    loss, _ = policy_loss(x, None, adv, torch.ones(4), force_on_policy=True, loss_agg="seq-mean-token-mean",
                          seq_ids=seq_ids, seq_num_tokens=torch.tensor([3.0, 2.0, 4.0]), global_num_seqs=3)
    assert loss.item() == pytest.approx((-2 / 3 + 2 / 4) / 3)
    loss.backward()
    torch.testing.assert_close(x.grad, torch.tensor([-1 / 9, -1 / 9, 1 / 12, 1 / 12], dtype=F64))


# ------------------------------------------------------------------------------------ mismatch
def _rows_of_kinds():
    # 3 rows, W = 6. train log-probs vs engine: row 0 (main) ratios e^0.1, e^-0.1 on its 2
    # continuation tokens; row 1 (denoise, prefix of 2 at positions 2-3 without engine log-probs)
    # ratios e^1 and e^0 on positions 4-5; row 2 (main) no engine log-probs at all.
    train = torch.zeros(3, 6)
    eng = torch.zeros(3, 6)
    have = torch.zeros(3, 6)
    train[0, 2], train[0, 3] = 0.1, -0.1
    have[0, 2:4] = 1
    train[1, 4] = 1.0
    have[1, 4:6] = 1
    mask = torch.zeros(3, 6)
    mask[0, 2:4] = 1
    mask[1, 2:6] = 1  # shift mode: the prefix is trained too, yet never measured
    mask[2, 2:5] = 1
    return train, eng, have, mask, ["main", "denoise", "main"]


def test_mismatch_metrics_by_hand_per_row_kind():
    train, eng, have, mask, kinds = _rows_of_kinds()
    res = measure_and_correct(train, eng, have, mask, kinds, MismatchConfig(threshold=2.0))
    m = res.metrics
    e = math.e
    assert m["mismatch/main/tokens"] == 2 and m["mismatch/denoise/tokens"] == 2
    assert m["mismatch/main/ratio_mean"] == pytest.approx((math.exp(0.1) + math.exp(-0.1)) / 2)
    assert m["mismatch/main/ratio_max"] == pytest.approx(math.exp(0.1))
    assert m["mismatch/main/k3"] == pytest.approx(((math.exp(0.1) - 1.1) + (math.exp(-0.1) - 0.9)) / 2)
    assert m["mismatch/main/frac_beyond"] == 0.0
    assert m["mismatch/denoise/ratio_mean"] == pytest.approx((e + 1) / 2)
    assert m["mismatch/denoise/ratio_max"] == pytest.approx(e)
    assert m["mismatch/denoise/k3"] == pytest.approx((e - 2) / 2)
    assert m["mismatch/denoise/frac_beyond"] == 0.5  # e > 2
    assert res.is_weights is None and torch.equal(res.loss_mask, mask)  # corrections off by default


def test_truncated_is_and_sequence_masking_by_hand():
    train, eng, have, mask, kinds = _rows_of_kinds()
    res = measure_and_correct(train, eng, have, mask, kinds,
                              MismatchConfig(tis_cap=1.5, seq_mask_low=0.5, seq_mask_high=1.5))
    w = res.is_weights
    assert w[0, 2].item() == pytest.approx(math.exp(0.1)) and w[0, 3].item() == pytest.approx(math.exp(-0.1))
    assert w[1, 4].item() == pytest.approx(1.5)   # e truncated at the cap
    assert w[1, 2].item() == 1.0 and w[1, 5].item() == 1.0 and w[2, 3].item() == 1.0  # prefix / no engine lp
    # sequence ratios: row 0 exp(0) = 1 (kept), row 1 exp(1 / 2) = 1.6487 > 1.5 (dropped), row 2 unmeasured (kept)
    assert res.seq_ratio[1].item() == pytest.approx(math.exp(0.5))
    assert torch.equal(res.loss_mask[0], mask[0]) and torch.equal(res.loss_mask[2], mask[2])
    assert float(res.loss_mask[1].sum()) == 0.0
    assert res.metrics["mismatch/denoise/seq_masked"] == 1.0 and res.metrics["mismatch/main/seq_masked"] == 0.0
    assert res.metrics["mismatch/denoise/tis_clipped"] == 0.5


def test_engine_logprobs_cover_the_continuation_only():
    from types import SimpleNamespace as NS

    rows = [NS(prefix_length=0, completion=NS(logprobs=(-0.5, -1.0))),
            NS(prefix_length=2, completion=NS(logprobs=(-2.0,))),
            NS(prefix_length=0, completion=NS(logprobs=None))]
    lp, have = engine_logprobs(rows, torch.tensor([3, 3, 2]), 7)
    assert have[0].tolist() == [0, 0, 0, 1, 1, 0, 0] and lp[0, 3].item() == -0.5 and lp[0, 4].item() == -1.0
    assert have[1].tolist() == [0, 0, 0, 0, 0, 1, 0] and lp[1, 5].item() == -2.0  # after the 2 prefix tokens
    assert have[2].sum() == 0


def test_kl_reward_penalty_by_hand():
    logp = torch.tensor([[0.0, math.log(0.5), math.log(0.5)], [0.0, 0.0, 0.0]])
    ref = torch.tensor([[0.0, math.log(0.25), math.log(0.5)], [0.0, 0.0, math.log(0.5)]])
    mask = torch.tensor([[0., 1., 1.], [0., 1., 1.]])
    pen = kl_reward_penalty(logp, ref, mask, 0.1, "k1")
    assert pen.tolist() == pytest.approx([0.1 * math.log(2), 0.1 * math.log(2)])
    pen3 = kl_reward_penalty(logp, ref, mask, 0.1, "k3")
    # row 0: k3 at log q = log 2 is 0.5 + log 2 - 1; row 1: at log q = log 2 again (0 - log .5)
    assert pen3.tolist() == pytest.approx([0.1 * (math.log(2) - 0.5)] * 2)
