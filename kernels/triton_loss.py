"""Fused Triton kernels: vocab-sharded log-probs / entropy and their gradients without logits in memory.

Two kernels, same phases as `chunked.py` (see `stats.py` for the math and the TP contract):

- `_stats_kernel`, grid (cdiv(T, BLOCK_T),): each program owns BLOCK_T tokens and walks the shard's
  vocabulary in BLOCK_V tiles; each tile of logits [BLOCK_T, BLOCK_V] = hidden x weight^T (loop over
  H in BLOCK_H slices, fp32 accumulation) feeds an online max / sum-exp / sum p*z and the gather of
  the target logit if this shard owns the target. Output: 4 x [T] fp32 (`ShardStats`).
- `_grad_kernel`, grid (cdiv(V_local, BLOCK_V),): each program owns BLOCK_V vocabulary rows and
  walks all token blocks; it RECOMPUTES the logits tile, forms dL/dz from the combined lse, E[z]
  and the upstream per-token gradients, then adds dz^T @ hidden into its own grad_weight rows
  (exclusive: plain load/add/store, deterministic) and dz @ weight into grad_hidden with fp32
  atomics (many vocab programs touch the same token rows).

Why recompute instead of computing the gradient in the forward pass: under TP the gradient needs
the GLOBAL lse of every token, which only exists after the caller's all-reduce of the phase-1
statistics; a single-pass gradient-in-forward would need one collective per token block inside
the kernel, which kernels must never do. Recompute costs one extra GEMM pass (4 instead of 3) but
keeps exactly two collectives per forward, lets the log-probs stay differentiable (KL terms, other
losses can use them) and keeps the saved state O(T). (The CPU path, where matmul dominates and TP
is only emulated, uses gradient-in-forward instead: chunked.py.)

Interpreter notes (TRITON_INTERPRET=1, CPU): bf16 `tl.dot` is wrong there, so tiles are upcast to
fp32 before the dot when `UPCAST` is set (automatically when the interpreter is active); plain
pointer arithmetic only (no block pointers: removed in triton 3.9); every load/store is masked.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from .stats import ShardStats, local_vocab_bounds

try:  # triton is absent on some CPU installs; the module must still import (dispatch checks)
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is missing
    HAVE_TRITON = False


# Precision of fp32 x fp32 `tl.dot` on GPU tensor cores (triton 3.7 `input_precision`: "ieee", "tf32"
# or "tf32x3"; bf16/fp16 tiles ignore it, and so does the CPU interpreter, which multiplies in numpy).
# Triton's own default is "tf32" (10-bit mantissa, ~1e-3 relative error per logit), which would break
# the 1e-5 parity with the fp32 PyTorch reference that tests/kernels and tests/gpu claim. So "ieee"
# by default; MDN_TRITON_DOT_PRECISION=tf32 (read at import) trades that parity for speed on fp32 models.
DOT_PRECISIONS = ("ieee", "tf32", "tf32x3")
DOT_PRECISION = os.environ.get("MDN_TRITON_DOT_PRECISION", "ieee")
if DOT_PRECISION not in DOT_PRECISIONS:
    raise ValueError(f"MDN_TRITON_DOT_PRECISION={DOT_PRECISION!r} is not one of {' | '.join(DOT_PRECISIONS)}")


def interpreting() -> bool:
    """True when Triton runs its CPU interpreter (read at kernel decoration time, i.e. import)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


