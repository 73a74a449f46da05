"""Fused kernels (installed as `megatron_denoise.kernels`; the folder is top-level `kernels/`).

fused_policy_loss        the algorithm core's clipped policy loss on hidden states [T, H] and a
                         vocab shard [V/tp, H] without [T, V] logits (fused.py)
reference_policy_loss    the same with full logits: the readable reference (reference.py)
vocab_parallel_logprobs  differentiable per-token log-probs / entropy from a vocab shard
                         (old log-probs: call it under torch.no_grad())
resolve_impl             the one dispatch point: triton on CUDA, chunked on CPU (dispatch.py)

Nothing here imports torch.distributed at import time; collectives run only when a TP process
group is passed in, and only in the wrappers (stats.combine_stats, vocab_parallel), never in kernels.
"""
from .dispatch import resolve_impl
from .fused import fused_policy_loss
from .reference import PolicyLossOutput, reference_policy_loss
from .vocab_parallel import vocab_parallel_logprobs

__all__ = ["fused_policy_loss", "reference_policy_loss", "PolicyLossOutput", "vocab_parallel_logprobs",
           "resolve_impl"]
