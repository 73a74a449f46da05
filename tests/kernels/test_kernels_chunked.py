"""Chunked CPU path of the fused policy loss vs the full-logits reference (forward and backward)."""
from __future__ import annotations

import pytest
import torch

from kernels_testlib import (AGGS, BF16_TOL, FP32_TOL, assert_clipping_binds, assert_parity, loss_kwargs,
                             make_case, reference, run)
from megatron_denoise.kernels import fused_policy_loss, resolve_impl, vocab_parallel_logprobs
from megatron_denoise.kernels.chunked import chunked_grads, chunked_stats
from megatron_denoise.kernels.reference import full_logprobs_and_entropy
from megatron_denoise.kernels.stats import combine_shard_list, combine_stats

torch.set_num_threads(1)


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("grad_mode", ["in_forward", "recompute"])
def test_parity_fp32_every_aggregation(agg: str, grad_mode: str) -> None:
    # 56 padded rows beyond the 203 real ids; chunks of 16 tokens do not divide T = 50.
    case = make_case(vocab_size=203, padded_rows=208)
    kw = loss_kwargs(case, agg)
    want = reference(case, **kw)
    assert_clipping_binds(want)
    got = run(fused_policy_loss, case, case.hidden, case.weight, impl="chunked", grad_mode=grad_mode,
              chunk_tokens=16, **kw)
    assert_parity(got, want, FP32_TOL, f"{agg}/{grad_mode}: ")
    assert torch.all(got["grad_weight"][203:] == 0), "padding rows must get no gradient"


def test_force_on_policy_hand_value_and_kl() -> None:
    case = make_case(seed=1)
    kw = loss_kwargs(case, "token-mean", force_on_policy=True, entropy_coef=0.0, dual_clip=None)
    want = reference(case, **kw)
    got = run(fused_policy_loss, case, case.hidden, case.weight, impl="chunked", chunk_tokens=8, **kw)
    assert_parity(got, want, FP32_TOL)
    # ratio == 1: nothing is clipped and the loss is -sum(A * mask) / global_tokens
    assert got["clip_fraction"] == 0
    hand = -(case.advantages * case.mask).sum() / kw["global_num_tokens"]
    torch.testing.assert_close(got["loss"], hand, **FP32_TOL)
    # a k3 KL term against reference log-probs goes through the same per-token gradient path
    ref_lp = case.old_logprobs + 0.1
    kw_kl = dict(kw, ref_logprobs=ref_lp, kl_coef=0.5, force_on_policy=False, dual_clip=3.0)
    assert_parity(run(fused_policy_loss, case, case.hidden, case.weight, impl="chunked", chunk_tokens=8, **kw_kl),
                  reference(case, **kw_kl), FP32_TOL, "kl: ")


def test_parity_bf16() -> None:
    case = make_case(dtype=torch.bfloat16, vocab_size=203, padded_rows=208, seed=2)
    for agg in ("token-mean", "seq-mean-token-mean"):
        kw = loss_kwargs(case, agg)
        want = reference(case, **kw)
        for grad_mode in ("in_forward", "recompute"):
            got = run(fused_policy_loss, case, case.hidden, case.weight, impl="chunked", grad_mode=grad_mode,
                      chunk_tokens=16, **kw)
            assert got["grad_weight"].dtype == torch.bfloat16 and got["grad_hidden"].dtype == torch.bfloat16
            assert_parity(got, want, BF16_TOL, f"bf16 {agg}/{grad_mode}: ")


def test_chunk_size_does_not_change_results() -> None:
    case = make_case(T=33, seed=3)
    kw = loss_kwargs(case, "seq-mean-token-mean")
    base = run(fused_policy_loss, case, case.hidden, case.weight, impl="chunked", chunk_tokens=33, **kw)
    for c in (1, 5, 64):
        assert_parity(run(fused_policy_loss, case, case.hidden, case.weight, impl="chunked", chunk_tokens=c, **kw),
                      base, FP32_TOL, f"chunk {c}: ")


