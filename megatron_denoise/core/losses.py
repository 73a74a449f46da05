"""The policy-loss REFERENCE (METHOD.md section 3): the specification the fused kernel must match.

Per loss token t (loss_mask = 1), with A the advantage and r = exp(logp - old_logp):

    pg_t   = max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high))          PPO / DAPO clip-higher
    pg_t   = min(pg_t, -A c)  where A < 0                                 dual clip (c > 1), optional
    l_t    = pg_t + kl_coef * kl_t - entropy_coef * H_t
    kl_t   = logp - ref (k1)   or   exp(ref - logp) - (ref - logp) - 1 (k3)

force_on_policy replaces old_logp by logp.detach(): r == 1, the clip never binds, and the
gradient is -A * grad(logp) (the reference run).

Aggregation, with GLOBAL denominators passed in so that the loss of any micro-batch split sums to
the whole-batch loss (and gradient):

    token-mean           sum_t l_t / global_num_tokens
    seq-mean-token-sum   sum_s (sum_{t in s} l_t) / global_num_seqs
    seq-mean-token-mean  sum_s (sum_{t in s} l_t / n_s) / global_num_seqs,  n_s = loss tokens of s

Layouts: padded [rows, T] (a sequence per row), or packed [T] with `seq_ids` [T] (local sequence
index of each token). When one sequence is split over micro-batches or context-parallel ranks,
pass `seq_num_tokens` (its full token count n_s, indexed like the local sequences) for
seq-mean-token-mean.

Metrics are partial sums with the same global denominators (token metrics over
global_num_tokens): summing them over micro-batches and all-reducing over data-parallel ranks
yields the batch value. The caller performs every reduction; this function calls no collective.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

__all__ = ["LOSS_AGG_MODES", "KL_TYPES", "policy_loss", "local_loss_counts", "kl_penalty"]

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean")
KL_TYPES = ("k1", "k3")

Number = Union[int, float, torch.Tensor]


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kl_type: str) -> torch.Tensor:
    """Per-token KL estimate of the policy from the reference model: k1 (log ratio) or k3 (Schulman's
    non-negative, unbiased estimator)."""
    log_ratio = logprobs - ref_logprobs
    if kl_type == "k1":
        return log_ratio
    if kl_type == "k3":
        return torch.exp(-log_ratio) + log_ratio - 1.0
    raise ValueError(f"algorithm.kl.type ({kl_type!r}) must be one of {'|'.join(KL_TYPES)}")


def local_loss_counts(loss_mask: torch.Tensor, seq_ids: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss tokens, sequences with at least one loss token) of a local batch, as float tensors.
    The caller sums them over micro-batches and all-reduces them to get the global counts."""
    mask = loss_mask.to(torch.float64)
    tokens = mask.sum()
    if mask.dim() == 2:
        seqs = (mask.sum(-1) > 0).sum().to(torch.float64)
    else:
        if seq_ids is None:
            raise ValueError("a packed (1-D) loss_mask needs seq_ids")
        per_seq = torch.zeros(int(seq_ids.max()) + 1 if seq_ids.numel() else 0, dtype=torch.float64,
                              device=mask.device)
        per_seq.index_add_(0, seq_ids, mask)
        seqs = (per_seq > 0).sum().to(torch.float64)
    return tokens, seqs


