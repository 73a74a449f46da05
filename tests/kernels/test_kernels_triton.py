"""The Triton kernels, run by Triton's CPU interpreter, vs the full-logits reference.

TRITON_INTERPRET=1 must be set before the kernels are decorated (at import) and should not leak
into other tests of the session, so `test_triton_interpreted` re-runs this file in a child pytest
with the variable set; there the real cases run and the launcher is skipped.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
pytest.importorskip("triton")

from kernels_testlib import (AGGS, BF16_TOL, FP32_TOL, assert_clipping_binds, assert_parity,  # noqa: E402
                             loss_kwargs, make_case, reference, run)
from megatron_denoise.kernels import fused_policy_loss  # noqa: E402
from megatron_denoise.kernels.reference import full_logprobs_and_entropy  # noqa: E402
from megatron_denoise.kernels.stats import combine_shard_list  # noqa: E402

child_only = pytest.mark.skipif(not INTERPRETING, reason="runs in the TRITON_INTERPRET=1 child (see launcher)")


def test_triton_interpreted() -> None:
    if INTERPRETING:
        pytest.skip("this is the child")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                          cwd=os.path.dirname(__file__), env=env, capture_output=True, text=True, timeout=900)
    tail = proc.stdout[-6000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, tail
    assert " passed" in proc.stdout and "failed" not in proc.stdout, tail


@child_only
@pytest.mark.parametrize("agg", AGGS)
def test_triton_parity_fp32(agg: str) -> None:
    case = make_case(vocab_size=203, padded_rows=208)
    kw = loss_kwargs(case, agg)
    want = reference(case, **kw)
    assert_clipping_binds(want)
    got = run(fused_policy_loss, case, case.hidden, case.weight, impl="triton", **kw)
    assert_parity(got, want, FP32_TOL, f"triton {agg}: ")
    assert torch.all(got["grad_weight"][203:] == 0)


@child_only
def test_triton_small_blocks_masks_and_atomics() -> None:
    """Many programs: T, V_local and H are all not multiples of the blocks (masked edges), several
    vocab programs add into the same grad_hidden rows (atomics), several token blocks into one
    grad_weight block."""
    from megatron_denoise.kernels.triton_loss import triton_grads, triton_stats

    case = make_case(T=37, H=40, vocab_size=150, padded_rows=157, seed=11)
    blocks = dict(block_t=16, block_v=32, block_h=16)
    st = combine_shard_list([triton_stats(case.hidden, case.weight, 0, case.targets, vocab_size=150, **blocks)])
    h = case.hidden.clone().requires_grad_(True)
    w = case.weight.clone().requires_grad_(True)
    lp, ent = full_logprobs_and_entropy(h, w, case.targets, 150)
    torch.testing.assert_close(st.logprobs, lp.detach(), **FP32_TOL)
    torch.testing.assert_close(st.entropy, ent.detach(), **FP32_TOL)
    a, b = torch.randn(37), torch.randn(37)
    (lp * a + ent * b).sum().backward(retain_graph=True)
    gh, gw = triton_grads(case.hidden, case.weight, 0, case.targets, st.lse, st.mean_logit, a, b, vocab_size=150,
                          **blocks)
    torch.testing.assert_close(gh, h.grad, **FP32_TOL)
    torch.testing.assert_close(gw, w.grad, **FP32_TOL)
    gh2, gw2 = triton_grads(case.hidden, case.weight, 0, case.targets, st.lse, st.mean_logit, a, None,
                            vocab_size=150, **blocks)  # entropy gradient off
    h.grad, w.grad = None, None
    (lp * a).sum().backward()
    torch.testing.assert_close(gh2, h.grad, **FP32_TOL)
    torch.testing.assert_close(gw2, w.grad, **FP32_TOL)


@child_only
def test_triton_emulated_shards_with_padding_and_empty_shard() -> None:
    from megatron_denoise.kernels.triton_loss import triton_stats

    case = make_case(vocab_size=203, padded_rows=240, seed=12)
    shard = 80  # [0, 80), [80, 160), [160, 240): the last holds 43 real ids and 37 padding rows
    stats = [triton_stats(case.hidden, case.weight[a:a + shard], a, case.targets, vocab_size=203)
             for a in range(0, 240, shard)]
    stats.append(triton_stats(case.hidden, case.weight[:16] + 3.0, 240, case.targets, vocab_size=203))  # padding only
    tok = combine_shard_list(stats)
    lp, ent = full_logprobs_and_entropy(case.hidden, case.weight, case.targets, 203)
    torch.testing.assert_close(tok.logprobs, lp, **FP32_TOL)
    torch.testing.assert_close(tok.entropy, ent, **FP32_TOL)


@child_only
def test_triton_force_on_policy_and_all_masked_batch() -> None:
    case = make_case(seed=13)
    kw = loss_kwargs(case, "seq-mean-token-mean", force_on_policy=True)
    assert_parity(run(fused_policy_loss, case, case.hidden, case.weight, impl="triton", **kw),
                  reference(case, **kw), FP32_TOL, "force_on_policy: ")
    case.mask.zero_()  # nothing gets gradient: loss 0, gradients exactly 0
    got = run(fused_policy_loss, case, case.hidden, case.weight, impl="triton", **kw)
    assert got["loss"] == 0 and torch.all(got["grad_hidden"] == 0) and torch.all(got["grad_weight"] == 0)


@child_only
def test_triton_parity_bf16() -> None:
    # bf16 tiles are upcast to fp32 before tl.dot in the interpreter (bf16 dot is wrong there), so
    # the logits are fp32-exact while the reference rounds its bf16 GEMM: BF16_TOL covers that.
    case = make_case(dtype=torch.bfloat16, vocab_size=203, padded_rows=208, seed=14)
    kw = loss_kwargs(case, "token-mean")
    got = run(fused_policy_loss, case, case.hidden, case.weight, impl="triton", **kw)
    assert got["grad_hidden"].dtype == torch.bfloat16
    assert_parity(got, reference(case, **kw), BF16_TOL, "triton bf16: ")
