"""CPU fast path: the fused log-prob / gradient computation chunked over tokens in plain PyTorch.

Only a [c, V_local] block of logits exists at any time (c = chunk of tokens), never [T, V_local].
Three entry points share the same per-chunk math:

- `chunked_stats`  phase 1: ShardStats of every token (one hidden x weight pass).
- `chunked_grads`  phase 2: given the combined lse / E[z] and the per-token upstream gradients
                   dL/dlogp and dL/dentropy, recompute each logits block and accumulate
                   grad_hidden [T, H] (partial over TP shards) and grad_weight [V_local, H].
- `chunked_fused`  gradient-in-forward: stats, (caller's) combine, loss coefficients and the
                   gradient for one chunk while its logits block is still in memory. 3 matmul passes
                   instead of 4 (stats + recompute + 2 gradient GEMMs), which is what makes the fused
                   path at least as fast as the naive one on CPU, where the matmuls are the cost.
                   The price: the loss must be final in forward (the gradient is stored and only
                   scaled by the upstream scalar in backward), so log-probs come out detached.

Padding rows of a shard (global id >= vocab_size) are always a suffix of the shard, so they are
simply sliced away (`weight[:n_valid]`) instead of masked; their gradient rows are zero.

Gradient of the per-token outputs w.r.t. the logits z of token t (p = softmax over the FULL vocab):
    d logp / dz_j    = 1[j == target] - p_j
    d entropy / dz_j = p_j * (E_p[z] - z_j)
so  G_j = g_lp * 1[j == target] - p_j * (g_lp + g_ent * (z_j - E_p[z])).
`torch.compile` (optional: it takes tens of seconds to compile on CPU) fuses the elementwise parts.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

import torch

from .stats import NEG_FLOOR, ShardStats, TokenStats, local_vocab_bounds

# Default logits block budget: c * V_local * 4 bytes.  64 MiB keeps the extra memory far below the
# naive [T, V] tensors while each GEMM still has c >= 100 rows at V = 151,936 (tp = 1).
DEFAULT_BLOCK_BYTES = 64 * 2**20

CoefficientFn = Callable[[slice, TokenStats], tuple[torch.Tensor, Optional[torch.Tensor]]]
CombineFn = Callable[[ShardStats], TokenStats]


def default_chunk_tokens(num_tokens: int, valid_rows: int, block_bytes: int = DEFAULT_BLOCK_BYTES) -> int:
    """Tokens per chunk so that one fp32 logits block is about `block_bytes`."""
    c = block_bytes // max(1, 4 * valid_rows)
    return int(max(16, min(max(1, num_tokens), c)))


# ---- per-chunk math (plain functions; optionally wrapped by torch.compile) -------------------

def _block_stats(z: torch.Tensor, local_tgt: torch.Tensor, owned: torch.Tensor, with_entropy: bool,
                 e_out: Optional[torch.Tensor] = None):
    """z [c, n] fp32 logits of the valid columns; local_tgt [c] in [0, n); owned [c] bool.
    Returns (max, sumexp, target, sum_pz) [c] each and e = exp(z - max) [c, n] (reused by the
    gradient-in-forward step: p = e * exp(max - lse), saving a second exp pass)."""
    m = z.amax(dim=1)  # [c]
    # [c, n]; in place: one block, not two; written into the reusable workspace when given
    e = (torch.sub(z, m[:, None]) if e_out is None else torch.sub(z, m[:, None], out=e_out)).exp_()
    s = e.sum(dim=1)
    # sum_j e_j z_j as c batched dot products: no [c, n] temporary for e * z
    q = torch.bmm(e.unsqueeze(1), z.unsqueeze(2)).view(-1) if with_entropy else torch.zeros_like(s)
    t = torch.where(owned, z.gather(1, local_tgt[:, None]).squeeze(1), torch.zeros_like(s))
    return m, s, t, q, e


def _block_grad(z: torch.Tensor, p: torch.Tensor, local_tgt: torch.Tensor, owned: torch.Tensor,
                mean_logit: torch.Tensor, g_lp: torch.Tensor, g_ent: Optional[torch.Tensor]) -> torch.Tensor:
    """dL/dz [c, n] fp32 from logits z and probabilities p (see module docstring). Both blocks are
    consumed (overwritten in place): no third [c, n] buffer."""
    if g_ent is None:
        grad = p.mul_(-g_lp[:, None])
    else:
        grad = z.sub_(mean_logit[:, None]).mul_(g_ent[:, None]).add_(g_lp[:, None]).mul_(p).neg_()
    # + g_lp at the owned target column
    grad.scatter_add_(1, local_tgt[:, None], torch.where(owned, g_lp, torch.zeros_like(g_lp))[:, None])
    return grad


def _logits(h: torch.Tensor, w_valid: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    # Same op and dtype as the reference (`hidden @ weight.T` in the input dtype, then fp32), so
    # that bf16 results round identically.
    if out is None:
        return (h @ w_valid.t()).float()
    if h.dtype == torch.float32 and w_valid.dtype == torch.float32:
        return torch.mm(h, w_valid.t(), out=out)
    return out.copy_(h @ w_valid.t())


def _stats_step(h, w_valid, local_tgt, owned, with_entropy: bool, z_out=None, e_out=None):
    z = _logits(h, w_valid, z_out)
    return (z,) + _block_stats(z, local_tgt, owned, with_entropy, e_out)


def _grad_step(z, local_tgt, owned, lse, mean_logit, g_lp, g_ent, w_valid, e_out=None):
    """Recompute variant: p from the combined lse."""
    p = (torch.sub(z, lse[:, None]) if e_out is None else torch.sub(z, lse[:, None], out=e_out)).exp_()  # [c, n]
    grad = _block_grad(z, p, local_tgt, owned, mean_logit, g_lp, g_ent).to(w_valid.dtype)
    return grad, grad @ w_valid  # dL/dz [c, n] in the weight dtype, grad_hidden rows [c, H]


def _grad_step_from_e(z, e, local_max, local_tgt, owned, lse, mean_logit, g_lp, g_ent, w_valid):
    """Gradient-in-forward variant: p = exp(z - m_local) * exp(m_local - lse), reusing phase 1's e."""
    p = e.mul_(torch.exp(local_max - lse)[:, None])
    grad = _block_grad(z, p, local_tgt, owned, mean_logit, g_lp, g_ent).to(w_valid.dtype)
    return grad, grad @ w_valid