def test_emulated_tensor_parallel_shards() -> None:
    """Three uneven shards (the last one only padding) combined in one process equal the full vocab."""
    case = make_case(vocab_size=203, padded_rows=210, seed=4)
    shard = 70  # shards [0, 70), [70, 140), [140, 210): ids 203..209 are padding
    want_lp, want_ent = full_logprobs_and_entropy(case.hidden, case.weight, case.targets, case.vocab_size)
    stats = [chunked_stats(case.hidden, case.weight[a:a + shard], a, case.targets, vocab_size=case.vocab_size,
                           chunk_tokens=16) for a in range(0, 210, shard)]
    tok = combine_shard_list(stats)
    torch.testing.assert_close(tok.logprobs, want_lp, **FP32_TOL)
    torch.testing.assert_close(tok.entropy, want_ent, **FP32_TOL)
    # an all-padding shard reports an empty softmax and contributes exactly nothing
    empty = chunked_stats(case.hidden, case.weight[:5] * 0 + 9.0, 205, case.targets, vocab_size=203)
    assert torch.all(empty.sumexp == 0) and torch.all(empty.target == 0)
    tok2 = combine_shard_list(stats + [empty])
    torch.testing.assert_close(tok2.logprobs, want_lp, **FP32_TOL)
    # gradients: the per-shard backward pieces stacked equal autograd through the full logits
    h = case.hidden.clone().requires_grad_(True)
    w = case.weight.clone().requires_grad_(True)
    lp, ent = full_logprobs_and_entropy(h, w, case.targets, case.vocab_size)
    a, b = torch.randn(50), torch.randn(50)
    (lp * a + ent * b).sum().backward()
    gh = torch.zeros_like(h)
    gws = []
    for s in range(0, 210, shard):
        gh_s, gw_s = chunked_grads(case.hidden, case.weight[s:s + shard], s, case.targets, tok.lse, tok.mean_logit,
                                   a, b, vocab_size=case.vocab_size, chunk_tokens=16)
        gh += gh_s
        gws.append(gw_s)
    torch.testing.assert_close(gh, h.grad, **FP32_TOL)
    torch.testing.assert_close(torch.cat(gws), w.grad, **FP32_TOL)


def test_vocab_parallel_logprobs_no_grad_and_any_upstream_gradient() -> None:
    case = make_case(seed=5)
    with torch.no_grad():  # old log-probs: phase 1 only
        lp, ent = vocab_parallel_logprobs(case.hidden, case.weight, 0, case.targets, impl="chunked")
    want_lp, want_ent = full_logprobs_and_entropy(case.hidden, case.weight, case.targets)
    torch.testing.assert_close(lp, want_lp, **FP32_TOL)
    torch.testing.assert_close(ent, want_ent, **FP32_TOL)
    lp_only, none = vocab_parallel_logprobs(case.hidden, case.weight, 0, case.targets, entropy=False, impl="chunked")
    assert none is None
    torch.testing.assert_close(lp_only, want_lp, **FP32_TOL)
    # arbitrary non-linear use of the differentiable log-probs
    grads = []
    for fn in (lambda h, w: vocab_parallel_logprobs(h, w, 0, case.targets, impl="chunked"),
               lambda h, w: full_logprobs_and_entropy(h, w, case.targets)):
        h = case.hidden.clone().requires_grad_(True)
        w = case.weight.clone().requires_grad_(True)
        lp, ent = fn(h, w)
        (torch.exp(lp).sum() + (ent ** 2).sum()).backward()
        grads.append((h.grad, w.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0], **FP32_TOL)
    torch.testing.assert_close(grads[0][1], grads[1][1], **FP32_TOL)


