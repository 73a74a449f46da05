"""The Hugging Face side without megatron: config.json <-> ModelConfig, folder checks (missing,
extra, wrong-shape tensors), sharded writing with an index, lazy sliced reading, and the
transformers in-memory expert layout."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_denoise.convert.errors import (ConfigMismatchError, MissingTensorsError, ShapeMismatchError,
                                             UnexpectedTensorsError, UnknownArchitectureError,
                                             UnsupportedConfigError)
from megatron_denoise.convert.hf_config import (check_same_model, hf_config_from_model, model_config_from_hf,
                                                read_hf_config)
from megatron_denoise.convert.hf_io import HFReader, write_hf_shards
from megatron_denoise.convert.megatron_io import check_hf_folder, to_transformers_module_state
from megatron_denoise.convert.tables import NameTable
from megatron_denoise.prepare.models import tiny_random_model

SIZES = dict(num_attention_heads=4, num_key_value_heads=2, head_dim=32, hidden_size=64, intermediate_size=128)

# SmolLM2-135M-Instruct's config.json as published (legacy rope fields at the top level)
SMOLLM2 = {
    "architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
    "hidden_size": 576, "initializer_range": 0.041666666666666664, "intermediate_size": 1536,
    "max_position_embeddings": 8192, "model_type": "llama", "num_attention_heads": 9, "num_hidden_layers": 30,
    "num_key_value_heads": 3, "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None,
    "rope_theta": 100000, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "vocab_size": 49152,
}


@pytest.fixture(scope="module")
def tiny():
    return {f: tiny_random_model(f, tokenizer="bytes", **SIZES) for f in ("llama", "qwen2", "qwen3", "qwen3_moe")}


def test_smollm2_config_maps_and_round_trips():
    cfg = model_config_from_hf(SMOLLM2)
    assert (cfg.family, cfg.num_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_query_groups) == \
        ("llama", 30, 576, 9, 3)
    assert cfg.head_dim == 64 and cfg.rotary_base == 100000.0 and cfg.tie_word_embeddings
    assert cfg.norm_epsilon == 1e-5 and cfg.params_dtype == "bfloat16" and not cfg.qkv_bias
    back = hf_config_from_model(cfg, base=SMOLLM2, dtype="bfloat16")
    assert back["bos_token_id"] == 1 and back["architectures"] == ["LlamaForCausalLM"]
    assert model_config_from_hf(back) == cfg


def test_rope_scaling_round_trip():
    hf = dict(SMOLLM2, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 4096})
    cfg = model_config_from_hf(hf)
    assert cfg.rope_scaling.type == "llama3" and cfg.rope_scaling.factor == 8.0
    assert cfg.rope_scaling.original_max_position_embeddings == 4096
    # transformers >= 5 writes rope_parameters; it must read back to the same config
    back = hf_config_from_model(cfg)
    assert "rope_parameters" in back and model_config_from_hf(back) == cfg


def test_every_family_config_round_trips(tiny):
    for fam, path in tiny.items():
        hf = read_hf_config(path)
        cfg = model_config_from_hf(hf, hf_path=path)
        assert cfg.family == fam
        assert model_config_from_hf(hf_config_from_model(cfg, base=hf), hf_path=path) == cfg
    moe = model_config_from_hf(read_hf_config(tiny["qwen3_moe"]))
    assert (moe.moe.num_experts, moe.moe.router_topk, moe.moe.ffn_hidden_size) == (4, 2, 64)
    assert moe.moe.norm_topk_prob and not moe.moe.router_pre_softmax


def test_unknown_architecture_and_unsupported_options():
    with pytest.raises(UnknownArchitectureError, match="'GPT2LMHeadModel'.*LlamaForCausalLM"):
        model_config_from_hf({"architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(UnknownArchitectureError, match="<none>"):
        model_config_from_hf({"model_type": "llama"})
    with pytest.raises(UnsupportedConfigError, match="attention_bias=true"):
        model_config_from_hf(dict(SMOLLM2, attention_bias=True))
    with pytest.raises(UnsupportedConfigError, match="hidden_act='gelu'"):
        model_config_from_hf(dict(SMOLLM2, hidden_act="gelu"))


def test_config_mismatch_lists_every_field(tiny):
    a = model_config_from_hf(read_hf_config(tiny["qwen3_moe"]))
    b = model_config_from_hf(dict(read_hf_config(tiny["qwen3_moe"]), num_attention_heads=8, vocab_size=300,
                                  num_local_experts=8))
    with pytest.raises(ConfigMismatchError) as err:
        check_same_model(a, b)
    msg = str(err.value)
    assert "model.num_attention_heads: run config has 4, checkpoint config.json has 8" in msg
    assert "model.vocab_size: run config has 259, checkpoint config.json has 300" in msg
    assert "model.moe.num_experts: run config has 4, checkpoint config.json has 8" in msg
    assert len(err.value.problems) == 3
    check_same_model(a, a)


def _copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def _edit_weights(folder, fn):
    (fname,) = [f for f in os.listdir(folder) if f.endswith(".safetensors")]
    path = os.path.join(folder, fname)
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path, metadata={"format": "pt"})
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        os.remove(index)


def test_folder_checks_name_the_tensors(tiny, tmp_path):
    path = tiny["qwen2"]
    cfg = model_config_from_hf(read_hf_config(path))
    check_hf_folder(HFReader(path), NameTable(cfg))  # the original passes

    missing = _copy(path, tmp_path / "missing")
    _edit_weights(missing, lambda t: (t.pop("model.layers.1.self_attn.k_proj.bias"), t.pop("lm_head.weight")))
    with pytest.raises(MissingTensorsError) as err:
        check_hf_folder(HFReader(missing), NameTable(cfg))
    assert err.value.names == ["lm_head.weight", "model.layers.1.self_attn.k_proj.bias"]
    assert "model.layers.1.self_attn.k_proj.bias" in str(err.value)

    extra = _copy(path, tmp_path / "extra")
    _edit_weights(extra, lambda t: t.update({"model.layers.0.mlp.bogus.weight": torch.zeros(2)}))
    with pytest.raises(UnexpectedTensorsError, match="model.layers.0.mlp.bogus.weight"):
        check_hf_folder(HFReader(extra), NameTable(cfg))

    bad = _copy(path, tmp_path / "shape")
    _edit_weights(bad, lambda t: t.update({"model.layers.0.mlp.up_proj.weight": torch.zeros(96, 64)}))
    with pytest.raises(ShapeMismatchError) as err:
        check_hf_folder(HFReader(bad), NameTable(cfg))
    assert "model.layers.0.mlp.up_proj.weight" in str(err.value)
    assert "expected (128, 64), got (96, 64)" in str(err.value)


def test_sharded_writer_index_and_sliced_reads(tmp_path):
    named = [(f"t{i}", torch.arange(100.0 * (i + 1)).reshape(10, -1)) for i in range(5)]
    seen = []
    s = write_hf_shards(iter(named), str(tmp_path / "out"), max_shard_bytes=2000,
                        on_tensor=lambda n, b: seen.append((n, b)))
    # sizes 400, 800, 1200, 1600, 2000 bytes -> shards {t0,t1}, {t2}, {t3}, {t4}
    assert s.files == [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]
    assert s.tensors == 5 and s.bytes == 6000 and [n for n, _ in seen] == [n for n, _ in named]
    index = json.load(open(tmp_path / "out" / "model.safetensors.index.json"))
    assert index["metadata"]["total_size"] == 6000
    assert index["weight_map"]["t0"] == index["weight_map"]["t1"] == "model-00001-of-00004.safetensors"
    r = HFReader(str(tmp_path / "out"))
    assert r.names() == {n for n, _ in named}
    for n, t in named:
        assert torch.equal(r.get(n), t) and r.shape(n) == tuple(t.shape)
        assert torch.equal(r.get_range(n, 1, 2, 5), t[:, 2:5]) and torch.equal(r.get_range(n, 0, 3, 7), t[3:7])
    with pytest.raises(ValueError, match="t0 produced twice"):
        write_hf_shards(iter([named[0], named[0]]), str(tmp_path / "dup"))


def test_transformers_expert_layout_matches_module_state(tiny):
    from transformers import AutoModelForCausalLM

    path = tiny["qwen3_moe"]
    cfg = model_config_from_hf(read_hf_config(path))
    r = HFReader(path)
    stacked = to_transformers_module_state({n: r.get(n) for n in r.names()}, cfg)
    module = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict()
    assert set(stacked) == set(module)
    assert all(torch.equal(stacked[k], module[k]) for k in module)


def test_write_hf_folder_in_bfloat16_with_configs_and_tokenizer(tiny, tmp_path):
    from megatron_denoise.convert.pipeline import write_hf_folder

    path = tiny["qwen3"]
    cfg = model_config_from_hf(read_hf_config(path))
    r = HFReader(path)
    out = str(tmp_path / "bf16")
    s = write_hf_folder(((n, r.get(n)) for n in sorted(r.names())), out, cfg, source_hf=path,
                        dtype=torch.bfloat16)
    assert s.dtype == "bfloat16" and set(s.tokenizer_files) >= {"tokenizer.json", "tokenizer_config.json"}
    written = HFReader(out)
    assert all(written.get(n).dtype == torch.bfloat16 and torch.equal(written.get(n), r.get(n).bfloat16())
               for n in r.names())
    assert read_hf_config(out)["dtype"] == "bfloat16"
    gen = json.load(open(os.path.join(out, "generation_config.json")))
    assert gen["eos_token_id"] == json.load(open(os.path.join(path, "generation_config.json")))["eos_token_id"]
    # an incomplete stream is caught by the verification and names the tensor
    with pytest.raises(MissingTensorsError, match="model.norm.weight"):
        write_hf_folder(((n, r.get(n)) for n in sorted(r.names()) if n != "model.norm.weight"),
                        str(tmp_path / "partial"), cfg, source_hf=path)
    with pytest.raises(FileExistsError, match="overwrite"):
        write_hf_folder(iter([]), out, cfg)