def _accumulate_grad_w(grad_w: torch.Tensor, grad: torch.Tensor, h: torch.Tensor) -> None:
    """grad_w [n, H] fp32 += grad.T [n, c] @ h [c, H]; in place (no [n, H] temporary) for fp32."""
    if grad.dtype == torch.float32 and h.dtype == torch.float32:
        grad_w.addmm_(grad.t(), h)
    else:
        grad_w += (grad.t() @ h).float()


@functools.lru_cache(maxsize=None)
def _compiled(fn_name: str):
    fn = {"stats": _stats_step, "grad": _grad_step, "grad_e": _grad_step_from_e}[fn_name]
    # Default (automatic) dynamic shapes: the last chunk of a batch varies with T; after the second
    # distinct size one shape-generic graph is compiled instead of one graph per size.
    return torch.compile(fn)


class _Workspace:
    """Two reusable [c, n] fp32 blocks (logits, exp) for the eager path.

    Allocating fresh 10-100 MB blocks for every chunk costs more than the arithmetic on them
    here (each new block is mmapped and page-faulted in again: measured ~0.2-0.35 s per
    [110, 151936] block on this VM vs ~0.02 s for the exp itself), so eager chunks write into
    views of two blocks allocated once per call. torch.compile'd steps allocate their own.
    """

    def __init__(self, rows: int, cols: int, device, enabled: bool):
        self.enabled = enabled
        if enabled:
            self.z = torch.empty(rows, cols, dtype=torch.float32, device=device)
            self.e = torch.empty(rows, cols, dtype=torch.float32, device=device)

    def blocks(self, rows: int) -> dict:
        return dict(z_out=self.z[:rows], e_out=self.e[:rows]) if self.enabled else {}


def _steps(compiled: bool):
    """(stats step, recompute grad step, gradient-in-forward grad step), compiled or eager."""
    if compiled:
        return _compiled("stats"), _compiled("grad"), _compiled("grad_e")
    return _stats_step, _grad_step, _grad_step_from_e


# ---- helpers --------------------------------------------------------------------------------

def _prepare(hidden: torch.Tensor, weight: torch.Tensor, vocab_start: int, targets: torch.Tensor,
             vocab_size: Optional[int]):
    n_valid = local_vocab_bounds(vocab_start, weight.shape[0], vocab_size)
    local = targets.long() - vocab_start  # [T]
    owned = (local >= 0) & (local < n_valid)
    local_tgt = torch.where(owned, local, torch.zeros_like(local))
    return n_valid, weight[:n_valid], local_tgt, owned


def _empty_stats(t: int, device) -> ShardStats:
    z = torch.zeros(t, dtype=torch.float32, device=device)
    return ShardStats(max=torch.full_like(z, NEG_FLOOR), sumexp=z, target=z.clone(), sum_pz=z.clone())


def _chunks(t: int, chunk_tokens: int):
    for a in range(0, t, chunk_tokens):
        yield slice(a, min(t, a + chunk_tokens))


# ---- public entry points --------------------------------------------------------------------

@torch.no_grad()
def chunked_stats(hidden: torch.Tensor, weight: torch.Tensor, vocab_start: int, targets: torch.Tensor, *,
                  vocab_size: Optional[int] = None, with_entropy: bool = True,
                  chunk_tokens: Optional[int] = None, compiled: bool = False) -> ShardStats:
    """Phase 1 over one vocab shard. hidden [T, H], weight [V_local, H], targets [T] global ids."""
    T = hidden.shape[0]
    n_valid, w_valid, local_tgt, owned = _prepare(hidden, weight, vocab_start, targets, vocab_size)
    if n_valid == 0:
        return _empty_stats(T, hidden.device)
    c = chunk_tokens or default_chunk_tokens(T, n_valid)
    stats_step = _steps(compiled)[0]
    ws = _Workspace(min(c, T), n_valid, hidden.device, enabled=not compiled)
    out = torch.empty(4, T, dtype=torch.float32, device=hidden.device)
    for sl in _chunks(T, c):
        _, m, s, t, q, _ = stats_step(hidden[sl], w_valid, local_tgt[sl], owned[sl], with_entropy,
                                      **ws.blocks(sl.stop - sl.start))
        out[0, sl], out[1, sl], out[2, sl], out[3, sl] = m, s, t, q
    return ShardStats(max=out[0], sumexp=out[1], target=out[2], sum_pz=out[3])


