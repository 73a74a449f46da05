"""Pure checks of the conversion building blocks: transforms, index arithmetic, name tables and
their inversion, and canonical naming. Expected values are derived by hand in the comments."""
import pytest
import torch

from megatron_denoise.config.schema import ModelConfig, MoEConfig
from megatron_denoise.convert import sharding as S
from megatron_denoise.convert.errors import ConfigMismatchError, UnknownArchitectureError
from megatron_denoise.convert.megatron_io import canonical_name
from megatron_denoise.convert.tables import NameTable, check_family
from megatron_denoise.convert.transforms import (fuse_gate_up, fuse_qkv, pad_vocab, split_gate_up, split_qkv,
                                                 stack_experts, tp_shard, tp_unshard, unstack_experts)


def col(*vals):
    return torch.tensor(vals, dtype=torch.float32).unsqueeze(1)  # [rows, hidden=1]


def test_qkv_interleaves_per_query_group():
    # 4 query heads, 2 groups, head_dim 1: group g holds q heads 2g, 2g+1 then k_g then v_g
    q, k, v = col(0, 1, 2, 3), col(10, 11), col(20, 21)
    fused = fuse_qkv(q, k, v, num_heads=4, num_groups=2, head_dim=1)
    assert fused.squeeze(1).tolist() == [0, 1, 10, 20, 2, 3, 11, 21]
    q2, k2, v2 = split_qkv(fused, 4, 2, 1)
    assert torch.equal(q2, q) and torch.equal(k2, k) and torch.equal(v2, v)
    # TP=2: rank r's contiguous block of the fused rows == fusing rank r's shards of q, k, v
    for r in range(2):
        local = fuse_qkv(tp_shard(q, 0, 2, r), tp_shard(k, 0, 2, r), tp_shard(v, 0, 2, r), 2, 1, 1)
        assert torch.equal(local, tp_shard(fused, 0, 2, r))


def test_qkv_head_dim_two_and_bias():
    # head_dim 2, 2 heads, 1 group: rows [q0a q0b q1a q1b k_a k_b v_a v_b]
    q, k, v = torch.arange(4.0), torch.arange(10.0, 12.0), torch.arange(20.0, 22.0)
    assert fuse_qkv(q, k, v, 2, 1, 2).tolist() == [0, 1, 2, 3, 10, 11, 20, 21]
    with pytest.raises(ValueError, match="k has 3 rows, expected 2"):
        fuse_qkv(q, torch.zeros(3), v, 2, 1, 2)


def test_gate_up_shards_are_not_contiguous_blocks():
    gate, up = col(1, 2), col(3, 4)
    fc1 = fuse_gate_up(gate, up)
    assert fc1.squeeze(1).tolist() == [1, 2, 3, 4]
    # rank 1 of TP=2 holds [gate_1; up_1] = [2, 4], not the second half [3, 4]
    local = fuse_gate_up(tp_shard(gate, 0, 2, 1), tp_shard(up, 0, 2, 1))
    assert local.squeeze(1).tolist() == [2, 4]
    g, u = split_gate_up(fc1)
    assert torch.equal(g, gate) and torch.equal(u, up)


def test_experts_stack_and_tp_unshard():
    e = [torch.full((2, 3), float(i)) for i in range(3)]
    s = stack_experts(e)
    assert s.shape == (3, 2, 3) and all(torch.equal(a, b) for a, b in zip(unstack_experts(s), e))
    w = torch.arange(12.0).reshape(3, 4)
    assert torch.equal(tp_unshard([tp_shard(w, 1, 2, 0), tp_shard(w, 1, 2, 1)], 1), w)
    with pytest.raises(ValueError, match="not divisible by tp=2"):
        tp_shard(torch.zeros(3, 2), 0, 2, 0)


def test_vocab_padding_and_shard_ranges():
    t = torch.ones(5, 2)
    p = pad_vocab(t, 8)
    assert p.shape == (8, 2) and p[5:].abs().sum() == 0
    # V=259 padded to 384 (multiple of 128): TP=2 -> rows [0,192) and [192,259)+125 zero rows
    assert S.shard_range(S.VOCAB, 259, 2, 0, 384) == (0, 192)
    assert S.shard_range(S.VOCAB, 259, 2, 1, 384) == (192, 259)
    # TP=4, padded 384: rank 3 would start at 288 > 259: an empty slice (all padding)
    assert S.shard_range(S.VOCAB, 259, 4, 3, 384) == (259, 259)
    assert S.shard_range(S.ROW, 128, 2, 1) == (64, 128)
    with pytest.raises(ValueError, match="not divisible"):
        S.shard_range(S.COLUMN, 6, 4, 0)


def test_pp_layer_renumbering_with_vpp():
    # L=8, pp=2, vpp=2: chunks of 2 layers; stage0/chunk0 = 0,1; stage1/chunk0 = 2,3;
    # stage0/chunk1 = 4,5; stage1/chunk1 = 6,7 (megatron's interleaved assignment)
    table = {(0, 0): [0, 1], (1, 0): [2, 3], (0, 1): [4, 5], (1, 1): [6, 7]}
    for (p, v), layers in table.items():
        assert [S.global_layer(i, 8, 2, p, 2, v) for i in range(2)] == layers
        for i, g in enumerate(layers):
            assert S.locate_layer(g, 8, 2, 2) == (p, v, i)
    # no VPP: L=6, pp=3 -> stage 2 holds 4, 5
    assert [S.global_layer(i, 6, 3, 2) for i in range(2)] == [4, 5]
    assert S.locate_layer(5, 6, 3) == (2, 0, 1)
    with pytest.raises(ValueError, match="divisible by pp x vpp"):
        S.layers_per_chunk(6, 2, 2)


