"""Rollout-training mismatch, measured and corrected; the KL reward penalty (pure torch, no engine).

The rollout engine samples continuation token t from pi_engine (vLLM kernels, maybe bf16); the
actor trains on pi_train (Megatron, the same weights). Per continuation token, with both log-probs
token-aligned like the actor's ([rows, W], position t scores input_ids[:, t]):

    log r_t = log pi_train(t) - log pi_engine(t)          r_t: the token ratio (1 if no mismatch)
    k3_t    = r_t - 1 - log r_t                            KL(pi_engine || pi_train), sampled from
                                                           the engine: non-negative, low variance
    beyond  = r_t > threshold  or  r_t < 1 / threshold

Only tokens the engine sampled count: continuation tokens that get gradient. Prefix tokens (a
weak model wrote them) have no engine log-prob and are never measured nor reweighted, also in
`shift` mode where they are trained.

Corrections (algorithm.mismatch, both off by default):
    token-level truncated IS   w_t = min(r_t, tis_cap) multiplies the token's policy loss
                               (detached; 1 on tokens without an engine log-prob)
    sequence-level masking     a row whose sequence ratio exp(mean_t log r_t) leaves
                               [seq_mask_low, seq_mask_high] gets loss mask 0 (dropped)

Metrics are per row kind (RowKind value: main, denoise, fallback):
    mismatch/<kind>/ratio_mean, ratio_max, k3, frac_beyond, tokens, and seq_masked (rows dropped).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Sequence

from megatron_denoise.config.schema import KLEstimator, MismatchConfig

if TYPE_CHECKING:
    import torch

    from megatron_denoise.core.types import Rollout

__all__ = ["engine_logprobs", "MismatchResult", "measure_and_correct", "kl_reward_penalty"]


def engine_logprobs(rows: Sequence["Rollout"], response_start: "torch.Tensor", width: int
                    ) -> tuple["torch.Tensor", "torch.Tensor"]:
    """(engine log-probs [rows, W], have [rows, W] 0/1) token-aligned with the packed batch
    (core.fold.pack): continuation token j of row r sits at response_start[r] + p + j. Rows whose
    completion carries no log-probs have `have` 0 everywhere."""
    import torch

    lp = torch.zeros(len(rows), width, dtype=torch.float32)
    have = torch.zeros(len(rows), width, dtype=torch.float32)
    for r, row in enumerate(rows):
        vals = row.completion.logprobs
        if vals is None or len(vals) == 0:
            continue
        start = int(response_start[r]) + row.prefix_length
        n = len(vals)
        if start + n > width:
            raise ValueError(f"row {r}: {n} continuation log-probs from position {start} exceed the width {width}")
        lp[r, start:start + n] = torch.tensor(vals, dtype=torch.float32)
        have[r, start:start + n] = 1.0
    return lp, have


@dataclass
class MismatchResult:
    loss_mask: "torch.Tensor"             # [rows, W]: the input mask with masked rows zeroed
    is_weights: Optional["torch.Tensor"]  # [rows, W] truncated IS weights, or None (TIS off)
    metrics: dict
    seq_ratio: "torch.Tensor"             # [rows] exp(mean log r) over the measured tokens (1: none)


def measure_and_correct(train_logprobs: "torch.Tensor", engine_lp: "torch.Tensor", have: "torch.Tensor",
                        loss_mask: "torch.Tensor", kinds: Sequence[str], cfg: MismatchConfig) -> MismatchResult:
    """Mismatch metrics per row kind and the configured corrections (module docstring).

    train_logprobs: the actor's log-probs with the weights the engine sampled with (the
    old-log-prob pass); engine_lp / have from `engine_logprobs`; kinds: one RowKind value per row.
    """
    import torch

    tl = train_logprobs.to(torch.float64)
    el = engine_lp.to(torch.float64)
    m = (have.to(torch.float64) * (loss_mask > 0).to(torch.float64))
    log_r = (tl - el) * m
    r = torch.exp(log_r)
    k3 = (r - 1.0 - log_r) * m
    thr = float(cfg.threshold)
    beyond = ((r > thr) | (r < 1.0 / thr)).to(torch.float64) * m
    n_row = m.sum(-1)
    seq_ratio = torch.exp(log_r.sum(-1) / n_row.clamp_min(1.0))

    drop = torch.zeros(len(kinds), dtype=torch.bool)
    if cfg.seq_mask_low is not None:
        drop |= (seq_ratio < cfg.seq_mask_low) & (n_row > 0)
    if cfg.seq_mask_high is not None:
        drop |= (seq_ratio > cfg.seq_mask_high) & (n_row > 0)
    new_mask = loss_mask * (~drop).to(loss_mask.dtype)[:, None]

    weights = None
    if cfg.tis_cap is not None:
        w = torch.where(m > 0, r.clamp(max=float(cfg.tis_cap)), torch.ones_like(r))
        weights = w.to(torch.float32)

    metrics: dict[str, float] = {}
    for kind in sorted(set(kinds)):
        sel = torch.tensor([k == kind for k in kinds])
        mk = m[sel]
        tokens = float(mk.sum())
        pre = f"mismatch/{kind}/"
        metrics[pre + "seq_masked"] = float(drop[sel].sum())
        if tokens == 0:
            continue
        metrics[pre + "tokens"] = tokens
        metrics[pre + "ratio_mean"] = float((r[sel] * mk).sum() / tokens)
        metrics[pre + "ratio_max"] = float(torch.where(mk > 0, r[sel], torch.zeros_like(mk)).max())
        metrics[pre + KLEstimator.K3.value] = float(k3[sel].sum() / tokens)  # the key: .../k3
        metrics[pre + "frac_beyond"] = float(beyond[sel].sum() / tokens)
        if weights is not None:
            metrics[pre + "tis_clipped"] = float(((r[sel] > float(cfg.tis_cap)).to(torch.float64) * mk).sum() / tokens)
    return MismatchResult(loss_mask=new_mask, is_weights=weights, metrics=metrics, seq_ratio=seq_ratio.float())


def kl_reward_penalty(logprobs: "torch.Tensor", ref_logprobs: "torch.Tensor", loss_mask: "torch.Tensor",
                      coef: float, kl_type: KLEstimator) -> "torch.Tensor":
    """Per-row reward penalty [rows] of algorithm.kl.use=reward: coef x the sum of the row's
    per-token KL estimate over its loss tokens (subtract it from the row's reward before the
    advantages: the PPO-style in-reward KL)."""
    import torch

    from megatron_denoise.core.losses import kl_penalty

    kl = kl_penalty(logprobs.to(torch.float64), ref_logprobs.to(torch.float64), kl_type)
    return coef * (kl * (loss_mask > 0).to(torch.float64)).sum(-1)
