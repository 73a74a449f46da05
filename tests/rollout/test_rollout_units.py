"""Engine-free parts of the rollout layer: the local model cache, refit serialisation, the
transformers engine on a tiny random model, request checks, and lazy imports."""
from __future__ import annotations

import subprocess
import sys
import threading

import pytest

from megatron_denoise.core.types import PrefixSpan, RolloutRequest, RowKind
from megatron_denoise.rollout.engine import SamplingSpec, check_requests, make_engine


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("MDN_CACHE", str(tmp_path_factory.mktemp("mdn_cache")))
    yield
    mp.undo()


@pytest.fixture(scope="module")
def tiny(cache):
    from megatron_denoise.prepare.models import tiny_random_model
    # Large init so that logits are far from ties (greedy is then stable across batch shapes).
    return tiny_random_model("llama", tokenizer="bytes", initializer_range=0.5, seed=3)


def req(ids, max_tokens, slot=0, seed=0, prefix=None):
    kind = RowKind.MAIN if prefix is None else RowKind.DENOISE
    span = None
    if prefix is not None:
        span = PrefixSpan(0, len(prefix) + 5, 0.5, len(prefix), tuple(prefix))
    return RolloutRequest("u", 0, slot, kind, tuple(ids), span, max_tokens, seed)


def test_tiny_models_are_deterministic_and_checked(cache, tmp_path):
    import torch
    from safetensors.torch import load_file

    from megatron_denoise.prepare.models import tiny_random_model

    a = tiny_random_model("qwen3", tmp_path / "a", tokenizer="bytes", seed=1)
    b = tiny_random_model("qwen3", tmp_path / "b", tokenizer="bytes", seed=1)
    c = tiny_random_model("qwen3", tmp_path / "c", tokenizer="bytes", seed=2)
    wa, wb, wc = (load_file(f"{p}/model.safetensors") for p in (a, b, c))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(not torch.equal(wa[k], wc[k]) for k in wa if wa[k].dim() == 2)
    assert any("q_norm" in k for k in wa)  # Qwen3's QK-norm is there
    with pytest.raises(ValueError, match="head_dim=16 < 32"):
        tiny_random_model("llama", tmp_path / "d", tokenizer="bytes", head_dim=16)
    with pytest.raises(ValueError, match="unknown family 'gpt9'"):
        tiny_random_model("gpt9", tmp_path / "e", tokenizer="bytes")
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a model built here"):
        tiny_random_model("llama", tmp_path / "f", tokenizer="bytes")
    assert (tmp_path / "f" / "notes.txt").read_text() == "mine"


