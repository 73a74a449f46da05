"""The megatron side of the mapping without megatron-core: a stand-in module carrying exactly
megatron-core's parameter names (local spec, TP=1, padded vocabulary) is filled from a HF folder
and read back. Checks the transforms end to end (bit-exact both ways) and the errors that name
missing, unexpected and wrongly shaped megatron parameters."""
import pytest
import torch
from torch import nn

from megatron_denoise.convert.errors import MissingTensorsError, ShapeMismatchError, UnexpectedTensorsError
from megatron_denoise.convert.hf_config import model_config_from_hf, read_hf_config
from megatron_denoise.convert.hf_io import HFReader
from megatron_denoise.convert.megatron_io import load_hf_into_megatron, megatron_to_hf
from megatron_denoise.convert.tables import NameTable
from megatron_denoise.convert.transforms import TRANSFORMS, Dims, fuse_qkv, pad_vocab
from megatron_denoise.prepare.models import tiny_random_model

SIZES = dict(num_attention_heads=4, num_key_value_heads=2, head_dim=32, hidden_size=64, intermediate_size=128)
PADDED = 384  # 259 rounded up to a multiple of 128, as megatron_denoise.megatron.model pads it


def module_from_names(shapes: dict) -> nn.Module:
    """Nested modules whose named_parameters() are exactly the given dotted names."""
    tree: dict = {}
    for name, shape in shapes.items():
        node = tree
        *path, leaf = name.split(".")
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = shape

    def build(node: dict) -> nn.Module:
        subs = {k: v for k, v in node.items() if isinstance(v, dict)}
        if subs and all(k.isdigit() for k in subs) and len(subs) == len(node):
            return nn.ModuleList([build(subs[str(i)]) for i in range(len(subs))])
        m = nn.Module()
        for k, v in node.items():
            if isinstance(v, dict):
                setattr(m, k, build(v))
            else:
                m.register_parameter(k, nn.Parameter(torch.zeros(v), requires_grad=False))
        return m

    return build(tree)


def megatron_shapes(cfg) -> dict:
    """TP=1 megatron shapes of every table entry, from the transforms applied to zero tensors."""
    d = Dims(cfg.num_attention_heads, cfg.num_query_groups, cfg.head_dim)
    out = {}
    for e in NameTable(cfg).entries:
        t = TRANSFORMS[e.rule.transform].forward([torch.zeros(s) for s in e.hf_shapes], d)
        out[e.mcore] = (PADDED,) + tuple(t.shape[1:]) if e.rule.shard == "vocab" else tuple(t.shape)
    return out


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3", "qwen3_moe"])
def family(request):
    path = tiny_random_model(request.param, tokenizer="bytes", **SIZES)
    return path, model_config_from_hf(read_hf_config(path))


def test_fill_and_read_back_bit_exact(family):
    path, cfg = family
    model = module_from_names(megatron_shapes(cfg))
    report = load_hf_into_megatron([model], path, cfg)
    assert report.tensors == len(NameTable(cfg).entries)
    r = HFReader(path)
    params = dict(model.named_parameters())
    # hand-assembled expectation for one fused tensor: layer 1's QKV interleaved per group
    pre = "model.layers.1.self_attn."
    qkv = fuse_qkv(r.get(pre + "q_proj.weight"), r.get(pre + "k_proj.weight"), r.get(pre + "v_proj.weight"), 4, 2, 32)
    assert torch.equal(params["decoder.layers.1.self_attention.linear_qkv.weight"], qkv)
    emb = params["embedding.word_embeddings.weight"]
    assert torch.equal(emb, pad_vocab(r.get("model.embed_tokens.weight"), PADDED))
    back = dict(megatron_to_hf([model], cfg))
    assert set(back) == r.names() and all(torch.equal(back[k], r.get(k)) for k in back)


def test_model_side_errors_name_the_parameter(family):
    path, cfg = family
    shapes = megatron_shapes(cfg)

    extra = dict(shapes, **{"decoder.layers.0.self_attention.linear_proj.bias": (64,)})
    with pytest.raises(UnexpectedTensorsError, match="decoder.layers.0.self_attention.linear_proj.bias"):
        load_hf_into_megatron([module_from_names(extra)], path, cfg)

    missing = {k: v for k, v in shapes.items() if k != "decoder.layers.1.input_layernorm.weight"}
    with pytest.raises(MissingTensorsError, match="decoder.layers.1.input_layernorm.weight"):
        load_hf_into_megatron([module_from_names(missing)], path, cfg)
    with pytest.raises(MissingTensorsError, match="decoder.layers.1.input_layernorm.weight"):
        list(megatron_to_hf([module_from_names(missing)], cfg))

    name = "decoder.layers.1.self_attention.linear_proj.weight"
    wrong = dict(shapes, **{name: (64, 96)})
    with pytest.raises(ShapeMismatchError) as err:
        load_hf_into_megatron([module_from_names(wrong)], path, cfg)
    assert name in str(err.value) and "expected (64, 96), got (64, 128)" in str(err.value)
