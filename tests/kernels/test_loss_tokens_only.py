"""trainer.loss_tokens_only: the policy loss's output layer on the loss tokens only.

`policy_loss_from_hidden` with loss_tokens_only=True hands the kernel the rows of loss_mask and
spreads log-probs / entropy back; with False it hands it every packed token (the old path). A
masked token adds exactly 0 to the loss and to every gradient, so the two must agree on the loss,
the metrics, dL/dhidden (0 on masked rows) and dL/dweight, for every aggregation, policy loss and
per-token input (old / reference log-probs, IS weights); they differ only in the summation order
over tokens. No processes: tp_group None.
"""
from __future__ import annotations

import pytest
import torch

from megatron_denoise.config.schema import AlgorithmConfig, KLConfig, KLUse, LossAgg, LossImpl, PolicyLoss
from megatron_denoise.megatron.logprobs import loss_token_rows, policy_loss_from_hidden

from kernels_testlib import AGGS, make_case

TOL = dict(atol=1e-5, rtol=1e-5)


def _run(case, algo, impl, only, ref_logprobs=None, is_weights=None):
    h = case.hidden.detach().clone().requires_grad_(True)
    w = case.weight.detach().clone().requires_grad_(True)
    n_seq = int(case.seq_ids.max()) + 1
    seq_num_tokens = torch.zeros(n_seq).index_add_(0, case.seq_ids, case.mask)
    loss, lp, ent, metrics = policy_loss_from_hidden(
        h, w, 0, case.vocab_size, case.targets, case.mask, case.advantages * case.mask,
        None if algo.force_on_policy else case.old_logprobs, tp_group=None, algo=algo,
        global_num_tokens=float(case.mask.sum() + 7), global_num_seqs=5.0, seq_ids=case.seq_ids,
        seq_num_tokens=seq_num_tokens, ref_logprobs=ref_logprobs, is_weights=is_weights, loss_norm_tokens=40.0,
        impl=impl, loss_tokens_only=only)
    loss.backward()
    return dict(loss=loss.detach(), logprobs=lp, entropy=ent, grad_hidden=h.grad, grad_weight=w.grad,
                **{"metric/" + k: torch.as_tensor(float(v)) for k, v in metrics.items()})


def _assert_same(only: dict, full: dict, mask: torch.Tensor) -> None:
    keep = mask != 0
    assert set(only) == set(full)
    for key in full:
        got, want = only[key], full[key]
        if key in ("logprobs", "entropy"):  # at the loss tokens; 0 elsewhere
            torch.testing.assert_close(got[keep], want[keep], **TOL, msg=lambda m, k=key: f"{k}: {m}")
            assert bool((got[~keep] == 0).all()), key
        else:
            torch.testing.assert_close(got, want, **TOL, msg=lambda m, k=key: f"{k}: {m}")
    assert bool((only["grad_hidden"][~keep] == 0).all())  # a masked token's row gets exactly 0
    assert float(only["grad_hidden"][keep].abs().max()) > 0 and float(only["grad_weight"].abs().max()) > 0


@pytest.mark.parametrize("impl", [LossImpl.FUSED, LossImpl.TORCH])
@pytest.mark.parametrize("agg", AGGS)
def test_loss_tokens_only_equals_every_token(impl, agg):
    case = make_case()
    assert 0 < int(case.mask.sum()) < case.mask.numel()  # prompts to drop, loss tokens to keep
    algo = AlgorithmConfig(loss_agg=LossAgg(agg), force_on_policy=False, dual_clip=3.0, clip_high=0.28,
                           entropy_coeff=0.01)
    _assert_same(_run(case, algo, impl, True), _run(case, algo, impl, False), case.mask)


@pytest.mark.parametrize("policy_loss", [PolicyLoss.GSPO, PolicyLoss.CISPO])
def test_loss_tokens_only_with_sequence_ratios_kl_and_is_weights(policy_loss):
    """Per-token inputs are picked with the tokens: reference log-probs (KL in the loss), truncated
    IS weights; GSPO's sequence ratio groups the picked tokens by their seq_ids."""
    case = make_case(seed=3)
    g = torch.Generator().manual_seed(5)
    ref = case.old_logprobs + 0.3 * torch.randn(case.mask.shape, generator=g)
    isw = torch.rand(case.mask.shape, generator=g) + 0.5
    algo = AlgorithmConfig(policy_loss=policy_loss, loss_agg=LossAgg.SEQ_MEAN_TOKEN_MEAN, force_on_policy=False,
                           kl=KLConfig(coef=0.05, use=KLUse.LOSS))
    _assert_same(_run(case, algo, LossImpl.FUSED, True, ref, isw), _run(case, algo, LossImpl.FUSED, False, ref, isw),
                 case.mask)


def test_loss_token_rows_keeps_every_token_when_there_is_nothing_to_drop_or_to_keep():
    assert loss_token_rows(torch.tensor([0.0, 1.0, 0.0, 2.0])).tolist() == [1, 3]
    assert loss_token_rows(torch.ones(4)) is None      # nothing to drop
    assert loss_token_rows(torch.zeros(4)) is None     # all masked: the kernel still runs on all T