def test_concurrent_cached_builds_share_one_folder(cache):
    from megatron_denoise.prepare.models import tiny_random_model

    out, errs = [], []

    def build():
        try:
            out.append(tiny_random_model("qwen2", tokenizer="bytes", hidden_size=96, head_dim=32,
                                         num_attention_heads=3, num_key_value_heads=1))
        except Exception as e:  # pragma: no cover - reported below
            errs.append(e)

    threads = [threading.Thread(target=build) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errs and len(set(out)) == 1
    from transformers import AutoModelForCausalLM
    assert AutoModelForCausalLM.from_pretrained(out[0]).config.hidden_size == 96


def test_refit_payload_round_trip():
    import torch

    from megatron_denoise.rollout.refit import pack_tensors, unpack_tensors

    named = [("a.weight", torch.randn(3, 4)), ("b.bias", torch.arange(5, dtype=torch.int64)),
             ("c", torch.randn(2, 6).t())]  # non-contiguous
    back = unpack_tensors(pack_tensors(named))
    assert sorted(n for n, _ in back) == sorted(n for n, _ in named)
    got = dict(back)
    assert all(torch.equal(got[n], t) and got[n].dtype == t.dtype for n, t in named)
    with pytest.raises(ValueError, match="'a.weight' given twice"):
        pack_tensors(named + [("a.weight", torch.zeros(1))])


def test_hf_engine_budgets_order_seeds_and_refit(tiny):
    import torch
    from safetensors.torch import load_file

    from megatron_denoise.rollout.hf_engine import HFEngine

    eng = HFEngine(tiny)
    prompt = list(range(40, 60))
    rows = [req(prompt, 7), req(prompt, 3, slot=1, prefix=[70, 71, 72, 73]), req(prompt[:5], 5, slot=2)]
    greedy = SamplingSpec(temperature=0.0, logprobs=True)
    out = eng.generate(rows, greedy)
    for r, c in zip(rows, out):
        assert 1 <= len(c.token_ids) <= r.max_tokens and len(c.logprobs) == len(c.token_ids)
        assert (c.finish_reason == "stop") == (c.token_ids[-1] in eng.eos_ids)
        assert all(lp <= 0 for lp in c.logprobs)
        # one row at a time gives the same as inside the call: order is kept
        assert eng.generate([r], greedy)[0].token_ids == c.token_ids

    # The prefix changes the continuation: the engine continued after the prefix ids.
    assert eng.generate([req(prompt + [70, 71, 72, 73], 3)], greedy)[0].token_ids == out[1].token_ids

    # Teacher forcing recognises the greedy continuation (and its log-probs) in one forward pass.
    argmax, logp = eng.teacher_forced(prompt, out[0].token_ids)
    assert argmax == list(out[0].token_ids)
    assert max(abs(a - b) for a, b in zip(logp, out[0].logprobs)) < 1e-4

    sampled = SamplingSpec(temperature=1.0)
    s1 = eng.generate([req(prompt, 8, seed=5), req(prompt, 8, seed=6)], sampled)
    assert eng.teacher_forced(prompt, s1[0].token_ids)[0] != list(s1[0].token_ids)  # sampled, not greedy
    s2 = eng.generate([req(prompt, 8, seed=5), req(prompt, 8, seed=6)], sampled)
    assert [c.token_ids for c in s1] == [c.token_ids for c in s2]
    assert s1[0].token_ids != s1[1].token_ids

    weights = load_file(f"{tiny}/model.safetensors")
    with pytest.raises(KeyError, match="missing tensors"):
        eng.update_weights([(k, v) for k, v in weights.items() if "embed" not in k])
    with pytest.raises(ValueError, match=r"model.norm.weight has shape \(3,\)"):
        eng.update_weights({**weights, "model.norm.weight": torch.ones(3)}.items())
    g = torch.Generator().manual_seed(0)
    moved = {k: v + 0.5 * torch.randn(v.shape, generator=g) if v.dim() == 2 else v for k, v in weights.items()}
    assert eng.update_weights(moved.items()) >= 0
    assert eng.generate(rows[:1], greedy)[0].token_ids != out[0].token_ids
    eng.update_weights(weights.items())
    assert eng.generate(rows[:1], greedy)[0].token_ids == out[0].token_ids

    eng.sleep()
    with pytest.raises(RuntimeError, match="asleep"):
        eng.generate(rows[:1], greedy)
    eng.wake_up()


def test_request_and_sampling_checks():
    with pytest.raises(ValueError, match=r"request 1 \(problem 'u', slot 4\).*= 12 exceeds the engine's max_model_len \(10\)"):
        check_requests([req([1, 2], 3), req([1, 2, 3], 9, slot=4)], max_model_len=10)
    with pytest.raises(TypeError, match="request 0: expected RolloutRequest"):
        check_requests([{"prompt_ids": [1]}])
    with pytest.raises(ValueError, match="top_p"):
        SamplingSpec(top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingSpec(temperature=-1)

    class Cfg:
        engine = "sglang"
    with pytest.raises(ValueError, match="unknown engine 'sglang'"):
        make_engine("x", Cfg(), max_model_len=8)


def test_rollout_package_imports_no_engine():
    code = ("import sys, megatron_denoise.rollout, megatron_denoise.rollout.refit, "
            "megatron_denoise.rollout.vllm_engine, megatron_denoise.rollout.hf_engine, "
            "megatron_denoise.prepare.pool, megatron_denoise.prepare.models\n"
            "bad = [m for m in ('vllm', 'torch', 'transformers', 'ray', 'megatron') if m in sys.modules]\n"
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
