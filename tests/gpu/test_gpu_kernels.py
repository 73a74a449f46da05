"""GPU acceptance check, part of `pytest -m gpu tests/gpu`: the fused policy-loss Triton kernels
COMPILED for the GPU (not the CPU interpreter of tests/kernels/test_kernels_triton.py) against the
full-logits PyTorch reference on CUDA tensors: loss, log-probs, entropy, clip fractions, and the
gradients of hidden and weight (forward and backward).

Tolerances: the kernels' fp32 dots run at `kernels.triton_loss.DOT_PRECISION` ("ieee" unless
MDN_TRITON_DOT_PRECISION says otherwise) and the reference's matmuls at IEEE fp32 (forced here), so
fp32 parity is the interpreter's 1e-5; if tf32 was requested the check allows tf32 rounding (10-bit
mantissa: 1e-2). bf16 inputs: the interpreter's BF16_TOL (bf16 rounding of logits and dL/dz).

NOT YET RUN ON A GPU: written against triton 3.7 (tl.dot input_precision) and torch 2.13.
"""
from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(),
                                 reason="GPU check: no CUDA device here (torch.cuda.is_available() is False); "
                                        "run `bash launch/gpu_check.sh` on a GPU node")]

pytest.importorskip("triton")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "kernels"))  # kernels_testlib

from kernels_testlib import (AGGS, BF16_TOL, FP32_TOL, assert_clipping_binds, assert_parity,  # noqa: E402
                             loss_kwargs, make_case, reference, run)

TF32_TOL = dict(atol=1e-2, rtol=1e-2)


def fp32_tol() -> dict:
    from megatron_denoise.kernels import triton_loss

    return FP32_TOL if triton_loss.DOT_PRECISION == "ieee" else TF32_TOL


@pytest.fixture(autouse=True)
def ieee_reference():
    """The reference's fp32 matmuls at IEEE precision (torch >= 2.9 spells it fp32_precision)."""
    m = torch.backends.cuda.matmul
    if hasattr(m, "fp32_precision"):
        saved = m.fp32_precision
        m.fp32_precision = "ieee"
        yield
        m.fp32_precision = saved
    else:  # pragma: no cover - older torch
        saved = m.allow_tf32
        m.allow_tf32 = False
        yield
        m.allow_tf32 = saved


def on_gpu(case):
    moved = {k: v.cuda() for k, v in vars(case).items() if torch.is_tensor(v)}
    return replace(case, **moved)


def gpu_kwargs(case, agg, **over):
    kw = loss_kwargs(case, agg, **over)
    return {k: (v.cuda() if torch.is_tensor(v) else v) for k, v in kw.items()}


@pytest.mark.parametrize("agg", AGGS)
def test_triton_on_gpu_matches_reference_fp32(agg: str) -> None:
    from megatron_denoise.kernels import fused_policy_loss

    case = on_gpu(make_case(vocab_size=203, padded_rows=208))
    kw = gpu_kwargs(case, agg)
    want = reference(case, **kw)
    assert_clipping_binds(want)
    got = run(fused_policy_loss, case, case.hidden, case.weight, impl="triton", **kw)
    assert got["grad_hidden"].is_cuda and got["grad_weight"].is_cuda
    assert_parity(got, want, fp32_tol(), f"triton on GPU {agg}: ")
    assert torch.all(got["grad_weight"][203:] == 0)


def test_triton_on_gpu_default_blocks_many_programs() -> None:
    """Shapes larger than the GPU blocks (64 tokens x 128 vocab x 64 hidden) and not multiples of
    them: many token programs, many vocab programs adding into the same grad_hidden rows (atomics),
    masked edges; the stats and grads of `triton_loss` directly against autograd of the reference."""
    from megatron_denoise.kernels.reference import full_logprobs_and_entropy
    from megatron_denoise.kernels.stats import combine_shard_list
    from megatron_denoise.kernels.triton_loss import triton_grads, triton_stats

    case = on_gpu(make_case(T=203, H=136, vocab_size=1000, padded_rows=1024, seed=21))
    st = combine_shard_list([triton_stats(case.hidden, case.weight, 0, case.targets, vocab_size=1000)])
    h = case.hidden.clone().requires_grad_(True)
    w = case.weight.clone().requires_grad_(True)
    lp, ent = full_logprobs_and_entropy(h, w, case.targets, 1000)
    # more terms per dot product (H=136) and per gradient sum (T=203) than the 1e-5 cases: the
    # summation order differs from cuBLAS', hence 1e-4 at IEEE precision
    tol = dict(atol=1e-4, rtol=1e-4) if fp32_tol() is FP32_TOL else TF32_TOL
    torch.testing.assert_close(st.logprobs, lp.detach(), **tol)
    torch.testing.assert_close(st.entropy, ent.detach(), **tol)
    g = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(203, device="cuda", generator=g)
    b = torch.randn(203, device="cuda", generator=g)
    (lp * a + ent * b).sum().backward()
    gh, gw = triton_grads(case.hidden, case.weight, 0, case.targets, st.lse, st.mean_logit, a, b, vocab_size=1000)
    torch.testing.assert_close(gh, h.grad, **tol)
    torch.testing.assert_close(gw, w.grad, **tol)
    assert torch.all(gw[1000:] == 0)  # padding rows get no gradient


def test_triton_on_gpu_matches_reference_bf16() -> None:
    """Real bf16 tensor-core dots (the interpreter upcasts to fp32 instead)."""
    from megatron_denoise.kernels import fused_policy_loss

    case = on_gpu(make_case(dtype=torch.bfloat16, vocab_size=203, padded_rows=208, seed=14))
    kw = gpu_kwargs(case, "token-mean")
    got = run(fused_policy_loss, case, case.hidden, case.weight, impl="triton", **kw)
    assert got["grad_hidden"].dtype == torch.bfloat16
    assert_parity(got, reference(case, **kw), BF16_TOL, "triton on GPU bf16: ")
