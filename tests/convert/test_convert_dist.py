"""HF <-> megatron-core conversion on real megatron-core models in several layouts, checked by
logits against transformers and by bit-exact round trips. All cases run in ONE torchrun launch of
2 processes (see dist_worker.py); each test below asserts one recorded check.

Layouts (2 ranks): tp1 (dp2), tp2, pp2, pp2 x vpp2, ep2 and tp2 x etp2 with sequence parallel
(MoE); every sharded layout also checks that a rank reads only its slices of the HF tensors.
Distributed checkpoints are saved in one layout and exported in another; a MegatronActor's weights
as HF pairs (the refit source) and its training checkpoint (model + distributed optimizer) are
exported in another layout. SmolLM2-135M-Instruct (real weights, tied embeddings) is imported at
pp2 (its 9 heads / 3 KV groups do not divide by tp=2) and compared with transformers within 1e-4.
"""
import json
import os
import socket
import subprocess
import sys

import pytest

from megatron_denoise.prepare.models import smollm2_path, tiny_random_model

pytestmark = [pytest.mark.dist, pytest.mark.megatron, pytest.mark.slow]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SIZES = dict(num_attention_heads=4, num_key_value_heads=2, head_dim=32, hidden_size=64, intermediate_size=128)

PARITY = {  # name: (model, layout)
    "llama_tp1": ("llama", {}),
    "llama_tp2": ("llama", {"tp": 2}),
    "llama_pp2": ("llama", {"pp": 2}),
    "llama_pp2_vpp2": ("llama", {"pp": 2, "vpp": 2}),
    "llama_tied_tp2": ("llama_tied", {"tp": 2}),
    "llama_tied_pp2": ("llama_tied", {"pp": 2}),  # the last stage holds its own copy of the embedding
    "qwen2_tp1": ("qwen2", {}),
    "qwen2_tp2": ("qwen2", {"tp": 2}),
    "qwen3_tp1": ("qwen3", {}),
    "qwen3_tp2": ("qwen3", {"tp": 2}),
    "qwen3_moe_tp1": ("qwen3_moe", {}),
    "qwen3_moe_ep2": ("qwen3_moe", {"ep": 2}),
    "qwen3_moe_tp2_sp": ("qwen3_moe", {"tp": 2, "sp": True}),  # experts split over etp=2
}
CKPT = {  # name: (model, saved in, exported from)
    "llama_ckpt_tp2_to_pp2": ("llama", {"tp": 2}, {"pp": 2}),
    "qwen3_moe_ckpt_ep2_to_tp1": ("qwen3_moe", {"ep": 2}, {}),
}
ACTOR = {  # name: (model, actor layout, export layout)
    "qwen3_actor_tp2_to_pp2": ("qwen3", {"tp": 2}, {"pp": 2}),
}
CHECKS = ([f"{n}/{c}" for n in PARITY for c in ("logits", "hf_megatron_hf", "megatron_hf_megatron")]
          + [f"{n}/reads_only_its_shard" for n, (_, lay) in PARITY.items() if lay]
          + [f"{n}/ckpt_roundtrip" for n in CKPT]
          + [f"{n}/{c}" for n in ACTOR for c in ("actor_logits", "actor_hf_weights", "actor_ckpt_to_hf")]
          + ["smollm2_pp2/logits", "smollm2_pp2/reads_only_its_shard"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("convert_dist")
    models = {f: tiny_random_model(f, tokenizer="bytes", **SIZES) for f in ("qwen2", "qwen3", "qwen3_moe")}
    models["llama"] = tiny_random_model("llama", tokenizer="bytes", num_hidden_layers=4, **SIZES)
    models["llama_tied"] = tiny_random_model("llama", tokenizer="bytes", tie_word_embeddings=True, **SIZES)
    cases = [{"kind": "parity", "name": n, "hf": models[m], "layout": lay} for n, (m, lay) in PARITY.items()]
    cases += [{"kind": "ckpt", "name": n, "hf": models[m], "save": s, "load": l} for n, (m, s, l) in CKPT.items()]
    cases += [{"kind": "actor", "name": n, "hf": models[m], "layout": a, "load": l} for n, (m, a, l) in ACTOR.items()]
    cases.append({"kind": "parity", "name": "smollm2_pp2", "hf": smollm2_path(), "layout": {"pp": 2},
                  "atol": 1e-4, "logits_only": True})
    spec = tmp / "spec.json"
    out = tmp / "results.json"
    spec.write_text(json.dumps({"cases": cases, "out": str(out)}))
    env = dict(os.environ, OMP_NUM_THREADS="1", MDN_TEST_TMP=str(tmp),
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), os.path.join(ROOT, "tests", "convert", "dist_worker.py"), str(spec)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if not out.exists():
        pytest.fail(f"worker wrote no results (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    res = json.loads(out.read_text())
    res["__log__"] = proc.stdout[-4000:] + proc.stderr[-4000:]
    return res


@pytest.mark.parametrize("check", CHECKS)
def test_conversion_check(results, check):
    assert check in results, f"{check} did not run:\n" + "\n".join(
        v["detail"] for k, v in results.items() if k.endswith("/error"))
    assert results[check]["ok"], results[check]["detail"]


def test_no_case_raised(results):
    errors = {k: v["detail"] for k, v in results.items() if k.endswith("/error")}
    assert not errors, "\n".join(f"{k}:\n{v}" for k, v in errors.items())
