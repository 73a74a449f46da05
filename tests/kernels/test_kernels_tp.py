"""Tensor parallelism on gloo: the fused loss with the vocabulary split over 2 processes equals the
TP=1 reference (loss, log-probs, entropy, clip fraction, full grad_hidden, each rank's grad_weight
rows), for the chunked path in both gradient modes and the Triton kernels (interpreted).

The 203-token vocabulary is padded to 208 rows and split 104 + 104: the last shard ends in 5
padding rows, and targets 0 and 202 (the last real id, next to the padding) are owned by
different ranks, the case where an owned-elsewhere target can collide with padded columns.
"""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from kernels_testlib import AGGS, FP32_TOL, assert_clipping_binds, assert_parity, loss_kwargs, make_case, reference, run

WORLD = 2
VOCAB, PADDED = 203, 208


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, with_triton: bool) -> None:
    # Set before the Triton module is first imported (it is imported lazily by the dispatch).
    os.environ["TRITON_INTERPRET"] = "1"
    import torch.distributed as dist

    from megatron_denoise.kernels import fused_policy_loss, vocab_parallel_logprobs

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        group = dist.new_group(list(range(WORLD)))
        case = make_case(vocab_size=VOCAB, padded_rows=PADDED, seed=21)
        rows = PADDED // WORLD
        start = rank * rows
        shard = case.weight[start:start + rows]
        owned = ((case.targets >= start) & (case.targets < start + rows)).sum().item()
        assert 0 < owned < len(case.targets), "each rank must own some of the targets"
        configs = [("chunked", "in_forward"), ("chunked", "recompute")] + ([("triton", "recompute")] if with_triton else [])
        for agg in AGGS:
            kw = loss_kwargs(case, agg)
            want = reference(case, **kw)
            assert_clipping_binds(want)
            want["grad_weight"] = want["grad_weight"][start:start + rows]
            for impl, grad_mode in configs:
                got = run(fused_policy_loss, case, case.hidden, shard, vocab_start=start, tp_group=group,
                          impl=impl, grad_mode=grad_mode, chunk_tokens=16, **kw)
                assert_parity(got, want, FP32_TOL, f"rank {rank} {agg} {impl}/{grad_mode}: ")
        # uneven shards (110 + 98 rows, the second ending in padding) without a chunk size: the
        # ranks agree on one chunk size so that their per-chunk collectives line up
        split = 110
        lo, hi = (0, split) if rank == 0 else (split, PADDED)
        kw = loss_kwargs(case, "seq-mean-token-sum")
        want = reference(case, **kw)
        want["grad_weight"] = want["grad_weight"][lo:hi]
        for grad_mode in ("in_forward", "recompute"):
            got = run(fused_policy_loss, case, case.hidden, case.weight[lo:hi], vocab_start=lo, tp_group=group,
                      impl="chunked", grad_mode=grad_mode, **kw)
            assert_parity(got, want, FP32_TOL, f"rank {rank} uneven {grad_mode}: ")
        # reduce_grad_hidden=False leaves the per-shard partial gradient for the caller to reduce
        h = case.hidden.clone().requires_grad_(True)
        lp, ent = vocab_parallel_logprobs(h, shard, start, case.targets, vocab_size=VOCAB, tp_group=group,
                                          impl="chunked", reduce_grad_hidden=False)
        (lp.sum() + ent.sum()).backward()
        partial = h.grad.clone()
        dist.all_reduce(h.grad, group=group)
        h1 = case.hidden.clone().requires_grad_(True)
        lp1, ent1 = vocab_parallel_logprobs(h1, case.weight, 0, case.targets, vocab_size=VOCAB, impl="chunked")
        (lp1.sum() + ent1.sum()).backward()
        torch.testing.assert_close(h.grad, h1.grad, **FP32_TOL)
        assert not torch.allclose(partial, h1.grad, **FP32_TOL)
    finally:
        dist.destroy_process_group()


@pytest.mark.dist
def test_tp2_gloo_matches_tp1_reference() -> None:
    try:
        import triton  # noqa: F401

        with_triton = True
    except ImportError:
        with_triton = False
    mp.spawn(_worker, args=(_free_port(), with_triton), nprocs=WORLD, join=True)
