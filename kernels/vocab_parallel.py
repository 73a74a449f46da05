"""Differentiable vocab-parallel log-probs and entropy from hidden states and a vocab shard.

`vocab_parallel_logprobs(hidden [T, H], weight_shard [V_local, H], vocab_start, targets [T])`
returns per-token log p(target) [T] and entropy [T] over the FULL (all shards) vocabulary, never
holding [T, V_local] logits. The collectives of the TP contract live HERE, between the kernel
phases (the kernels in chunked.py / triton_loss.py never communicate):

    forward:  phase 1 stats (kernel) -> all-reduce MAX + one SUM (combine_stats) -> logp, entropy
    backward: phase 2 grads (kernel, recomputing the logits) -> all-reduce SUM of grad_hidden

Saved for backward: hidden, weight (references, no copies), targets and two [T] fp32 vectors.
Also the cheapest way to compute OLD log-probs: under `torch.no_grad()` only phase 1 runs.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from megatron_denoise import collectives as coll

from .stats import TokenStats, combine_stats


class _Backend:
    """The two kernel phases of one implementation (chunked PyTorch or Triton)."""

    def __init__(self, impl: str, compiled: bool = False, chunk_tokens: Optional[int] = None):
        self.impl, self.compiled, self.chunk_tokens = impl, compiled, chunk_tokens

    def stats(self, hidden, weight, vocab_start, targets, vocab_size, with_entropy):
        if self.impl == "triton":
            from .triton_loss import triton_stats

            return triton_stats(hidden, weight, vocab_start, targets, vocab_size=vocab_size,
                                with_entropy=with_entropy)
        from .chunked import chunked_stats

        return chunked_stats(hidden, weight, vocab_start, targets, vocab_size=vocab_size,
                             with_entropy=with_entropy, chunk_tokens=self.chunk_tokens,
                             compiled=self.compiled)

    def grads(self, hidden, weight, vocab_start, targets, lse, mean_logit, g_logp, g_entropy, vocab_size):
        if self.impl == "triton":
            from .triton_loss import triton_grads

            return triton_grads(hidden, weight, vocab_start, targets, lse, mean_logit, g_logp, g_entropy,
                                vocab_size=vocab_size)
        from .chunked import chunked_grads

        return chunked_grads(hidden, weight, vocab_start, targets, lse, mean_logit, g_logp, g_entropy,
                             vocab_size=vocab_size, chunk_tokens=self.chunk_tokens, compiled=self.compiled)


def all_reduce_grad_hidden(grad_hidden: torch.Tensor, group: Optional[Any]) -> torch.Tensor:
    """Sum the per-shard partial dL/dhidden over the TP group (identity without a group)."""
    if group is not None:
        import torch.distributed as dist

        coll.all_reduce(grad_hidden, op=dist.ReduceOp.SUM, group=group)
    return grad_hidden


class _VocabParallelLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, vocab_start, vocab_size, with_entropy, group, backend,
                reduce_grad_hidden):
        stats = backend.stats(hidden, weight, vocab_start, targets, vocab_size, with_entropy)
        tok: TokenStats = combine_stats(stats, group)
        ctx.save_for_backward(hidden, weight, targets, tok.lse, tok.mean_logit)
        ctx.meta = (vocab_start, vocab_size, with_entropy, group, backend, reduce_grad_hidden)
        entropy = tok.entropy if with_entropy else torch.zeros_like(tok.logprobs)
        return tok.logprobs, entropy

    @staticmethod
    def backward(ctx, g_logp, g_entropy):
        hidden, weight, targets, lse, mean_logit = ctx.saved_tensors
        vocab_start, vocab_size, with_entropy, group, backend, reduce_grad_hidden = ctx.meta
        if g_logp is None:
            g_logp = torch.zeros_like(lse)
        g_ent = g_entropy if (with_entropy and g_entropy is not None) else None
        grad_h, grad_w = backend.grads(hidden, weight, vocab_start, targets, lse, mean_logit, g_logp, g_ent,
                                       vocab_size)
        if reduce_grad_hidden:
            grad_h = all_reduce_grad_hidden(grad_h, group)
        return grad_h, grad_w, None, None, None, None, None, None, None


def vocab_parallel_logprobs(hidden: torch.Tensor, weight_shard: torch.Tensor, vocab_start: int,
                            targets: torch.Tensor, *, vocab_size: Optional[int] = None, entropy: bool = True,
                            tp_group: Optional[Any] = None, impl: str = "auto",
                            reduce_grad_hidden: bool = True, chunk_tokens: Optional[int] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Per-token (log-probs [T], entropy [T] or None), differentiable w.r.t. hidden and weight_shard.

    hidden [T, H]; weight_shard [V_local, H] holding global vocab rows vocab_start.. (padded rows at
    global id >= vocab_size are excluded from the softmax); targets [T] global ids (< vocab_size).
    tp_group: the vocab-parallel group (None: the shard is the whole vocabulary).
    reduce_grad_hidden: all-reduce dL/dhidden over tp_group in backward (turn off when the caller's
    region function already does it, e.g. Megatron's copy_to_tensor_model_parallel_region).
    impl: auto | triton | chunked | chunked_compiled (see dispatch.py; `reference` is not a
    kernel: use reference.py). chunk_tokens: tokens per logits block of the chunked path.
    """
    from .dispatch import resolve_impl

    name = resolve_impl(impl, hidden.device)
    if name == "reference":
        raise ValueError("impl='reference' has no phase kernels: call kernels.reference directly")
    validate_inputs(hidden, weight_shard, vocab_start, targets, vocab_size)
    backend = _Backend("triton" if name == "triton" else "chunked", compiled=(name == "chunked_compiled"),
                       chunk_tokens=chunk_tokens)
    logp, ent = _VocabParallelLogProbs.apply(hidden, weight_shard, targets, int(vocab_start), vocab_size,
                                             bool(entropy), tp_group, backend, bool(reduce_grad_hidden))
    return logp, (ent if entropy else None)


def validate_inputs(hidden: torch.Tensor, weight_shard: torch.Tensor, vocab_start: int, targets: torch.Tensor,
                    vocab_size: Optional[int]) -> None:
    """Clear errors for shape/range mistakes before any kernel runs."""
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be [T, H], got shape {tuple(hidden.shape)}")
    if weight_shard.dim() != 2 or weight_shard.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight_shard must be [V_local, H={hidden.shape[1]}], got {tuple(weight_shard.shape)}")
    if targets.shape != (hidden.shape[0],):
        raise ValueError(f"targets must be [T={hidden.shape[0]}], got {tuple(targets.shape)}")
    if targets.dtype.is_floating_point:
        raise ValueError(f"targets must be integer token ids, got {targets.dtype}")
    if vocab_start < 0:
        raise ValueError(f"vocab_start must be >= 0, got {vocab_start}")
    if targets.numel() > 0:
        lo, hi = int(targets.min()), int(targets.max())
        if lo < 0 or (vocab_size is not None and hi >= vocab_size):
            raise ValueError(f"targets out of range: min {lo}, max {hi}, vocab_size {vocab_size}")
