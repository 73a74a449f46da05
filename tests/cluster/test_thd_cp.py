"""Bug 4 of issue 14: context parallelism on the THD (Transformer Engine) path. The per-sequence
load-balanced split is pure index math, checked here against the CPU twin's split and by hand."""
from __future__ import annotations

import pytest
import torch

from megatron_denoise.megatron.batching import MicroBatch, cp_chunk_positions
from megatron_denoise.megatron.thd_cp import fixed_length, padded_layout, split, thd_cp_positions


@pytest.mark.parametrize("cp", [1, 2, 4])
def test_one_sequence_filling_the_row_is_the_cpu_twins_split(cp):
    for s in (8 * cp, 24 * cp):
        starts, padded, total = padded_layout([s], cp)
        assert (starts, padded, total) == ([0], [s], s)
        for r in range(cp):
            assert torch.equal(thd_cp_positions(starts, padded, cp, r), cp_chunk_positions(s, cp, r))


def test_per_sequence_split_by_hand():
    # lengths 5 and 3 at cp=2: padded to 8 and 4 (chunks of 2 and 1), tail to 16
    starts, padded, total = padded_layout([5, 3], 2, total=16)
    assert (starts, padded, total) == ([0, 8, 12], [8, 4, 4], 16)
    assert thd_cp_positions(starts, padded, 2, 0).tolist() == [0, 1, 6, 7, 8, 11, 12, 15]
    assert thd_cp_positions(starts, padded, 2, 1).tolist() == [2, 3, 4, 5, 9, 10, 13, 14]
    # every position exactly once over the ranks, the same count on each rank
    allpos = torch.cat([thd_cp_positions(starts, padded, 2, r) for r in range(2)])
    assert sorted(allpos.tolist()) == list(range(16))
    with pytest.raises(ValueError, match="multiple of 2\\*cp"):
        padded_layout([5, 3], 2, total=10)
    assert fixed_length(100, 3, 2, 2) % 8 == 0 and fixed_length(100, 3, 2, 2) >= 100 + 3 * 3


def test_split_micro_batch_keeps_tokens_loss_and_positions_without_a_mask():
    S = 12
    tokens = torch.arange(100, 100 + S)[None]
    seg = torch.tensor([0] * 5 + [1] * 3 + [-1] * 4)
    mb = MicroBatch(tokens=tokens, position_ids=torch.zeros(1, S, dtype=torch.long), attn_mask=None, segment=seg,
                    targets=tokens[0] + 1000, loss_mask=(seg >= 0).float(), advantages=torch.ones(S),
                    old_logprobs=None, ref_logprobs=None, seq_num_tokens=torch.tensor([5.0, 3.0]), rows=[4, 7],
                    starts=[0, 5], lengths=[5, 3])
    got = [split(mb, 2, r, 16) for r in range(2)]
    for r, g in enumerate(got):
        assert g.attn_mask is None and g.tokens.shape == (1, 8)
        real = g.positions >= 0
        assert torch.equal(g.tokens[0][real], tokens[0][g.positions[real]])      # tokens follow positions
        assert g.loss_mask[~real].sum() == 0 and bool((g.segment[~real] == -1).all())
    # rank 0 holds the first two and last two (padded) of sequence 0: orig 0, 1 and padding
    assert got[0].positions.tolist()[:4] == [0, 1, -1, -1]
    assert got[0].cu_seqlens.tolist() == [0, 5, 8, 8] and got[0].cu_seqlens_padded.tolist() == [0, 8, 12, 16]
    # together the ranks hold every real position once
    real = sorted(p for g in got for p in g.positions.tolist() if p >= 0)
    assert real == list(range(8))
    # positions restart per sequence
    assert got[1].position_ids[0].tolist()[:4] == [2, 3, 4, 5]
