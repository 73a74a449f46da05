"""Pure (single-process, no megatron import) pieces of the actor: packing, masks, CP splitting,
scattering back, vocab-parallel log-probs on one shard, vocabulary padding, RoPE scaling."""
from __future__ import annotations

import math

import pytest
import torch

from megatron_denoise.config.schema import ModelConfig, MoEConfig, RopeScalingConfig
from megatron_denoise.megatron import batching
from megatron_denoise.megatron.batching import ActorBatch


def small_batch() -> ActorBatch:
    ids = torch.tensor([[5, 6, 7, 8, 0], [9, 10, 0, 0, 0], [11, 12, 13, 0, 0]])
    lens = torch.tensor([4, 2, 3])
    lm = torch.tensor([[0, 0, 1, 1, 0], [0, 1, 0, 0, 0], [0, 0, 1, 0, 0]], dtype=torch.float32)
    adv = torch.tensor([1.0, -2.0, 0.5])
    old = torch.arange(15, dtype=torch.float32).reshape(3, 5) / 10
    return ActorBatch(input_ids=ids, sequence_lengths=lens, loss_mask=lm, advantages=adv, old_logprobs=old)


def test_assign_and_pack_cover_every_row_once():
    lengths = [24, 9, 17, 12, 20, 15, 3]
    per_rank = batching.assign_rows(lengths, 2)
    assert sorted(r for rank in per_rank for r in rank) == list(range(7))
    loads = [sum(lengths[r] for r in rank) for rank in per_rank]
    assert abs(loads[0] - loads[1]) <= max(lengths)
    bins = batching.pack_rows(list(range(7)), lengths, budget=30)
    assert sorted(r for b in bins for r in b) == list(range(7))
    assert all(sum(lengths[r] for r in b) <= 30 for b in bins)
    # a row longer than the budget gets its own bin instead of failing
    assert batching.pack_rows([0, 1], [50, 5], budget=30) == [[0], [1]]


def test_micro_batch_alignment_and_block_causal_mask():
    b = small_batch()
    mb = batching.build_micro_batch(b, [0, 2], seq_len=8)
    assert mb.tokens.tolist() == [[5, 6, 7, 8, 11, 12, 13, 0]]
    assert mb.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2, 0]]
    assert mb.segment.tolist() == [0, 0, 0, 0, 1, 1, 1, -1]
    # position t scores token t+1 of the same sequence
    assert mb.targets.tolist() == [6, 7, 8, 0, 12, 13, 0, 0]
    # loss_mask[t] = row mask at t+1: row 0 trains tokens 2, 3 -> positions 1, 2; row 2 token 2 -> pos 5
    assert mb.loss_mask.tolist() == [0, 1, 1, 0, 0, 1, 0, 0]
    assert mb.advantages.tolist() == [1, 1, 1, 0, 0.5, 0.5, 0, 0]
    assert torch.allclose(mb.old_logprobs, torch.tensor([0.1, 0.2, 0.3, 0, 1.1, 1.2, 0, 0]))
    assert mb.seq_num_tokens.tolist() == [2.0, 1.0]
    visible = ~mb.attn_mask[0, 0]
    expected = torch.zeros(8, 8, dtype=torch.bool)
    for q in range(4):
        expected[q, : q + 1] = True
    for q in range(4, 7):
        expected[q, 4: q + 1] = True
    expected[7, 7] = True  # padding sees only itself
    assert torch.equal(visible, expected)


def test_cp_positions_and_split_are_megatron_load_balanced():
    assert batching.cp_chunk_positions(8, 2, 0).tolist() == [0, 1, 6, 7]
    assert batching.cp_chunk_positions(8, 2, 1).tolist() == [2, 3, 4, 5]
    with pytest.raises(ValueError, match="divisible by 2 \\* cp"):
        batching.cp_chunk_positions(6, 2, 0)
    mb = batching.build_micro_batch(small_batch(), [0, 2], seq_len=8)
    parts = [batching.cp_split(mb, 2, r) for r in range(2)]
    assert parts[1].tokens.tolist() == [[7, 8, 11, 12]]
    assert parts[1].attn_mask.shape == (1, 1, 4, 8)  # local queries x all keys
    assert torch.equal(parts[1].attn_mask[0, 0], mb.attn_mask[0, 0, 2:6])


def test_scatter_back_round_trip_with_and_without_cp():
    b = small_batch()
    mb = batching.build_micro_batch(b, [0, 2], seq_len=8)
    vals = torch.arange(8, dtype=torch.float32) + 1  # value at position t
    out = torch.zeros(3, 5)
    batching.scatter_back(vals, mb, out)
    # row 0: tokens 1..3 scored at positions 0..2; row 2 (start 4): tokens 1..2 at positions 4, 5
    assert out.tolist() == [[0, 1, 2, 3, 0], [0, 0, 0, 0, 0], [0, 5, 6, 0, 0]]
    out_cp = torch.zeros(3, 5)
    for r in range(2):
        part = batching.cp_split(mb, 2, r)
        batching.scatter_back(vals[part.positions], part, out_cp)
    assert torch.equal(out_cp, out)


