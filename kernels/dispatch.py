"""The ONE place that picks the implementation of the fused policy-loss / log-prob op.

    auto              -> triton on CUDA tensors, chunked on CPU (chunked_compiled if
                         MEGATRON_DENOISE_LOSS_COMPILE=1)
    triton            -> kernels/triton_loss.py (CUDA, or CPU under TRITON_INTERPRET=1 for tests)
    chunked           -> kernels/chunked.py, eager PyTorch
    chunked_compiled  -> kernels/chunked.py with torch.compile on the per-chunk math
    reference         -> kernels/reference.py (full logits; tests and debugging)

The environment variable MEGATRON_DENOISE_LOSS_IMPL, when set, overrides an `auto` request (a
config value other than auto wins over the environment: it was asked for explicitly).
"""
from __future__ import annotations

import os
from typing import Union

import torch

IMPLS = ("auto", "triton", "chunked", "chunked_compiled", "reference")
ENV_IMPL = "MEGATRON_DENOISE_LOSS_IMPL"
ENV_COMPILE = "MEGATRON_DENOISE_LOSS_COMPILE"


def resolve_impl(impl: str, device: Union[torch.device, str]) -> str:
    """Concrete implementation name for a request (`impl` from config/kwargs) and tensor device."""
    if impl not in IMPLS:
        raise ValueError(f"loss kernel impl {impl!r} is not one of {', '.join(IMPLS)}")
    if impl == "auto":
        env = os.environ.get(ENV_IMPL, "").strip()
        if env:
            if env not in IMPLS or env == "auto":
                raise ValueError(f"{ENV_IMPL}={env!r} is not one of {', '.join(IMPLS[1:])}")
            impl = env
    if impl == "auto":
        if torch.device(device).type == "cuda":
            from .triton_loss import HAVE_TRITON

            if HAVE_TRITON:
                return "triton"
        return "chunked_compiled" if os.environ.get(ENV_COMPILE, "0") == "1" else "chunked"
    return impl