def test_ep_expert_slicing():
    assert list(S.expert_range(8, 4, 2)) == [4, 5]
    assert S.locate_expert(5, 8, 4) == (2, 1)
    with pytest.raises(ValueError, match="num_experts"):
        S.expert_range(6, 4, 0)


def _cfg(family="llama", **kw) -> ModelConfig:
    base = dict(family=family, num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                num_query_groups=2, kv_channels=32, vocab_size=259, qkv_bias=family == "qwen2",
                qk_layernorm=family.startswith("qwen3"), tie_word_embeddings=False)
    base.update(kw)
    return ModelConfig(**base)


def test_tables_expand_and_invert():
    t = NameTable(_cfg("llama"))
    # embed + norm + lm_head + 2 layers x (input_ln, q, k, v, o, post_ln, gate, up, down)
    assert len(t.hf_names()) == 3 + 2 * 9
    assert len(t.entries) == 3 + 2 * 6
    e = t.by_mcore["decoder.layers.1.self_attention.linear_qkv.weight"]
    assert e.hf == tuple(f"model.layers.1.self_attn.{x}_proj.weight" for x in "qkv")
    assert e.hf_shapes == ((128, 64), (64, 64), (64, 64))
    # the inverse is derived, never written: every HF name points back to its entry
    for h in t.hf_names():
        entry, i = t.by_hf[h]
        assert entry.hf[i] == h and t.by_mcore[entry.mcore] is entry
    tied = NameTable(_cfg("llama", tie_word_embeddings=True))
    assert "lm_head.weight" not in tied.hf_names() and "output_layer.weight" not in tied.by_mcore
    q2 = NameTable(_cfg("qwen2"))
    assert q2.mcore_for_hf("model.layers.0.self_attn.v_proj.bias") == "decoder.layers.0.self_attention.linear_qkv.bias"
    q3 = NameTable(_cfg("qwen3"))
    assert q3.mcore_for_hf("model.layers.1.self_attn.k_norm.weight") == "decoder.layers.1.self_attention.k_layernorm.weight"
    assert q3.hf_shape("model.layers.1.self_attn.q_norm.weight") == (32,)


def test_moe_table():
    cfg = _cfg("qwen3_moe", moe=MoEConfig(num_experts=4, router_topk=2, ffn_hidden_size=48))
    t = NameTable(cfg)
    entry, pos = t.by_hf["model.layers.1.mlp.experts.3.up_proj.weight"]
    assert entry.mcore == "decoder.layers.1.mlp.experts.local_experts.3.linear_fc1.weight" and pos == 1
    assert entry.expert == 3 and entry.layer == 1 and entry.rule.transform == "gate_up"
    assert t.hf_shape("model.layers.0.mlp.gate.weight") == (4, 64)
    assert t.hf_shape("model.layers.0.mlp.experts.2.down_proj.weight") == (64, 48)
    # 3 model-level + 2 layers x (input_ln, q, k, v, o, q_norm, k_norm, post_ln, router, 4 x 3 experts)
    assert len(t.hf_names()) == 3 + 2 * (9 + 12)


def test_family_flags_must_match():
    with pytest.raises(ConfigMismatchError, match="qkv_bias: False but family 'qwen2' needs True"):
        check_family(_cfg("qwen2", qkv_bias=False))
    with pytest.raises(ConfigMismatchError, match="moe.num_experts > 0: False"):
        check_family(_cfg("qwen3_moe"))
    with pytest.raises(UnknownArchitectureError, match="'gpt2'.*llama, qwen2, qwen3, qwen3_moe"):
        NameTable(_cfg("gpt2"))


def test_canonical_names_pp_ep_and_te_spellings():
    cfg = _cfg("qwen3_moe", num_layers=4, moe=MoEConfig(num_experts=4, router_topk=2))
    sh = S.ShardInfo(pp_size=2, pp_rank=1, ep_size=2, ep_rank=1)
    # local layer 0 on stage 1 is global layer 2; local expert 1 on EP rank 1 is expert 3
    assert canonical_name("decoder.layers.0.mlp.experts.local_experts.1.linear_fc1.weight", cfg, sh) == \
        "decoder.layers.2.mlp.experts.local_experts.3.linear_fc1.weight"
    # Transformer Engine spellings map onto the local spec's
    assert canonical_name("decoder.layers.1.self_attention.linear_qkv.layer_norm_weight", cfg, sh) == \
        "decoder.layers.3.input_layernorm.weight"
    assert canonical_name("decoder.layers.1.mlp.experts.linear_fc2.weight0", cfg, sh) == \
        "decoder.layers.3.mlp.experts.local_experts.2.linear_fc2.weight"
    assert canonical_name("output_layer.weight", cfg, sh) == "output_layer.weight"
    vsh = S.ShardInfo(pp_size=2, pp_rank=0, vpp_size=2)
    assert canonical_name("decoder.layers.0.mlp.linear_fc1.weight", _cfg(num_layers=4), vsh, vpp_rank=1) == \
        "decoder.layers.2.mlp.linear_fc1.weight"