def test_loss_without_gradient_is_the_reference_value() -> None:
    case = make_case(seed=6)
    kw = loss_kwargs(case, "seq-mean-token-sum")
    with torch.no_grad():
        got = fused_policy_loss(case.hidden, case.weight, 0, case.targets, case.old_logprobs, case.advantages,
                                case.mask, impl="chunked", **kw)
    want = reference(case, **kw)
    torch.testing.assert_close(got.loss, want["loss"], **FP32_TOL)
    torch.testing.assert_close(got.clip_fraction, want["clip_fraction"], **FP32_TOL)


def test_upstream_scale_reaches_in_forward_gradient() -> None:
    case = make_case(seed=7)
    kw = loss_kwargs(case, "token-mean")
    h = case.hidden.clone().requires_grad_(True)
    w = case.weight.clone().requires_grad_(True)
    out = fused_policy_loss(h, w, 0, case.targets, case.old_logprobs, case.advantages, case.mask,
                            impl="chunked", grad_mode="in_forward", **kw)
    (3.0 * out.loss).backward()
    want = reference(case, **kw)
    torch.testing.assert_close(h.grad, 3.0 * want["grad_hidden"], **FP32_TOL)
    torch.testing.assert_close(w.grad, 3.0 * want["grad_weight"], **FP32_TOL)


def test_dispatch_and_input_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MEGATRON_DENOISE_LOSS_IMPL", raising=False)
    monkeypatch.delenv("MEGATRON_DENOISE_LOSS_COMPILE", raising=False)
    assert resolve_impl("auto", "cpu") == "chunked"
    assert resolve_impl("reference", "cpu") == "reference"
    monkeypatch.setenv("MEGATRON_DENOISE_LOSS_IMPL", "reference")
    assert resolve_impl("auto", "cpu") == "reference"
    assert resolve_impl("chunked", "cpu") == "chunked"  # an explicit choice wins over the env
    monkeypatch.setenv("MEGATRON_DENOISE_LOSS_IMPL", "fast")
    with pytest.raises(ValueError, match="MEGATRON_DENOISE_LOSS_IMPL"):
        resolve_impl("auto", "cpu")
    monkeypatch.delenv("MEGATRON_DENOISE_LOSS_IMPL")
    with pytest.raises(ValueError, match="'cuda_magic'"):
        resolve_impl("cuda_magic", "cpu")
    case = make_case(T=8, seed=8)
    args = (case.old_logprobs, case.advantages, case.mask)
    bad = case.targets.clone()
    bad[3] = 203
    with pytest.raises(ValueError, match="targets out of range"):
        fused_policy_loss(case.hidden, case.weight, 0, bad, *args, vocab_size=203)
    with pytest.raises(ValueError, match="weight_shard"):
        fused_policy_loss(case.hidden, case.weight[:, :5], 0, case.targets, *args)
    with pytest.raises(ValueError, match="advantages"):
        fused_policy_loss(case.hidden, case.weight, 0, case.targets, case.old_logprobs, case.advantages[:3],
                          case.mask)
    with pytest.raises(ValueError, match="grad_mode"):
        fused_policy_loss(case.hidden, case.weight, 0, case.targets, *args, grad_mode="later")
    with pytest.raises(ValueError, match="seq_ids"):
        fused_policy_loss(case.hidden.requires_grad_(True), case.weight, 0, case.targets, *args,
                          loss_agg="seq-mean-token-mean")


@pytest.mark.slow
def test_compiled_chunked_parity() -> None:
    """torch.compile of the per-chunk math (inductor C++ on CPU: tens of seconds to compile)."""
    case = make_case(seed=9)
    for agg in ("token-mean", "seq-mean-token-mean"):
        kw = loss_kwargs(case, agg)
        want = reference(case, **kw)
        for grad_mode in ("in_forward", "recompute"):
            got = run(fused_policy_loss, case, case.hidden, case.weight, impl="chunked_compiled",
                      grad_mode=grad_mode, chunk_tokens=16, **kw)
            assert_parity(got, want, FP32_TOL, f"compiled {agg}/{grad_mode}: ")
