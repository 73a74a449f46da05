"""`fused_policy_loss`: the algorithm core's policy loss on hidden states and a vocab shard,
without ever holding [T, V] logits. Drop-in for `reference.reference_policy_loss` (same signature).

Two gradient strategies, chosen by `grad_mode` (auto: `in_forward` for the chunked CPU path,
`recompute` for Triton):

- recompute: log-probs / entropy come from the differentiable `vocab_parallel_logprobs` op
  (phase 1 + TP combine in forward, phase 2 recomputing the logits in backward); the loss is
  `core.losses.policy_loss` applied to them. Log-probs stay differentiable; 4 GEMM passes.
- in_forward: per token chunk, logits -> stats -> TP combine -> the core's loss on that chunk's
  tokens (global denominators make it additive over any token split) -> its per-token gradient
  dL/dlogp, dL/dentropy (autograd on [c] vectors) -> dL/dz -> gradient of hidden and weight. The
  gradient is stored and returned by backward scaled by the upstream scalar. 3 GEMM passes.

Sequence packing: tokens of several sequences share T; `seq_ids` [T] says which, and for
seq-mean-token-mean the per-sequence token counts are taken over the WHOLE micro-batch (or from
`seq_num_tokens` when a sequence is split over micro-batches / context-parallel ranks), never over
a chunk, so chunking changes nothing. Context parallelism: each CP rank passes its own tokens
with global denominators (and seq_num_tokens); the op does not care where the tokens came from.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from megatron_denoise import collectives as coll
from megatron_denoise.config.schema import KLEstimator, LossAgg, PolicyLoss
from megatron_denoise.core.losses import local_loss_counts, policy_loss

from .chunked import chunked_fused, chunked_stats
from .dispatch import resolve_impl
from .reference import PolicyLossOutput, core_seq_ids, reference_policy_loss
from .stats import ShardStats, TokenStats, combine_stats
from .vocab_parallel import all_reduce_grad_hidden, validate_inputs, vocab_parallel_logprobs

GRAD_MODES = ("auto", "recompute", "in_forward")


class _PrecomputedGrad(torch.autograd.Function):
    """Returns `loss`; backward hands out gradients computed in the forward pass, times dL."""

    @staticmethod
    def forward(ctx, loss, hidden, weight, grad_hidden, grad_weight):
        ctx.save_for_backward(grad_hidden, grad_weight)
        return loss.detach().clone()

    @staticmethod
    def backward(ctx, g):
        grad_hidden, grad_weight = ctx.saved_tensors
        if bool(g == 1):  # the usual case: no [V, H] temporary
            return None, grad_hidden, grad_weight, None, None
        return None, grad_hidden * g.to(grad_hidden.dtype), grad_weight * g.to(grad_weight.dtype), None, None


def _per_seq_counts(mask: torch.Tensor, seq_ids: torch.Tensor) -> torch.Tensor:
    """Loss tokens of each local sequence [S] over the whole micro-batch."""
    n = int(seq_ids.max()) + 1 if seq_ids.numel() else 0
    return torch.zeros(n, dtype=torch.float32, device=mask.device).index_add_(0, seq_ids, mask.float())


def fused_policy_loss(
    hidden: torch.Tensor,
    weight_shard: torch.Tensor,
    vocab_start: int,
    targets: torch.Tensor,
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
    return_entropy: bool = False,
    loss_agg: LossAgg = LossAgg.TOKEN_MEAN,
    global_num_tokens: Optional[float] = None,
    global_num_seqs: Optional[float] = None,
    loss_norm_tokens: Optional[float] = None,
    seq_ids: Optional[torch.Tensor] = None,
    seq_num_tokens: Optional[torch.Tensor] = None,
    is_weights: Optional[torch.Tensor] = None,
    vocab_size: Optional[int] = None,
    entropy_coef: float = 0.0,
    ref_logprobs: Optional[torch.Tensor] = None,
    kl_coef: float = 0.0,
    kl_type: KLEstimator = KLEstimator.K3,
    tp_group: Optional[Any] = None,
    impl: str = "auto",
    grad_mode: str = "auto",
    chunk_tokens: Optional[int] = None,
    reduce_grad_hidden: bool = True,
) -> PolicyLossOutput:
    """Clipped policy loss of T packed tokens from hidden [T, H] and the local vocab shard.

    weight_shard [V_local, H] holds global vocab rows [vocab_start, vocab_start + V_local); rows at
    global id >= vocab_size are padding (excluded). targets, old_logprobs, advantages, loss_mask,
    seq_ids, is_weights, ref_logprobs: [T]. Loss semantics and keyword names:
    `megatron_denoise.core.losses.policy_loss` (global_num_tokens / global_num_seqs default to the
    counts of THIS call, right only for an unsplit batch). return_entropy: also return the
    per-token entropy. GSPO needs whole sequences, so it always takes the recompute path.
    tp_group: the vocab-parallel group (None: weight_shard is the whole vocabulary); the forward
    runs two all-reduces of [T]-sized vectors (recompute) or one scalar MIN plus two per token
    chunk (in_forward), and one all-reduce of grad_hidden [T, H] unless reduce_grad_hidden=False
    (then the caller reduces it, e.g. Megatron's copy_to_tensor_model_parallel_region or a
    sequence-parallel reduce-scatter).
    impl: auto | triton | chunked | chunked_compiled | reference (dispatch.py).
    grad_mode: auto | recompute | in_forward (module docstring). The returned log-probs and
    entropy are detached in every mode (use `vocab_parallel_logprobs` for differentiable ones).
    """
    name = resolve_impl(impl, hidden.device)
    mask = loss_mask
    core_kw = dict(clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, force_on_policy=force_on_policy,
                   policy_loss_type=policy_loss_type, cispo_clip_high=cispo_clip_high, loss_agg=loss_agg,
                   loss_norm_tokens=loss_norm_tokens, entropy_coef=entropy_coef, kl_coef=kl_coef, kl_type=kl_type)
    if name == "reference":
        return reference_policy_loss(hidden, weight_shard, vocab_start, targets, old_logprobs, advantages,
                                     mask, tp_group=tp_group, return_entropy=return_entropy,
                                     global_num_tokens=global_num_tokens, global_num_seqs=global_num_seqs,
                                     seq_ids=seq_ids, seq_num_tokens=seq_num_tokens, is_weights=is_weights,
                                     vocab_size=vocab_size, ref_logprobs=ref_logprobs, **core_kw)
    validate_inputs(hidden, weight_shard, vocab_start, targets, vocab_size)
    T = hidden.shape[0]
    seq_ids = core_seq_ids(seq_ids, loss_agg, T, targets.device)
    for key, x in (("old_logprobs", old_logprobs), ("advantages", advantages), ("loss_mask", mask),
                   ("seq_ids", seq_ids), ("is_weights", is_weights), ("ref_logprobs", ref_logprobs)):
        if x is not None and x.shape != (T,):
            raise ValueError(f"{key} must be [T={T}] (packed tokens), got shape {tuple(x.shape)}")
    if grad_mode not in GRAD_MODES:
        raise ValueError(f"grad_mode {grad_mode!r} is not one of {', '.join(GRAD_MODES)}")
    if grad_mode == "auto":
        grad_mode = "recompute" if name == "triton" else "in_forward"
    if policy_loss_type == PolicyLoss.GSPO:
        grad_mode = "recompute"  # the sequence ratio needs every token's log-prob before any loss
    if grad_mode == "in_forward" and name == "triton":
        raise ValueError("grad_mode='in_forward' exists only for the chunked implementations")
    need_entropy = return_entropy or entropy_coef != 0.0
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight_shard.requires_grad)

    if grad_mode == "recompute" or not needs_grad:
        logp, ent = vocab_parallel_logprobs(hidden, weight_shard, vocab_start, targets, vocab_size=vocab_size,
                                            entropy=need_entropy, tp_group=tp_group, impl=name,
                                            reduce_grad_hidden=reduce_grad_hidden, chunk_tokens=chunk_tokens)
        loss, metrics = policy_loss(
            logp, old_logprobs, advantages, mask, global_num_tokens=global_num_tokens,
            global_num_seqs=global_num_seqs, seq_ids=seq_ids, seq_num_tokens=seq_num_tokens,
            is_weights=is_weights, entropy=ent, ref_logprobs=ref_logprobs, **core_kw)
        return PolicyLossOutput(loss=loss, logprobs=logp.detach(),
                                entropy=ent.detach() if (return_entropy and ent is not None) else None,
                                clip_fraction=metrics["clip_fraction"], metrics=metrics)

    # ---- gradient in forward (chunked) ----
    # Fix every denominator over the WHOLE call first: then the core's loss of a chunk of tokens is
    # exactly that chunk's share of the total (the property the core's micro-batch test proves).
    if (global_num_tokens is None or global_num_seqs is None) and seq_ids is not None:
        loc_tok, loc_seq = local_loss_counts(mask, seq_ids)
        global_num_tokens = loc_tok if global_num_tokens is None else global_num_tokens
        global_num_seqs = loc_seq if global_num_seqs is None else global_num_seqs
    if loss_agg == LossAgg.SEQ_MEAN_TOKEN_MEAN and seq_num_tokens is None:
        if seq_ids is None:
            raise ValueError("packed (1-D) inputs with loss_agg='seq-mean-token-mean' need seq_ids")
        seq_num_tokens = _per_seq_counts(mask, seq_ids)
    metrics: dict[str, torch.Tensor] = {}
    loss_total = torch.zeros((), dtype=torch.float32, device=hidden.device)

    def coefficients(sl: slice, tok: TokenStats):
        nonlocal loss_total
        with torch.enable_grad():
            lp = tok.logprobs.detach().requires_grad_(True)
            en = tok.entropy.detach().requires_grad_(True) if need_entropy else None
            ids = seq_ids[sl] if seq_ids is not None else None
            # every chunk sees the whole micro-batch's sequence counts (a chunk may hold no token
            # of some sequences): its loss is exactly its share of the total
            counts = seq_num_tokens if loss_agg == LossAgg.SEQ_MEAN_TOKEN_MEAN else None
            loss_c, met_c = policy_loss(
                lp, None if old_logprobs is None else old_logprobs[sl], advantages[sl], mask[sl],
                global_num_tokens=global_num_tokens, global_num_seqs=global_num_seqs, seq_ids=ids,
                seq_num_tokens=counts, is_weights=None if is_weights is None else is_weights[sl], entropy=en,
                ref_logprobs=None if ref_logprobs is None else ref_logprobs[sl], **core_kw)
            inputs = [lp] + ([en] if en is not None else [])
            grads = torch.autograd.grad(loss_c, inputs, allow_unused=True)
        loss_total = loss_total + loss_c.detach().float()
        for k, v in met_c.items():
            metrics[k] = metrics[k] + v if k in metrics else v
        g_lp = grads[0] if grads[0] is not None else torch.zeros_like(lp)
        g_en = None
        if en is not None:
            g_en = grads[1] if grads[1] is not None else torch.zeros_like(en)
        return g_lp.detach(), (None if g_en is None else g_en.detach())

    def combine(st: ShardStats) -> TokenStats:
        return combine_stats(st, tp_group)

    if tp_group is not None:
        # Every rank must walk the same chunks (per-chunk collectives in `combine`); shards of
        # unequal size would pick different default chunk sizes: agree on the smallest.
        import torch.distributed as dist

        from .chunked import default_chunk_tokens

        c = torch.tensor([chunk_tokens or default_chunk_tokens(T, max(weight_shard.shape[0], 1))])
        coll.all_reduce(c, op=dist.ReduceOp.MIN, group=tp_group)
        chunk_tokens = int(c.item())
    tok, grad_h, grad_w = chunked_fused(
        hidden.detach(), weight_shard.detach(), vocab_start, targets, combine=combine, coefficients=coefficients,
        vocab_size=vocab_size, with_entropy=need_entropy, chunk_tokens=chunk_tokens,
        compiled=(name == "chunked_compiled"))
    if reduce_grad_hidden:
        grad_h = all_reduce_grad_hidden(grad_h, tp_group)
    loss = _PrecomputedGrad.apply(loss_total, hidden, weight_shard, grad_h, grad_w)
    return PolicyLossOutput(loss=loss, logprobs=tok.logprobs, entropy=tok.entropy if return_entropy else None,
                            clip_fraction=metrics["clip_fraction"], metrics=metrics)


__all__ = ["fused_policy_loss", "PolicyLossOutput", "GRAD_MODES", "chunked_stats"]
