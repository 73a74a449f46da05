"""Readable PyTorch reference of the fused policy loss: full logits, then the algorithm core's loss.

Same signature as `kernels.fused_policy_loss`. It materialises the [T, V] fp32 logits (that is the
point of a reference) and then applies the ONE specification of the loss,
`megatron_denoise.core.losses.policy_loss`, to the per-token log-probs and entropy, so the kernel
and the algorithm core cannot drift apart: the kernels only have to reproduce log-probs, entropy
and their gradients, which the tests check against this function.

The reference takes the FULL output weight (one shard holding the whole vocabulary): TP parity is
tested as "TP=2 kernel == TP=1 reference".
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from megatron_denoise.config.schema import KLEstimator, LossAgg, PolicyLoss
from megatron_denoise.core.losses import policy_loss


@dataclass
class PolicyLossOutput:
    """Result of the fused policy loss (and of its reference).

    loss          0-dim, differentiable w.r.t. hidden and the weight shard
    logprobs      [T] fp32 per-token log p(target), detached
    entropy       [T] fp32 per-token entropy, detached (None unless requested)
    clip_fraction 0-dim, share of loss tokens whose ratio was clipped (global token denominator)
    metrics       the core loss's metric dict (partial sums with global denominators)
    """

    loss: torch.Tensor
    logprobs: torch.Tensor
    entropy: Optional[torch.Tensor]
    clip_fraction: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


def core_seq_ids(seq_ids: Optional[torch.Tensor], loss_agg: str, num_tokens: int, device) -> Optional[torch.Tensor]:
    """seq_ids to hand to the core loss. For token-mean the sequence structure does not matter, but
    the core's packed-layout count helper still asks for ids: one sequence is the neutral choice.
    (Seq modes without seq_ids are left to the core, which rejects them with a clear error.)"""
    if seq_ids is None and loss_agg == LossAgg.TOKEN_MEAN:
        return torch.zeros(num_tokens, dtype=torch.long, device=device)
    return seq_ids


def full_logprobs_and_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                              vocab_size: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(target) [T], entropy [T]) from full logits [T, V]; rows >= vocab_size are padding."""
    v = weight.shape[0] if vocab_size is None else min(vocab_size, weight.shape[0])
    logits = (hidden @ weight[:v].t()).float()  # [T, V]: matmul in the input dtype, softmax in fp32
    logp_all = torch.log_softmax(logits, dim=-1)
    logprobs = logp_all.gather(1, targets.long()[:, None]).squeeze(1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logprobs, entropy


def reference_policy_loss(
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
    impl: str = "reference",
) -> PolicyLossOutput:
    """Policy loss of packed tokens from hidden states [T, H] and the full output weight [V, H]."""
    if vocab_start != 0:
        raise ValueError(f"the reference takes the full weight: vocab_start must be 0, got {vocab_start}")
    if tp_group is not None:
        import torch.distributed as dist

        if dist.get_world_size(tp_group) > 1:
            raise ValueError("the reference takes the full weight (tp_group of size 1 or None); "
                             "compare a TP>1 kernel run against a TP=1 reference")
    need_entropy = return_entropy or entropy_coef != 0.0
    logprobs, ent = full_logprobs_and_entropy(hidden, weight_shard, targets, vocab_size)
    loss, metrics = policy_loss(
        logprobs, old_logprobs, advantages, loss_mask, clip_low=clip_low, clip_high=clip_high,
        dual_clip=dual_clip, force_on_policy=force_on_policy, policy_loss_type=policy_loss_type,
        cispo_clip_high=cispo_clip_high, loss_agg=loss_agg,
        global_num_tokens=global_num_tokens, global_num_seqs=global_num_seqs, loss_norm_tokens=loss_norm_tokens,
        seq_ids=core_seq_ids(seq_ids, loss_agg, targets.shape[0], targets.device), seq_num_tokens=seq_num_tokens,
        is_weights=is_weights, entropy=ent if need_entropy else None, entropy_coef=entropy_coef,
        ref_logprobs=ref_logprobs, kl_coef=kl_coef, kl_type=kl_type)
    return PolicyLossOutput(loss=loss, logprobs=logprobs.detach(), entropy=ent.detach() if return_entropy else None,
                            clip_fraction=metrics["clip_fraction"], metrics=metrics)
