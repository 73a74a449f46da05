"""Per-token log-probs, entropy and the policy loss from the last stage's hidden states, under TP.

The last pipeline stage's output layer is switched to return hidden states (`HiddenHead`), so
that the loss is computed here from hidden [T, H] and the local vocab shard of the output weight
[V/tp, H]: `policy_loss_from_hidden` is the one boundary where the fused kernel
(`megatron_denoise.kernels.fused_policy_loss`, impl="fused") replaces the readable path
(impl="torch": shard logits, then vocab-parallel log-softmax).

Vocab parallel log-softmax over shards x_r [T, V/tp] of the logits:
    M   = max_r max_j x_r[:, j]                       (all-reduce MAX, no gradient needed)
    S   = sum_r sum_j exp(x_r[:, j] - M)              (all-reduce SUM)
    x_t = sum_r x_r[:, target - start_r] if owned     (all-reduce SUM)
    logp = x_t - M - log S
    H    = M + log S - sum_r sum_j exp(x_r - M) x_r / S
The sums use an all-reduce whose backward is the identity: every TP rank holds the same
(replicated) loss, so the gradient each rank sends into its shard is already the full one.
Columns at global id >= vocab_size are vocabulary padding and excluded. megatron's
vocab_parallel_cross_entropy is not used: it overwrites fp32 logits in place.
"""
from __future__ import annotations

import types
from typing import Any, Optional

import torch
import torch.distributed as dist

from megatron_denoise import collectives as coll
from megatron_denoise.config.schema import LossAgg, LossImpl
from megatron_denoise.core.losses import policy_loss

# How many times each implementation computed a training loss in this process (tests assert which
# one a training step ran through; the actor also reports it as the metric loss_impl_fused).
LOSS_IMPL_CALLS: dict[str, int] = {m.value: 0 for m in LossImpl}


class _AllReduceSumIdentityGrad(torch.autograd.Function):
    """Forward: all-reduce SUM over `group`. Backward: identity (the consumer is replicated)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Any) -> torch.Tensor:
        x = x.clone()
        coll.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def _sum_over(x: torch.Tensor, group: Any) -> torch.Tensor:
    if group is None or dist.get_world_size(group) == 1:
        return x
    return _AllReduceSumIdentityGrad.apply(x, group)


def vocab_parallel_logprobs_from_logits(
    logits: torch.Tensor, targets: torch.Tensor, vocab_start: int, vocab_size: int,
    tp_group: Any = None, with_entropy: bool = True,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(log p(target) [T], entropy [T] or None) from the local logits shard [T, V_local].

    targets: [T] global token ids (< vocab_size). Differentiable w.r.t. logits. `logits` is not
    modified.
    """
    t, v_local = logits.shape
    logits = logits.float()
    cols = torch.arange(vocab_start, vocab_start + v_local, device=logits.device)
    valid = cols < vocab_size                                    # [V_local]
    neg = torch.finfo(logits.dtype).min
    x = torch.where(valid[None, :], logits, torch.full_like(logits, neg))
    with torch.no_grad():
        m = x.max(dim=-1).values                                 # [T]
        if tp_group is not None and dist.get_world_size(tp_group) > 1:
            coll.all_reduce(m, op=dist.ReduceOp.MAX, group=tp_group)
    z = x - m[:, None]
    e = torch.where(valid[None, :], torch.exp(z), torch.zeros_like(z))  # [T, V_local]
    s = _sum_over(e.sum(-1), tp_group)                           # [T]
    local = targets - vocab_start
    owned = (local >= 0) & (local < v_local)
    idx = local.clamp(0, v_local - 1)
    zt = torch.gather(z, 1, idx[:, None]).squeeze(1)
    zt = _sum_over(torch.where(owned, zt, torch.zeros_like(zt)), tp_group)
    log_s = torch.log(s)
    logp = zt - log_s
    ent = None
    if with_entropy:
        ez = _sum_over(torch.where(valid[None, :], e * z, torch.zeros_like(z)).sum(-1), tp_group)
        ent = log_s - ez / s
    return logp, ent


# ------------------------------------------------------------------------------------------------
# the last stage returns hidden states instead of logits