def test_plan_pads_every_micro_batch_to_one_length():
    b = small_batch()
    bins, need = batching.plan_step(b, dp=1, dp_rank=0, budget=6, multiple=4)
    assert need % 4 == 0 and need >= max(sum(int(b.sequence_lengths[r]) for r in x) for x in bins)
    mbs = batching.materialise(b, bins, need, num_micro_batches=len(bins) + 1)
    assert len({m.tokens.shape[1] for m in mbs}) == 1
    assert mbs[-1].loss_mask.sum() == 0 and mbs[-1].rows == []  # the padding micro-batch


def test_actor_batch_validation_names_the_field():
    with pytest.raises(ValueError, match="loss_mask"):
        ActorBatch(input_ids=torch.zeros(2, 4, dtype=torch.long), sequence_lengths=torch.tensor([4, 2]),
                   loss_mask=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="sequence_lengths"):
        ActorBatch(input_ids=torch.zeros(2, 4, dtype=torch.long), sequence_lengths=torch.tensor([5, 2]))


def test_vocab_logprobs_match_torch_and_exclude_padding_columns():
    from megatron_denoise.megatron.logprobs import vocab_parallel_logprobs_from_logits

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 16, generator=g, dtype=torch.float64)
    logits[:, 13:] += 5.0  # padding columns with large logits must not leak into the softmax
    targets = torch.tensor([0, 3, 12, 5, 7, 1, 12])
    x = logits.clone().requires_grad_(True)
    lp, ent = vocab_parallel_logprobs_from_logits(x, targets, 0, 13, None)
    xr = logits.clone().requires_grad_(True)
    ls = torch.log_softmax(xr[:, :13], -1)
    ref_lp = ls.gather(1, targets[:, None]).squeeze(1)
    ref_ent = -(ls.exp() * ls).sum(-1)
    assert torch.allclose(lp.double(), ref_lp.double(), atol=1e-6)
    assert torch.allclose(ent.double(), ref_ent.double(), atol=1e-6)
    w = torch.randn(7, generator=g, dtype=torch.float64)
    (lp.double() * w).sum().add((ent.double() * w).sum()).backward()
    (ref_lp * w).sum().add((ref_ent * w).sum()).backward()
    assert torch.allclose(x.grad.double(), xr.grad, atol=1e-6)
    assert torch.count_nonzero(x.grad[:, 13:]) == 0
    assert torch.equal(logits, x.detach())  # the input logits are not modified in place


def test_padded_vocab_size_is_layout_independent():
    from megatron_denoise.megatron.model import padded_vocab_size

    assert padded_vocab_size(300) == 384
    assert padded_vocab_size(300, tp=2) == padded_vocab_size(300, tp=4) == 384
    assert padded_vocab_size(151936, tp=8) == 151936
    assert padded_vocab_size(49152, 128, 1) == 49152
    assert padded_vocab_size(300, 128, 3) == 384  # lcm(128, 3) = 384
    with pytest.raises(ValueError):
        padded_vocab_size(0)


def test_model_config_errors_name_the_key():
    from megatron_denoise.megatron.model import check_model_config

    with pytest.raises(ValueError, match="model.family"):
        check_model_config(ModelConfig(family="gpt2"))
    with pytest.raises(ValueError, match="moe.num_experts"):
        check_model_config(ModelConfig(family="qwen3_moe", moe=MoEConfig(num_experts=0)))
    with pytest.raises(NotImplementedError, match="rope_scaling.type"):
        check_model_config(ModelConfig(rope_scaling=RopeScalingConfig(type="yarn")))
    check_model_config(ModelConfig(rope_scaling=RopeScalingConfig(type="llama3", factor=8.0)))


def test_llama3_rope_frequencies_follow_hugging_face():
    """HF's formula (transformers _compute_llama3_parameters) evaluated by hand on the config's
    low/high factors and original context length (megatron hard-codes 1, 4, 8192)."""
    from megatron_denoise.megatron.model import _llama3_inv_freq

    mc = ModelConfig(kv_channels=64, rotary_base=500000.0,
                     rope_scaling=RopeScalingConfig(type="llama3", factor=32.0, low_freq_factor=1.0,
                                                    high_freq_factor=4.0, original_max_position_embeddings=2048))
    inv = _llama3_inv_freq(mc)
    base = [1.0 / (500000.0 ** (i / 64)) for i in range(0, 64, 2)]
    for got, f in zip(inv.tolist(), base):
        wl = 2 * math.pi / f
        if wl < 2048 / 4.0:
            want = f
        elif wl > 2048 / 1.0:
            want = f / 32.0
        else:
            s = (2048 / wl - 1.0) / (4.0 - 1.0)
            want = (1 - s) * f / 32.0 + s * f
        assert got == pytest.approx(want, rel=1e-6)


