"""Shared case builders and parity checks for the fused policy-loss kernel tests.

One `LossCase` is a packed micro-batch of T tokens from 4 sequences with: a ragged loss mask, one
sequence fully masked (an all-masked row), a vocabulary of `vocab_size` real tokens stored in
`padded_rows` weight rows (padding rows are excluded from the softmax), old log-probs shifted so
that the PPO clip binds for some tokens and the dual clip (c = 3) binds for some negative-advantage
tokens, and targets covering both ends of the vocabulary (so that with TP=2 some are owned by each
shard, including the last real id that sits next to the padding).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from megatron_denoise.kernels.reference import full_logprobs_and_entropy, reference_policy_loss

AGGS = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")

# Tolerances. fp32: the 1e-5. bf16 (hidden and weight in bf16, logits/softmax in fp32):
# differences come from bf16 rounding of the logits GEMM output and of dL/dz before the gradient
# GEMMs (~2^-8 relative); measured max abs differences stay below a third of these bounds.
FP32_TOL = dict(atol=1e-5, rtol=1e-5)
BF16_TOL = dict(atol=3e-2, rtol=3e-2)


@dataclass
class LossCase:
    hidden: torch.Tensor  # [T, H]
    weight: torch.Tensor  # [padded_rows, H]; rows >= vocab_size are padding
    targets: torch.Tensor  # [T]
    old_logprobs: torch.Tensor  # [T]
    advantages: torch.Tensor  # [T]
    mask: torch.Tensor  # [T]
    seq_ids: torch.Tensor  # [T]
    vocab_size: int
    kwargs: dict[str, Any] = field(default_factory=dict)


def make_case(T: int = 50, H: int = 40, vocab_size: int = 203, padded_rows: Optional[int] = None,
              dtype: torch.dtype = torch.float32, seed: int = 0) -> LossCase:
    g = torch.Generator().manual_seed(seed)
    padded_rows = padded_rows or vocab_size
    hidden = torch.randn(T, H, generator=g)
    weight = torch.randn(padded_rows, H, generator=g) * 0.3
    # Padding rows hold large values: if they leaked into the softmax the log-probs would move a lot.
    weight[vocab_size:] = 5.0
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    targets = torch.randint(0, vocab_size, (T,), generator=g)
    targets[0], targets[1], targets[-1] = 0, vocab_size - 1, vocab_size - 1  # both vocabulary ends
    seq_ids = torch.sort(torch.randint(0, 4, (T,), generator=g)).values
    seq_ids[:4] = torch.tensor([0, 0, 1, 1])
    seq_ids[-4:] = 3
    seq_ids = torch.sort(seq_ids).values
    mask = (torch.rand(T, generator=g) > 0.3).float()
    mask[seq_ids == 2] = 0.0  # a fully masked sequence
    mask[seq_ids == 0] = 1.0
    advantages = torch.randn(T, generator=g)
    advantages[::5] = -1.5  # negative advantages for the dual clip
    with torch.no_grad():
        logp, _ = full_logprobs_and_entropy(hidden, weight, targets, vocab_size)
    shift = torch.randn(T, generator=g) * 0.5  # |log ratio| ~ 0.5 >> clip 0.2: the clip binds
    shift[::5] = 1.5  # ratio e^1.5 ~ 4.5 > c = 3 on negative-advantage tokens: the dual clip binds
    old_logprobs = (logp - shift).float()
    return LossCase(hidden, weight, targets, old_logprobs, advantages, mask, seq_ids, vocab_size)


def loss_kwargs(case: LossCase, agg: str, **over: Any) -> dict[str, Any]:
    kw = dict(clip_low=0.2, clip_high=0.28, dual_clip=3.0, force_on_policy=False, return_entropy=True,
              entropy_coef=0.01, loss_agg=agg, global_num_tokens=float(case.mask.sum() + 7),
              global_num_seqs=5.0, loss_norm_tokens=40.0, seq_ids=case.seq_ids, vocab_size=case.vocab_size)
    kw.update(over)
    return kw


def run(fn, case: LossCase, hidden: torch.Tensor, weight: torch.Tensor, vocab_start: int = 0, tp_group=None,
        **kw: Any) -> dict[str, Optional[torch.Tensor]]:
    """Forward + backward of `fn` (reference or fused) on leaf copies; returns every compared output."""
    h = hidden.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(True)
    out = fn(h, w, vocab_start, case.targets, case.old_logprobs, case.advantages, case.mask, tp_group=tp_group,
             **kw)
    out.loss.backward()
    return dict(loss=out.loss.detach(), logprobs=out.logprobs, entropy=out.entropy, clip_fraction=out.clip_fraction,
                dual_clip_fraction=out.metrics["dual_clip_fraction"], grad_hidden=h.grad, grad_weight=w.grad)


def reference(case: LossCase, **kw: Any) -> dict[str, Optional[torch.Tensor]]:
    return run(reference_policy_loss, case, case.hidden, case.weight, **kw)


def assert_parity(got: dict, want: dict, tol: dict, what: str = "") -> None:
    for key, w in want.items():
        g = got[key]
        if w is None or g is None:
            assert g is None and w is None, f"{what}{key}: one side is None"
            continue
        torch.testing.assert_close(g.float(), w.float(), **tol, msg=lambda m, k=key: f"{what}{k}: {m}")


def assert_clipping_binds(out: dict) -> None:
    assert out["clip_fraction"] > 0.05, out["clip_fraction"]
    assert out["dual_clip_fraction"] > 0.0, out["dual_clip_fraction"]