if HAVE_TRITON:

    @triton.jit
    def _logits_tile(h_ptr, w_ptr, offs_t, offs_v, tmask, vmask, H, stride_ht, stride_hh, stride_wv,
                     stride_wh, BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                     UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):
        """fp32 logits tile [BLOCK_T, BLOCK_V] = hidden[offs_t] @ weight[offs_v]^T (0 where masked)."""
        acc = tl.zeros([BLOCK_T, BLOCK_V], dtype=tl.float32)
        for h0 in range(0, H, BLOCK_H):
            offs_h = h0 + tl.arange(0, BLOCK_H)
            hmask = offs_h < H
            a = tl.load(h_ptr + offs_t[:, None] * stride_ht + offs_h[None, :] * stride_hh,
                        mask=tmask[:, None] & hmask[None, :], other=0.0)  # [BT, BH]
            b = tl.load(w_ptr + offs_v[None, :] * stride_wv + offs_h[:, None] * stride_wh,
                        mask=vmask[None, :] & hmask[:, None], other=0.0)  # [BH, BV]
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=DOT_PREC)
        return acc

    @triton.jit
    def _stats_kernel(h_ptr, w_ptr, tgt_ptr, out_ptr, T, H, n_valid, vocab_start,
                      stride_ht, stride_hh, stride_wv, stride_wh,
                      WITH_ENTROPY: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr,
                      BLOCK_H: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):
        pid = tl.program_id(0)
        offs_t = (pid * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)  # int64: T * H may exceed 2^31
        tmask = offs_t < T
        local_tgt = tl.load(tgt_ptr + offs_t, mask=tmask, other=-1) - vocab_start  # [BT] int64
        m = tl.full([BLOCK_T], -1.0e30, tl.float32)  # stats.NEG_FLOOR
        s = tl.zeros([BLOCK_T], dtype=tl.float32)
        q = tl.zeros([BLOCK_T], dtype=tl.float32)
        tgt_logit = tl.zeros([BLOCK_T], dtype=tl.float32)
        for v0 in range(0, n_valid, BLOCK_V):
            offs_v = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
            vmask = offs_v < n_valid
            z = _logits_tile(h_ptr, w_ptr, offs_t, offs_v, tmask, vmask, H, stride_ht, stride_hh,
                             stride_wv, stride_wh, BLOCK_T, BLOCK_V, BLOCK_H, UPCAST, DOT_PREC)
            zm = tl.where(vmask[None, :], z, float("-inf"))
            m_new = tl.maximum(m, tl.max(zm, axis=1))
            alpha = tl.exp(m - m_new)
            e = tl.exp(zm - m_new[:, None])  # exactly 0 on padding columns
            s = s * alpha + tl.sum(e, axis=1)
            if WITH_ENTROPY:
                q = q * alpha + tl.sum(tl.where(vmask[None, :], e * z, 0.0), axis=1)
            hit = (offs_v[None, :] == local_tgt[:, None]) & vmask[None, :]
            tgt_logit += tl.sum(tl.where(hit, z, 0.0), axis=1)
            m = m_new
        tl.store(out_ptr + offs_t, m, mask=tmask)
        tl.store(out_ptr + T + offs_t, s, mask=tmask)
        tl.store(out_ptr + 2 * T + offs_t, tgt_logit, mask=tmask)
        tl.store(out_ptr + 3 * T + offs_t, q, mask=tmask)

    @triton.jit
    def _grad_kernel(h_ptr, w_ptr, tgt_ptr, lse_ptr, ez_ptr, glp_ptr, gent_ptr, gh_ptr, gw_ptr,
                     T, H, n_valid, vocab_start, stride_ht, stride_hh, stride_wv, stride_wh,
                     WITH_ENTROPY: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr,
                     BLOCK_H: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):
        # gh_ptr: fp32 [T, H] contiguous (atomics); gw_ptr: fp32 [V_local, H] contiguous.
        pid = tl.program_id(0)
        offs_v = (pid * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)  # int64: V_local * H may exceed 2^31
        vmask = offs_v < n_valid
        for t0 in range(0, T, BLOCK_T):
            offs_t = (t0 + tl.arange(0, BLOCK_T)).to(tl.int64)
            tmask = offs_t < T
            z = _logits_tile(h_ptr, w_ptr, offs_t, offs_v, tmask, vmask, H, stride_ht, stride_hh,
                             stride_wv, stride_wh, BLOCK_T, BLOCK_V, BLOCK_H, UPCAST, DOT_PREC)
            lse = tl.load(lse_ptr + offs_t, mask=tmask, other=0.0)
            g_lp = tl.load(glp_ptr + offs_t, mask=tmask, other=0.0)
            local_tgt = tl.load(tgt_ptr + offs_t, mask=tmask, other=-1) - vocab_start
            valid = tmask[:, None] & vmask[None, :]
            p = tl.where(valid, tl.exp(z - lse[:, None]), 0.0)  # [BT, BV]
            coef = g_lp[:, None] + tl.zeros([BLOCK_T, BLOCK_V], dtype=tl.float32)
            if WITH_ENTROPY:
                ez = tl.load(ez_ptr + offs_t, mask=tmask, other=0.0)
                g_ent = tl.load(gent_ptr + offs_t, mask=tmask, other=0.0)
                coef += g_ent[:, None] * (z - ez[:, None])
            hit = (offs_v[None, :] == local_tgt[:, None]) & valid
            dz = tl.where(hit, g_lp[:, None], 0.0) - p * coef  # [BT, BV] fp32, 0 outside valid
            for h0 in range(0, H, BLOCK_H):
                offs_h = h0 + tl.arange(0, BLOCK_H)
                hmask = offs_h < H
                a = tl.load(h_ptr + offs_t[:, None] * stride_ht + offs_h[None, :] * stride_hh,
                            mask=tmask[:, None] & hmask[None, :], other=0.0)  # [BT, BH]
                w = tl.load(w_ptr + offs_v[:, None] * stride_wv + offs_h[None, :] * stride_wh,
                            mask=vmask[:, None] & hmask[None, :], other=0.0)  # [BV, BH]
                if UPCAST:
                    a = a.to(tl.float32)
                    w = w.to(tl.float32)
                    dz_t = dz
                else:
                    dz_t = dz.to(a.dtype)
                gw_tile = tl.dot(tl.trans(dz_t), a, input_precision=DOT_PREC)  # [BV, BH]
                gw_ptrs = gw_ptr + offs_v[:, None] * H + offs_h[None, :]
                gw_mask = vmask[:, None] & hmask[None, :]
                tl.store(gw_ptrs, tl.load(gw_ptrs, mask=gw_mask, other=0.0) + gw_tile, mask=gw_mask)
                gh_tile = tl.dot(dz_t, w, input_precision=DOT_PREC)  # [BT, BH]
                tl.atomic_add(gh_ptr + offs_t[:, None] * H + offs_h[None, :], gh_tile,
                              mask=tmask[:, None] & hmask[None, :])