def test_thd_micro_batches_carry_no_mask_and_are_otherwise_the_local_ones():
    b = small_batch()
    bins, need = batching.plan_step(b, dp=1, dp_rank=0, budget=6, multiple=4)
    local = batching.materialise(b, bins, need, num_micro_batches=len(bins) + 1)
    thd = batching.materialise(b, bins, need, num_micro_batches=len(bins) + 1, with_mask=False)
    assert all(m.attn_mask is None for m in thd)
    assert all(m.attn_mask is not None and m.attn_mask.shape == (1, 1, need, need) for m in local)
    for a, c in zip(local, thd):
        for k, v in vars(a).items():
            if k != "attn_mask":
                assert (torch.equal(v, vars(c)[k]) if torch.is_tensor(v) else v == vars(c)[k]), k
    # the local mask is the hand-derived block-diagonal causal one (padding sees only itself)
    assert torch.equal(local[0].attn_mask[0, 0], batching.block_causal_mask(local[0].segment))
    assert batching.cp_split(thd[0], 2, 1).attn_mask is None


def test_actor_plan_builds_masks_only_for_the_local_spec(monkeypatch):
    """MegatronActor._plan on one rank: the THD path (Transformer Engine) gets no [S, S] mask, the
    local spec's micro-batches are unchanged (the MAX all-reduces of one rank are the identity)."""
    from types import SimpleNamespace

    from megatron_denoise.megatron import actor as actor_mod
    from megatron_denoise.megatron.actor import MegatronActor

    monkeypatch.setattr(actor_mod.coll, "all_reduce", lambda t, **kw: None)
    b = small_batch()
    lay = SimpleNamespace(dp=1, tp=1, cp=1, pp=1)
    for thd in (False, True):
        fake = SimpleNamespace(groups=SimpleNamespace(layout=lay, dp_rank=0, cp_rank=0), model=[None],
                               cfg=SimpleNamespace(trainer=SimpleNamespace(micro_batch_tokens=6)),
                               _multiple=lambda: 1, _use_thd=lambda thd=thd: thd,
                               _needs_mask=lambda thd=thd: not thd)
        mbs = MegatronActor._plan(fake, b)
        want = batching.materialise(b, *batching.plan_step(b, dp=1, dp_rank=0, budget=6, multiple=1),
                                    num_micro_batches=len(mbs))
        assert [m.rows for m in mbs] == [m.rows for m in want]
        if thd:
            assert all(m.attn_mask is None for m in mbs)
        else:
            assert all(torch.equal(m.attn_mask, w.attn_mask) for m, w in zip(mbs, want))


def test_only_megatron_local_attention_needs_a_mask():
    """_needs_mask: the THD path and the local spec's SegmentAttention (cp 1) take no [S, S] mask;
    megatron's own local attention (trainer.segment_attention false) and CPU context parallelism do."""
    from types import SimpleNamespace

    from megatron_denoise.megatron.actor import MegatronActor
    from megatron_denoise.megatron.model import BuildOptions

    for thd, seg, cp, want in [(True, True, 1, False), (True, False, 2, False), (False, True, 1, False),
                               (False, False, 1, True), (False, True, 2, True)]:
        fake = SimpleNamespace(_use_thd=lambda thd=thd: thd, options=SimpleNamespace(build=BuildOptions(segment_attention=seg)),
                               groups=SimpleNamespace(layout=SimpleNamespace(cp=cp)))
        assert MegatronActor._needs_mask(fake) is want, (thd, seg, cp)


def test_segment_mask_carries_the_segment_ids():
    b = small_batch()
    mb = batching.build_micro_batch(b, [0, 1], 16, with_mask=False)
    seg = batching.segment_mask(mb.segment)
    assert seg.shape == (1, 1, 1, 16) and seg.dtype == torch.long and torch.equal(seg[0, 0, 0], mb.segment)
    from megatron_denoise.megatron.packed_attention import is_segment_mask, segment_runs

    assert is_segment_mask(seg) and not is_segment_mask(batching.block_causal_mask(mb.segment)[None, None])
    n0, n1 = mb.lengths
    runs = segment_runs(mb.segment)
    assert runs[:2] == [(0, n0, 0), (n0, n0 + n1, 1)] and all(r[2] == -1 for r in runs[2:])