def enable_hidden_output(gpt: Any, tp_group: Any) -> None:
    """Make `gpt.output_layer` return the hidden states entering it (gathered over the sequence
    when sequence parallel), remembering the weight it would have used (the output layer's or the
    tied embedding's) in `gpt.output_layer.loss_weight`.

    The hidden states go through megatron's region function, whose backward all-reduces
    (or reduce-scatters, with SP) the per-shard gradients over TP exactly as the output layer's
    own backward would. The output is [s, b, H]; GPTModel returns it transposed to [b, s, H].
    """
    from megatron.core.tensor_parallel.mappings import (
        copy_to_tensor_model_parallel_region,
        gather_from_sequence_parallel_region,
    )

    layer = gpt.output_layer
    if getattr(layer, "hidden_mode", None) is not None:
        return
    layer.hidden_mode = True
    layer.original_forward = layer.forward

    def forward(self, input_, weight=None, runtime_gather_output=None):
        if not self.hidden_mode:
            return self.original_forward(input_, weight=weight, runtime_gather_output=runtime_gather_output)
        # a list, not an attribute: assigning a Parameter would register it on the module
        self.loss_weight_ref = [self.weight if weight is None else weight]
        if self.sequence_parallel:
            h = gather_from_sequence_parallel_region(input_, tensor_parallel_output_grad=True, group=tp_group)
        else:
            h = copy_to_tensor_model_parallel_region(input_, group=tp_group)
        return h, None

    layer.forward = types.MethodType(forward, layer)


def set_hidden_output(gpt: Any, on: bool) -> None:
    """Switch a chunk between hidden-state output (training / log-probs) and logits (inference)."""
    layer = getattr(gpt, "output_layer", None)
    if layer is not None and getattr(layer, "hidden_mode", None) is not None:
        layer.hidden_mode = on


# ------------------------------------------------------------------------------------------------
# the loss boundary


def policy_loss_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    vocab_start: int,
    vocab_size: int,
    targets: torch.Tensor,
    loss_mask: torch.Tensor,
    advantages: torch.Tensor,
    old_logprobs: Optional[torch.Tensor],
    *,
    tp_group: Any,
    algo: Any,
    global_num_tokens: float,
    global_num_seqs: float,
    seq_ids: torch.Tensor,
    seq_num_tokens: torch.Tensor,
    ref_logprobs: Optional[torch.Tensor] = None,
    is_weights: Optional[torch.Tensor] = None,
    loss_norm_tokens: Optional[float] = None,
    impl: LossImpl = LossImpl.FUSED,
    loss_tokens_only: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """Loss of T packed tokens from hidden [T, H] and the vocab shard weight [V_local, H].

    targets/loss_mask/advantages/old_logprobs/seq_ids [T] (position t scores targets[t]);
    seq_num_tokens [S_local]. `algo` is the AlgorithmConfig (clip, dual clip, loss_agg,
    force_on_policy, entropy/kl coefficients). The gradient reduction of `hidden` over TP is done
    by the region function upstream (enable_hidden_output), so no collective on it here.

    Returns (loss, logprobs [T] detached, entropy [T] detached, metrics).
    impl: "fused" (megatron_denoise.kernels; the default) | "torch" (readable, same semantics):
    both take the core loss's keywords, built once here.
    is_weights [T]: detached per-token weights of the policy term (truncated IS), or None.
    loss_norm_tokens: the Dr. GRPO constant (seq-mean-token-sum-norm).
    loss_tokens_only (trainer.loss_tokens_only, passed by the caller): the output layer runs on the tokens of loss_mask
    only (prompts and prefixes need no logits); log-probs and entropy are then 0 elsewhere. The loss
    and every gradient are those of all T tokens (a masked token adds exactly 0 to either).
    """
    T = hidden.shape[0]
    rows = loss_token_rows(loss_mask) if loss_tokens_only else None
    if rows is not None:
        hidden, targets, loss_mask, advantages, old_logprobs, seq_ids, ref_logprobs, is_weights = (
            None if x is None else x.index_select(0, rows)
            for x in (hidden, targets, loss_mask, advantages, old_logprobs, seq_ids, ref_logprobs, is_weights))
    loss, logp, ent, metrics = _policy_loss(
        hidden, weight, vocab_start, vocab_size, targets, loss_mask, advantages, old_logprobs, tp_group=tp_group,
        algo=algo, global_num_tokens=global_num_tokens, global_num_seqs=global_num_seqs, seq_ids=seq_ids,
        seq_num_tokens=seq_num_tokens, ref_logprobs=ref_logprobs, is_weights=is_weights,
        loss_norm_tokens=loss_norm_tokens, impl=impl)
    if rows is not None:
        logp, ent = (torch.zeros(T, dtype=x.dtype, device=x.device).index_copy_(0, rows, x) for x in (logp, ent))
    return loss, logp, ent, metrics