def _blocks(T: int, n_valid: int, H: int, block_t: Optional[int], block_v: Optional[int],
            block_h: Optional[int]) -> tuple[int, int, int]:
    # Interpreter: few, large programs are fast (cost ~ programs x loop iterations). GPU: 64 x 128
    # tiles with a 64-wide H slice fit the shared memory of every recent NVIDIA part in fp32/bf16.
    p2 = triton.next_power_of_2
    if interpreting():
        bt = block_t or max(16, min(128, p2(T)))
        bv = block_v or max(16, min(1024, p2(max(n_valid, 1))))
        bh = block_h or max(16, min(256, p2(H)))
    else:  # pragma: no cover - GPU only
        bt, bv, bh = block_t or 64, block_v or 128, block_h or 64
    return bt, bv, bh


def _check(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> None:
    if not HAVE_TRITON:
        raise RuntimeError("impl='triton' needs the `triton` package")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} must be [T, H] and [V_local, H]")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets {tuple(targets.shape)} must be [T] with T = {hidden.shape[0]}")
    if hidden.device.type != "cuda" and not interpreting():
        raise RuntimeError("Triton on a CPU tensor needs TRITON_INTERPRET=1 set before importing kernels")


def triton_stats(hidden: torch.Tensor, weight: torch.Tensor, vocab_start: int, targets: torch.Tensor, *,
                 vocab_size: Optional[int] = None, with_entropy: bool = True, block_t: Optional[int] = None,
                 block_v: Optional[int] = None, block_h: Optional[int] = None) -> ShardStats:
    """Phase 1 over one vocab shard (same contract as `chunked.chunked_stats`)."""
    _check(hidden, weight, targets)
    T, H = hidden.shape
    n_valid = local_vocab_bounds(vocab_start, weight.shape[0], vocab_size)
    bt, bv, bh = _blocks(T, n_valid, H, block_t, block_v, block_h)
    out = torch.empty(4, T, dtype=torch.float32, device=hidden.device)
    if T > 0:
        _stats_kernel[(triton.cdiv(T, bt),)](
            hidden, weight, targets.long().contiguous(), out, T, H, n_valid, vocab_start,
            hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
            WITH_ENTROPY=with_entropy, BLOCK_T=bt, BLOCK_V=bv, BLOCK_H=bh, UPCAST=interpreting(),
            DOT_PREC=DOT_PRECISION)
    return ShardStats(max=out[0], sumexp=out[1], target=out[2], sum_pz=out[3])


def triton_grads(hidden: torch.Tensor, weight: torch.Tensor, vocab_start: int, targets: torch.Tensor,
                 lse: torch.Tensor, mean_logit: torch.Tensor, g_logp: torch.Tensor,
                 g_entropy: Optional[torch.Tensor], *, vocab_size: Optional[int] = None,
                 block_t: Optional[int] = None, block_v: Optional[int] = None,
                 block_h: Optional[int] = None):
    """Phase 2 (recompute): (grad_hidden [T, H] partial over TP, grad_weight [V_local, H])."""
    _check(hidden, weight, targets)
    T, H = hidden.shape
    n_valid = local_vocab_bounds(vocab_start, weight.shape[0], vocab_size)
    bt, bv, bh = _blocks(T, n_valid, H, block_t, block_v, block_h)
    grad_h = torch.zeros(T, H, dtype=torch.float32, device=hidden.device)
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
    with_entropy = g_entropy is not None
    if T > 0 and n_valid > 0:
        f32 = lambda x: x.float().contiguous()  # noqa: E731
        g_ent = f32(g_entropy) if with_entropy else f32(g_logp)  # placeholder pointer when unused
        _grad_kernel[(triton.cdiv(n_valid, bv),)](
            hidden, weight, targets.long().contiguous(), f32(lse), f32(mean_logit), f32(g_logp), g_ent,
            grad_h, grad_w, T, H, n_valid, vocab_start,
            hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
            WITH_ENTROPY=with_entropy, BLOCK_T=bt, BLOCK_V=bv, BLOCK_H=bh, UPCAST=interpreting(),
            DOT_PREC=DOT_PRECISION)
    return grad_h.to(hidden.dtype), grad_w.to(weight.dtype)