@torch.no_grad()
def chunked_grads(hidden: torch.Tensor, weight: torch.Tensor, vocab_start: int, targets: torch.Tensor,
                  lse: torch.Tensor, mean_logit: torch.Tensor, g_logp: torch.Tensor,
                  g_entropy: Optional[torch.Tensor], *, vocab_size: Optional[int] = None,
                  chunk_tokens: Optional[int] = None, compiled: bool = False):
    """Phase 2 (recompute): grad_hidden [T, H] (this shard's partial sum) and grad_weight [V_local, H]."""
    T = hidden.shape[0]
    n_valid, w_valid, local_tgt, owned = _prepare(hidden, weight, vocab_start, targets, vocab_size)
    grad_h = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
    if n_valid > 0:
        c = chunk_tokens or default_chunk_tokens(T, n_valid)
        grad_step = _steps(compiled)[1]
        ws = _Workspace(min(c, T), n_valid, hidden.device, enabled=not compiled)
        g_lp = g_logp.float()
        g_ent = None if g_entropy is None else g_entropy.float()
        for sl in _chunks(T, c):
            blocks = ws.blocks(sl.stop - sl.start)
            z = _logits(hidden[sl], w_valid, blocks.get("z_out"))
            extra = {"e_out": blocks["e_out"]} if blocks else {}
            grad, gh = grad_step(z, local_tgt[sl], owned[sl], lse[sl], mean_logit[sl], g_lp[sl],
                                 None if g_ent is None else g_ent[sl], w_valid, **extra)
            grad_h[sl] = gh
            _accumulate_grad_w(grad_w[:n_valid], grad, hidden[sl])
    return grad_h.to(hidden.dtype), grad_w.to(weight.dtype)


@torch.no_grad()
def chunked_fused(hidden: torch.Tensor, weight: torch.Tensor, vocab_start: int, targets: torch.Tensor, *,
                  combine: CombineFn, coefficients: CoefficientFn, vocab_size: Optional[int] = None,
                  with_entropy: bool = True, chunk_tokens: Optional[int] = None, compiled: bool = False):
    """Gradient-in-forward over token chunks.

    For each chunk: logits block -> ShardStats -> `combine` (the caller's TP reduction; a pure
    function without TP) -> `coefficients(slice, TokenStats)` = (dL/dlogp, dL/dentropy or None) of
    the chunk's tokens -> dL/dz -> grad_hidden rows and grad_weight accumulation.
    Returns (TokenStats over all T, grad_hidden [T, H] partial over TP, grad_weight [V_local, H]).
    The chunk count and boundaries are identical on every TP rank (they depend on T and V_local),
    so per-chunk collectives inside `combine` line up.
    """
    T = hidden.shape[0]
    n_valid, w_valid, local_tgt, owned = _prepare(hidden, weight, vocab_start, targets, vocab_size)
    V_local = weight.shape[0]
    c = chunk_tokens or default_chunk_tokens(T, max(V_local, 1))
    stats_step, _, grad_step = _steps(compiled)
    ws = _Workspace(min(c, T), n_valid, hidden.device, enabled=(not compiled) and n_valid > 0)
    grad_h = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
    out = torch.empty(4, T, dtype=torch.float32, device=hidden.device)
    for sl in _chunks(T, c):
        n = sl.stop - sl.start
        if n_valid > 0:
            z, m, s, t, q, e = stats_step(hidden[sl], w_valid, local_tgt[sl], owned[sl], with_entropy,
                                          **ws.blocks(n))
            st = ShardStats(max=m, sumexp=s, target=t, sum_pz=q)
        else:
            z, e, st = None, None, _empty_stats(n, hidden.device)
        tok = combine(st)
        g_lp, g_ent = coefficients(sl, tok)
        out[0, sl], out[1, sl], out[2, sl], out[3, sl] = tok.lse, tok.mean_logit, tok.logprobs, tok.entropy
        if z is not None:
            grad, gh = grad_step(z, e, st.max, local_tgt[sl], owned[sl], tok.lse, tok.mean_logit, g_lp.float(),
                                 None if g_ent is None else g_ent.float(), w_valid)
            grad_h[sl] = gh
            _accumulate_grad_w(grad_w[:n_valid], grad, hidden[sl])
    stats = TokenStats(lse=out[0], mean_logit=out[1], logprobs=out[2], entropy=out[3])
    return stats, grad_h.to(hidden.dtype), grad_w.to(weight.dtype)
