"""The policy-loss REFERENCE (METHOD.md section 3): the specification the fused kernel must match.

Per loss token t (loss_mask = 1), with A the advantage, r = exp(logp - old_logp) and w an optional
detached per-token importance weight (truncated IS against the rollout engine, `core.mismatch`):

  policy_loss_type = ppo (PolicyLoss.PPO)
    pg_t = max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high))                PPO / DAPO clip-higher
    pg_t = min(pg_t, -A c)  where A < 0                                       dual clip (c > 1), optional
  policy_loss_type = gspo (sequence-level ratio, GSPO-token form)
    s_t  = exp(sg(mean_{u in seq(t)} (logp_u - old_u)) + logp_t - sg(logp_t))  (value: the sequence
           ratio; gradient: s * grad logp_t), then the same clip / dual clip with s_t for r
  policy_loss_type = cispo (clipped IS weight, stop-gradient, every token keeps its gradient)
    pg_t = -A sg(clip(r, 1 - clip_low, 1 + cispo_clip_high)) exp(logp_t - sg(logp_t))
           (value -A w_c, gradient -A w_c grad logp_t)

    l_t  = w_t pg_t + kl_coef * kl_t - entropy_coef * H_t
    kl_t = k1: log q   k2: (log q)^2 / 2   k3: exp(-log q) + log q - 1, clamped to [-10, 10]
           with log q = logp - ref_logp (KLEstimator; k3 is the low-variance one, verl's low_var_kl)

force_on_policy replaces old_logp by logp.detach(): r == 1, the clip never binds, and the
gradient is -A * grad(logp) (the reference run).

Aggregation (LossAgg), with GLOBAL denominators passed in so that the loss of any micro-batch
split sums to the whole-batch loss (and gradient):

    token-mean               sum_t l_t / global_num_tokens
    seq-mean-token-sum       sum_s (sum_{t in s} l_t) / global_num_seqs
    seq-mean-token-mean      sum_s (sum_{t in s} l_t / n_s) / global_num_seqs,  n_s = loss tokens of s
    seq-mean-token-sum-norm  sum_t l_t / (global_num_seqs * loss_norm_tokens)   (Dr. GRPO: a constant)

Layouts: padded [rows, T] (a sequence per row), or packed [T] with `seq_ids` [T] (local sequence
index of each token). When one sequence is split over micro-batches or context-parallel ranks,
pass `seq_num_tokens` (its full token count n_s, indexed like the local sequences) for
seq-mean-token-mean; a call may then hold no token at all of some of those sequences (a CP rank)
or none at all (an empty micro-batch): they contribute 0. GSPO needs whole sequences in a call.

Metrics are partial sums with the same global denominators (token metrics over
global_num_tokens): summing them over micro-batches and all-reducing over data-parallel ranks
yields the batch value. The caller performs every reduction; this function calls no collective.
Allowed values of every enumerated argument are the schema's types (config.schema); the config
loader checks them, so this module does not re-check them.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from megatron_denoise.config.schema import KLEstimator, LossAgg, PolicyLoss

__all__ = ["LOSS_AGG_MODES", "KL_TYPES", "POLICY_LOSSES", "policy_loss", "local_loss_counts", "kl_penalty",
           "sequence_sums"]

LOSS_AGG_MODES = LossAgg.values()
KL_TYPES = KLEstimator.values()
POLICY_LOSSES = PolicyLoss.values()
K3_CLAMP = 10.0  # verl's low_var_kl bound

Number = Union[int, float, torch.Tensor]


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kl_type: KLEstimator) -> torch.Tensor:
    """Per-token KL estimate of the policy from the reference policy, on tokens sampled from the
    policy: k1 (log ratio, unbiased), k2 (half squared log ratio) or k3 (Schulman's non-negative,
    unbiased, low-variance estimator, clamped to [-10, 10] as verl's low_var_kl)."""
    log_ratio = logprobs - ref_logprobs
    if kl_type == KLEstimator.K1:
        return log_ratio
    if kl_type == KLEstimator.K2:
        return 0.5 * log_ratio.square()
    if kl_type == KLEstimator.K3:
        return (torch.exp(-log_ratio) + log_ratio - 1.0).clamp(-K3_CLAMP, K3_CLAMP)
    raise ValueError(f"algorithm.kl.type ({kl_type!r}) must be one of {' | '.join(KL_TYPES)}")


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


def sequence_sums(x: torch.Tensor, mask: torch.Tensor, seq_ids: Optional[torch.Tensor],
                  num_seqs: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-sequence sum of x * mask, per-sequence loss tokens), each [S].

    Padded [rows, T]: one sequence per row. Packed [T]: by seq_ids; `num_seqs` fixes S (a call
    may hold no token of its last sequences, or none at all); masked tokens whose id is >= S
    (padding) are dropped."""
    xm = x * mask
    if x.dim() == 2:
        return xm.sum(-1), mask.sum(-1)
    n = (int(seq_ids.max()) + 1 if seq_ids.numel() else 0) if num_seqs is None else int(num_seqs)
    sums = torch.zeros(n, dtype=x.dtype, device=x.device)
    cnts = torch.zeros(n, dtype=x.dtype, device=x.device)
    if n == 0 or seq_ids.numel() == 0:
        return sums + 0.0 * xm.sum(), cnts  # keeps the graph connected
    inside = seq_ids < n
    if not bool(inside.all()):
        if bool((mask[~inside] != 0).any()):
            raise ValueError(f"loss tokens of sequence ids >= {n} (seq_num_tokens has {n} entries)")
        ids = seq_ids.clamp(max=n - 1)
        xm = torch.where(inside, xm, torch.zeros_like(xm))
        mk = torch.where(inside, mask, torch.zeros_like(mask))
    else:
        ids, mk = seq_ids, mask
    return sums.index_add(0, ids, xm), cnts.index_add(0, ids, mk)


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
    policy_loss_type: PolicyLoss = PolicyLoss.PPO,
    cispo_clip_high: float = 0.28,
    loss_agg: LossAgg = LossAgg.TOKEN_MEAN,
    global_num_tokens: Optional[Number] = None,
    global_num_seqs: Optional[Number] = None,
    loss_norm_tokens: Optional[Number] = None,
    seq_ids: Optional[torch.Tensor] = None,
    seq_num_tokens: Optional[torch.Tensor] = None,
    is_weights: Optional[torch.Tensor] = None,
    entropy: Optional[torch.Tensor] = None,
    entropy_coef: float = 0.0,
    ref_logprobs: Optional[torch.Tensor] = None,
    kl_coef: float = 0.0,
    kl_type: KLEstimator = KLEstimator.K3,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Policy-gradient loss of a (micro-)batch, normalised by global counts (module docstring).

    logprobs      [rows, T] or [T]  log pi(token) under the current policy (requires grad)
    old_logprobs  same shape        behaviour log-probs (ignored when force_on_policy; required otherwise)
    advantages    [rows] (broadcast over T), [rows, T], or [T] (packed)
    loss_mask     same shape as logprobs; 1 = token gets gradient (0/1, any dtype)
    policy_loss_type  ppo | gspo | cispo (config.schema.PolicyLoss)
    global_num_tokens  required for token-mean (and used to normalise token metrics); defaults to
                       the local count, which is only right for a whole, unsplit batch
    global_num_seqs    required for the seq-mean modes; same default caveat
    loss_norm_tokens   the Dr. GRPO constant of seq-mean-token-sum-norm (e.g. the max response length)
    seq_ids       [T] long, packed layout only: local sequence index of each token
    seq_num_tokens [S] loss tokens of each local sequence over its WHOLE length (seq-mean-token-mean
                   with sequences split across micro-batches / CP ranks); default: counted locally
    is_weights    same shape, detached per-token weights of the policy term (truncated IS)
    entropy       per-token entropy, same shape (logged; enters the loss with -entropy_coef)
    ref_logprobs  reference-model log-probs, same shape (needed when kl_coef != 0; logged if given)

    Returns (loss, metrics): a 0-dim loss and detached 0-dim metric tensors pg_loss, clip_fraction,
    dual_clip_fraction, ratio_mean, approx_kl (k3 of old vs current), and entropy / kl when given.
    """
    if clip_low < 0 or clip_high < 0:
        raise ValueError(f"clip_low ({clip_low}) and clip_high ({clip_high}) must be >= 0")
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"algorithm.dual_clip ({dual_clip}) must be > 1 (or null)")
    if logprobs.dim() not in (1, 2):
        raise ValueError(f"logprobs must be [rows, T] or packed [T], got shape {tuple(logprobs.shape)}")
    if loss_mask.shape != logprobs.shape:
        raise ValueError(f"loss_mask shape {tuple(loss_mask.shape)} != logprobs shape {tuple(logprobs.shape)}")
    packed = logprobs.dim() == 1
    per_seq = loss_agg in (LossAgg.SEQ_MEAN_TOKEN_SUM, LossAgg.SEQ_MEAN_TOKEN_MEAN) \
        or policy_loss_type == PolicyLoss.GSPO
    if packed and seq_ids is None and per_seq:
        raise ValueError(f"packed (1-D) inputs with loss_agg={str(loss_agg)!r} / policy_loss="
                         f"{str(policy_loss_type)!r} need seq_ids")
    if loss_agg == LossAgg.SEQ_MEAN_TOKEN_SUM_NORM and loss_norm_tokens is None:
        raise ValueError(f"loss_agg={str(loss_agg)!r} needs loss_norm_tokens (algorithm.loss_norm_tokens)")

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
    num_seqs = None if (not packed or seq_num_tokens is None) else int(seq_num_tokens.shape[0])

    # --- per-token surrogate ---
    log_ratio = logprobs - old
    ratio = torch.exp(log_ratio)
    if policy_loss_type == PolicyLoss.CISPO:
        w_c = torch.clamp(ratio.detach(), 1.0 - clip_low, 1.0 + cispo_clip_high)
        pg = -adv * w_c * torch.exp(logprobs - logprobs.detach())
        clipped = (w_c != ratio.detach()).to(logprobs.dtype)
        dual_clipped = torch.zeros_like(pg)
    else:
        r = ratio
        if policy_loss_type == PolicyLoss.GSPO:
            s_sum, s_cnt = sequence_sums(log_ratio.detach(), mask, seq_ids if packed else None, num_seqs)
            s_mean = s_sum / s_cnt.clamp_min(1.0)
            tok_mean = s_mean[:, None].expand_as(logprobs) if not packed else (
                s_mean[seq_ids.clamp(max=max(s_mean.shape[0] - 1, 0))] if s_mean.numel() else torch.zeros_like(logprobs))
            r = torch.exp(tok_mean + logprobs - logprobs.detach())
        pg1 = -adv * r
        pg2 = -adv * torch.clamp(r, 1.0 - clip_low, 1.0 + clip_high)
        pg = torch.maximum(pg1, pg2)
        clipped = (pg2 > pg1).to(logprobs.dtype)
        if dual_clip is not None:
            pg3 = -adv * dual_clip
            negative = adv < 0
            dual_clipped = (negative & (pg > pg3)).to(logprobs.dtype)
            pg = torch.where(negative, torch.minimum(pg, pg3), pg)
        else:
            dual_clipped = torch.zeros_like(pg)
    if is_weights is not None:
        if is_weights.shape != logprobs.shape:
            raise ValueError(f"is_weights shape {tuple(is_weights.shape)} != logprobs shape {tuple(logprobs.shape)}")
        pg = pg * is_weights.to(logprobs.dtype).detach()
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
        if loss_agg == LossAgg.TOKEN_MEAN:
            return (x * mask).sum() / n_tok_safe
        if loss_agg == LossAgg.SEQ_MEAN_TOKEN_SUM_NORM:
            denom = n_seq.clamp_min(1.0) * _as_scalar(loss_norm_tokens, x)
            return (x * mask).sum() / denom
        seq_sum, seq_cnt = sequence_sums(x, mask, seq_ids if packed else None, num_seqs)
        if loss_agg == LossAgg.SEQ_MEAN_TOKEN_MEAN:
            if seq_num_tokens is not None:
                seq_cnt = seq_num_tokens.to(x.dtype)
                if seq_cnt.shape != seq_sum.shape:
                    raise ValueError(f"seq_num_tokens has shape {tuple(seq_cnt.shape)}, expected "
                                     f"{tuple(seq_sum.shape)} (one entry per local sequence)")
            seq_sum = seq_sum / seq_cnt.clamp_min(1.0)
        elif loss_agg != LossAgg.SEQ_MEAN_TOKEN_SUM:
            raise ValueError(f"algorithm.loss_agg ({loss_agg!r}) must be one of {' | '.join(LOSS_AGG_MODES)}")
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