def loss_token_rows(loss_mask: torch.Tensor) -> Optional[torch.Tensor]:
    """Positions of the loss tokens [n] when some, but not all, of the T tokens carry loss; else
    None (nothing to drop, or nothing left: an all-masked micro-batch keeps its T tokens rather
    than handing the kernels an empty one). Every TP rank holds the same mask, so the same rows."""
    rows = torch.nonzero(loss_mask != 0).squeeze(1)
    return rows if 0 < rows.numel() < loss_mask.numel() else None


def _policy_loss(hidden, weight, vocab_start, vocab_size, targets, loss_mask, advantages, old_logprobs, *,
                 tp_group, algo, global_num_tokens, global_num_seqs, seq_ids, seq_num_tokens, ref_logprobs,
                 is_weights, loss_norm_tokens, impl):
    """policy_loss_from_hidden on the tokens it was given."""
    from megatron_denoise.config.schema import KLUse

    kl_coef = algo.kl.coef if (ref_logprobs is not None and algo.kl.use == KLUse.LOSS) else 0.0
    kw = dict(clip_low=algo.clip_low, clip_high=algo.clip_high, dual_clip=algo.dual_clip,
              force_on_policy=algo.force_on_policy, policy_loss_type=algo.policy_loss,
              cispo_clip_high=algo.cispo_clip_high, loss_agg=algo.loss_agg,
              global_num_tokens=global_num_tokens, global_num_seqs=global_num_seqs,
              loss_norm_tokens=loss_norm_tokens if algo.loss_agg == LossAgg.SEQ_MEAN_TOKEN_SUM_NORM else None,
              seq_ids=seq_ids, seq_num_tokens=seq_num_tokens, is_weights=is_weights,
              entropy_coef=algo.entropy_coeff, ref_logprobs=ref_logprobs, kl_coef=kl_coef, kl_type=algo.kl.type)
    if impl == LossImpl.FUSED:
        from megatron_denoise.kernels import fused_policy_loss

        LOSS_IMPL_CALLS[LossImpl.FUSED.value] += 1
        out = fused_policy_loss(hidden, weight, vocab_start, targets, old_logprobs, advantages, loss_mask,
                                return_entropy=True, vocab_size=vocab_size, tp_group=tp_group,
                                reduce_grad_hidden=False, **kw)
        return out.loss, out.logprobs, out.entropy, out.metrics
    if impl != LossImpl.TORCH:
        raise ValueError(f"algorithm.loss_impl ({impl!r}) must be one of {' | '.join(LossImpl.values())}")
    LOSS_IMPL_CALLS[LossImpl.TORCH.value] += 1
    logits = hidden @ weight.t()                                  # [T, V_local]
    logp, ent = vocab_parallel_logprobs_from_logits(logits, targets, vocab_start, vocab_size, tp_group)
    loss, metrics = policy_loss(logp, old_logprobs, advantages, loss_mask, entropy=ent, **kw)
    return loss, logp.detach(), ent.detach(), metrics


def logprobs_from_hidden(hidden: torch.Tensor, weight: torch.Tensor, vocab_start: int, vocab_size: int,
                         targets: torch.Tensor, tp_group: Any, impl: LossImpl = LossImpl.FUSED) -> tuple[torch.Tensor, torch.Tensor]:
    """(logprobs [T], entropy [T]) without gradient (old / reference log-probs). impl="fused"
    uses the kernel's vocab-parallel log-probs (no [T, V/tp] logits)."""
    with torch.no_grad():
        if impl == LossImpl.FUSED:
            from megatron_denoise.kernels import vocab_parallel_logprobs

            return vocab_parallel_logprobs(hidden, weight, vocab_start, targets, vocab_size=vocab_size,
                                           entropy=True, tp_group=tp_group)
        logits = hidden @ weight.t()
        return vocab_parallel_logprobs_from_logits(logits, targets, vocab_start, vocab_size, tp_group)