def _as_scalar(x: Number, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(x, dtype=like.dtype, device=like.device)


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: Optional[torch.Tensor],
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: Optional[float] = None,
    force_on_policy: bool = False,
    loss_agg: str = "token-mean",
    global_num_tokens: Optional[Number] = None,
    global_num_seqs: Optional[Number] = None,
    seq_ids: Optional[torch.Tensor] = None,
    seq_num_tokens: Optional[torch.Tensor] = None,
    entropy: Optional[torch.Tensor] = None,
    entropy_coef: float = 0.0,
    ref_logprobs: Optional[torch.Tensor] = None,
    kl_coef: float = 0.0,
    kl_type: str = "k3",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped policy-gradient loss of a (micro-)batch, normalised by global counts.

    logprobs      [rows, T] or [T]  log pi(token) under the current policy (requires grad)
    old_logprobs  same shape        behaviour log-probs (ignored when force_on_policy; required otherwise)
    advantages    [rows] (broadcast over T), [rows, T], or [T] (packed)
    loss_mask     same shape as logprobs; 1 = token gets gradient (0/1, any dtype)
    global_num_tokens  required for token-mean (and used to normalise token metrics); defaults to
                       the local count, which is only right for a whole, unsplit batch
    global_num_seqs    required for the seq-mean modes; same default caveat
    seq_ids       [T] long, packed layout only: local sequence index of each token
    seq_num_tokens [S] loss tokens of each local sequence over its WHOLE length (seq-mean-token-mean
                   with sequences split across micro-batches / CP ranks); default: counted locally
    entropy       per-token entropy, same shape (logged; enters the loss with -entropy_coef)
    ref_logprobs  reference-model log-probs, same shape (needed when kl_coef != 0; logged if given)

    Returns (loss, metrics): a 0-dim loss and detached 0-dim metric tensors pg_loss, clip_fraction,
    dual_clip_fraction, ratio_mean, approx_kl (k3 of old vs current), and entropy / kl when given.
    """
    if loss_agg not in LOSS_AGG_MODES:
        raise ValueError(f"algorithm.loss_agg ({loss_agg!r}) must be one of {'|'.join(LOSS_AGG_MODES)}")
    if clip_low < 0 or clip_high < 0:
        raise ValueError(f"clip_low ({clip_low}) and clip_high ({clip_high}) must be >= 0")
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"algorithm.dual_clip ({dual_clip}) must be > 1 (or null)")
    if logprobs.dim() not in (1, 2):
        raise ValueError(f"logprobs must be [rows, T] or packed [T], got shape {tuple(logprobs.shape)}")
    if loss_mask.shape != logprobs.shape:
        raise ValueError(f"loss_mask shape {tuple(loss_mask.shape)} != logprobs shape {tuple(logprobs.shape)}")
    packed = logprobs.dim() == 1
    if packed and seq_ids is None and loss_agg != "token-mean":
        raise ValueError(f"packed (1-D) inputs with loss_agg={loss_agg!r} need seq_ids")

    mask = loss_mask.to(logprobs.dtype)
    if force_on_policy:
        old = logprobs.detach()
    else:
        if old_logprobs is None:
            raise ValueError("old_logprobs is required unless force_on_policy")
        old = old_logprobs.to(logprobs.dtype)
    adv = advantages.to(logprobs.dtype)
    if adv.dim() == 1 and not packed:
        adv = adv[:, None]  # [rows] -> [rows, 1], broadcast over tokens
    adv = adv.expand_as(logprobs)

    local_tokens, local_seqs = local_loss_counts(loss_mask, seq_ids if packed else None)
    n_tok = _as_scalar(local_tokens if global_num_tokens is None else global_num_tokens, logprobs)
    n_seq = _as_scalar(local_seqs if global_num_seqs is None else global_num_seqs, logprobs)
    n_tok_safe = n_tok.clamp_min(1.0)  # an all-masked global batch contributes 0, not NaN

    # --- per-token surrogate ---
    log_ratio = logprobs - old
    ratio = torch.exp(log_ratio)
    pg1 = -adv * ratio
    pg2 = -adv * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    pg = torch.maximum(pg1, pg2)
    clipped = (pg2 > pg1).to(logprobs.dtype)
    if dual_clip is not None:
        pg3 = -adv * dual_clip
        negative = adv < 0
        dual_clipped = (negative & (pg > pg3)).to(logprobs.dtype)
        pg = torch.where(negative, torch.minimum(pg, pg3), pg)
    else:
        dual_clipped = torch.zeros_like(pg)
    per_token = pg
    kl = None
    if ref_logprobs is not None:
        kl = kl_penalty(logprobs, ref_logprobs.to(logprobs.dtype), kl_type)
        if kl_coef != 0.0:
            per_token = per_token + kl_coef * kl
    elif kl_coef != 0.0:
        raise ValueError("kl_coef != 0 needs ref_logprobs")
    if entropy is not None and entropy_coef != 0.0:
        per_token = per_token - entropy_coef * entropy
    elif entropy is None and entropy_coef != 0.0:
        raise ValueError("entropy_coef != 0 needs the per-token entropy")

    # --- aggregation ---
    def aggregate(x: torch.Tensor) -> torch.Tensor:
        xm = x * mask
        if loss_agg == "token-mean":
            return xm.sum() / n_tok_safe
        if packed:
            num_local = int(seq_ids.max()) + 1 if seq_ids.numel() else 0
            seq_sum = torch.zeros(num_local, dtype=x.dtype, device=x.device).index_add(0, seq_ids, xm)
            seq_cnt = torch.zeros(num_local, dtype=x.dtype, device=x.device).index_add(0, seq_ids, mask)
        else:
            seq_sum, seq_cnt = xm.sum(-1), mask.sum(-1)
        if loss_agg == "seq-mean-token-mean":
            if seq_num_tokens is not None:
                seq_cnt = seq_num_tokens.to(x.dtype)
                if seq_cnt.shape != seq_sum.shape:
                    raise ValueError(f"seq_num_tokens has shape {tuple(seq_cnt.shape)}, expected "
                                     f"{tuple(seq_sum.shape)} (one entry per local sequence)")
            seq_sum = seq_sum / seq_cnt.clamp_min(1.0)
        return seq_sum.sum() / n_seq.clamp_min(1.0)

    loss = aggregate(per_token)

    with torch.no_grad():
        def token_metric(x: torch.Tensor) -> torch.Tensor:
            return (x * mask).sum() / n_tok_safe

        metrics = {
            "pg_loss": aggregate(pg.detach()),
            "clip_fraction": token_metric(clipped),
            "dual_clip_fraction": token_metric(dual_clipped),
            "ratio_mean": token_metric(ratio.detach()),
            "approx_kl": token_metric(torch.exp(-log_ratio.detach()) + log_ratio.detach() - 1.0),
        }
        if entropy is not None:
            metrics["entropy"] = token_metric(entropy.detach())
        if kl is not None:
            metrics["kl"] = token_metric(kl.detach())
    return loss, metrics
