"""The conversion CLI's refusals, called in-process through its main(): each ends with exit code 2
and one message naming what is wrong, before any process group or model is built."""
import json
import os
import shutil

import pytest

from megatron_denoise.launch.convert_checkpoint import main
from megatron_denoise.prepare.models import tiny_random_model

SIZES = dict(num_attention_heads=4, num_key_value_heads=2, head_dim=32, hidden_size=64, intermediate_size=128)


@pytest.fixture(scope="module")
def llama():
    return tiny_random_model("llama", tokenizer="bytes", **SIZES)


def _err(capsys):
    return capsys.readouterr().err


def test_unknown_architecture(llama, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(llama, src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["architectures"] = ["MistralForCausalLM"]
    (src / "config.json").write_text(json.dumps(cfg))
    assert main(["--from-hf", "--hf", str(src), "--checkpoint", str(tmp_path / "ckpt")]) == 2
    err = _err(capsys)
    assert "unknown architecture 'MistralForCausalLM'" in err and "Qwen3MoeForCausalLM" in err
    assert not (tmp_path / "ckpt").exists()


def test_run_config_mismatch(llama, tmp_path, capsys):
    run = tmp_path / "run.yaml"
    run.write_text("model:\n  family: llama\n  num_layers: 2\n  hidden_size: 64\n  ffn_hidden_size: 128\n"
                   "  num_attention_heads: 8\n  num_query_groups: 2\n  kv_channels: 32\n  vocab_size: 300\n"
                   "  qkv_bias: false\n  qk_layernorm: false\n")
    assert main(["--from-hf", "--hf", llama, "--checkpoint", str(tmp_path / "ckpt"), "--config", str(run)]) == 2
    err = _err(capsys)
    assert "model.num_attention_heads: " in err and "has 8" in err and "has 4" in err
    assert "model.vocab_size: " in err and "has 300" in err and "has 259" in err


def test_refuses_existing_destination(llama, tmp_path, capsys):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert main(["--from-hf", "--hf", llama, "--checkpoint", str(out)]) == 2
    assert "exists and is not empty" in _err(capsys) and (out / "keep.txt").read_text() == "precious"


def test_export_needs_a_checkpoint_and_a_model_description(tmp_path, capsys):
    assert main(["--to-hf", "--checkpoint", str(tmp_path), "--hf", str(tmp_path / "out")]) == 2
    assert "is not a megatron-core distributed checkpoint" in _err(capsys)
    (tmp_path / "step_00000005" / "dist").mkdir(parents=True)
    (tmp_path / "step_00000005" / "dist" / "metadata.json").write_text("{}")
    (tmp_path / "latest").write_text("step_00000005\n")
    # an actor checkpoint root resolves to step_00000005/dist; it records no model: ask for one
    assert main(["--to-hf", "--checkpoint", str(tmp_path), "--hf", str(tmp_path / "out")]) == 2
    assert "pass --config" in _err(capsys)


def test_layout_that_does_not_fit_the_model(tmp_path, capsys, monkeypatch):
    one_kv = tiny_random_model("llama", tokenizer="bytes", **{**SIZES, "num_key_value_heads": 1})
    monkeypatch.setenv("WORLD_SIZE", "2")  # as under torchrun --nproc-per-node 2, checked before any group
    assert main(["--from-hf", "--hf", one_kv, "--checkpoint", str(tmp_path / "ckpt"), "--tp", "2", "--pp", "2"]) == 2
    err = _err(capsys)
    assert "--tp 2 --pp 2" in err and "on 2 process(es)" in err
    assert "num_query_groups (1) must be divisible by parallel.tensor_model_parallel_size (2)" in err
    assert "world size (2) must be divisible by" in err  # both problems, at once
    assert not (tmp_path / "ckpt").exists()
