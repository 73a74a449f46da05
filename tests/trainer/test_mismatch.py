"""Rollout-training mismatch with a deliberately mismatched engine (issue 15).

A tiny random Llama is the policy (its fp32 forward plays the actor's old-log-prob pass); the
rollout engine (transformers' generate, returning its sampling log-probs) runs either the same
weights or PERTURBED ones. The trainer's own pipeline (requests with wrong-solution prefixes ->
fold -> pack -> core.mismatch) then measures the mismatch per row kind and corrects the loss:

  - same weights: token ratio 1 (to float precision), k3 ~ 0, nothing beyond the threshold;
  - perturbed weights: the metrics react (k3, max ratio, fraction beyond the threshold);
  - the corrected gradient of the on-policy loss with respect to each token's log-prob equals
    the hand-derived -A min(pi_train / pi_engine, C) / N, computed directly from the engine's
    returned log-probs and the policy's logits (not through core.mismatch's alignment), with
    prefix tokens (shift mode: trained, never the engine's samples) at weight 1, and a row whose
    sequence ratio leaves the band dropped entirely.
"""
from __future__ import annotations

import math

import pytest
import torch

from megatron_denoise.config.schema import MismatchConfig
from megatron_denoise.core.fold import fold_rollout, pack
from megatron_denoise.core.losses import policy_loss
from megatron_denoise.core.mismatch import engine_logprobs, measure_and_correct
from megatron_denoise.core.types import PrefixSpan, Rollout, RolloutRequest, RowKind
from megatron_denoise.rollout.engine import SamplingSpec

pytestmark = [pytest.mark.engine]

PROMPTS = [b"12+7=", b"3*4=", b"9-5=", b"8+8="]
PREFIX = b"The answer"


@pytest.fixture(scope="module")
def setup():
    from transformers import AutoModelForCausalLM

    from megatron_denoise.prepare.models import tiny_random_model
    from megatron_denoise.rollout.hf_engine import HFEngine

    path = tiny_random_model("llama", tokenizer="bytes", seed=3, hidden_size=64, intermediate_size=128,
                             num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                             initializer_range=0.2)
    policy = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    engine = HFEngine(path, dtype="float32")
    return policy, engine


def requests(tok_offset: int = 3) -> list[RolloutRequest]:
    """Two main rows and two denoise rows (a 10-byte wrong prefix). Byte tokenizer: id = byte + 3."""
    out = []
    for i, p in enumerate(PROMPTS):
        ids = tuple(b + tok_offset for b in p)
        if i < 2:
            out.append(RolloutRequest(problem_uid=f"p{i}", group_id=i, slot=0, kind=RowKind.MAIN, prompt_ids=ids,
                                      prefix=None, max_tokens=12, seed=100 + i))
        else:
            pre = tuple(b + tok_offset for b in PREFIX)
            span = PrefixSpan(pool_index=0, source_num_tokens=len(pre), rho=1.0, length=len(pre), token_ids=pre)
            out.append(RolloutRequest(problem_uid=f"p{i}", group_id=i, slot=1, kind=RowKind.DENOISE, prompt_ids=ids,
                                      prefix=span, max_tokens=12, seed=100 + i))
    return out


def policy_logprobs(policy, input_ids: torch.Tensor) -> torch.Tensor:
    """Token-aligned log p(input_ids[:, t] | < t) [rows, W] (0 at t = 0), as the actor returns them."""
    with torch.no_grad():
        logits = policy(input_ids=input_ids).logits.float()
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return torch.cat([torch.zeros(input_ids.shape[0], 1), lp], 1)


def run(policy, engine, cfg: MismatchConfig, partial_mode: str = "shift"):
    reqs = requests()
    comps = engine.generate(reqs, SamplingSpec(temperature=1.0, logprobs=True))
    rows = [Rollout(request=r, completion=c, reward=0.0, accuracy=0.0) for r, c in zip(reqs, comps)]
    batch = pack([fold_rollout(r, partial_mode) for r in rows])
    # pad with a token the model knows; positions past a row's length are masked anyway
    train = policy_logprobs(policy, batch.input_ids)
    elp, have = engine_logprobs(rows, batch.response_start, batch.input_ids.shape[1])
    res = measure_and_correct(train, elp, have, batch.loss_mask, [r.kind.value for r in rows], cfg)
    return rows, batch, train, res


def test_same_weights_show_no_mismatch(setup):
    policy, engine = setup
    _, _, _, res = run(policy, engine, MismatchConfig(threshold=1.2))
    m = res.metrics
    for kind in ("main", "denoise"):
        assert m[f"mismatch/{kind}/tokens"] > 0
        assert m[f"mismatch/{kind}/ratio_mean"] == pytest.approx(1.0, abs=1e-4)
        assert m[f"mismatch/{kind}/k3"] < 1e-8
        assert m[f"mismatch/{kind}/frac_beyond"] == 0.0


@pytest.fixture(scope="module")
def perturbed(setup):
    policy, engine = setup
    g = torch.Generator().manual_seed(0)
    named = [(n, t.detach() + 0.05 * torch.randn(t.shape, generator=g)) for n, t in policy.state_dict().items()]
    engine.update_weights(named)
    yield policy, engine
    engine.update_weights(list(policy.state_dict().items()))


def test_perturbed_engine_makes_the_metrics_react(perturbed):
    policy, engine = perturbed
    _, _, _, res = run(policy, engine, MismatchConfig(threshold=1.2))
    m = res.metrics
    for kind in ("main", "denoise"):
        assert m[f"mismatch/{kind}/k3"] > 1e-3, m
        assert m[f"mismatch/{kind}/frac_beyond"] > 0.0, m
        assert m[f"mismatch/{kind}/ratio_max"] > 1.2, m


def test_corrected_gradient_is_the_hand_derived_one(perturbed):
    policy, engine = perturbed
    cap = 1.5
    rows, batch, train, res0 = run(policy, engine, MismatchConfig(tis_cap=cap))
    # pick a band that keeps some rows and drops at least one (the sequence ratios are measured)
    sr = sorted(float(x) for x in res0.seq_ratio)
    low = (sr[0] + sr[1]) / 2  # drops exactly the row with the smallest sequence ratio
    cfg = MismatchConfig(tis_cap=cap, seq_mask_low=low, seq_mask_high=1e9)
    _, _, _, res = run(policy, engine, cfg)
    adv = torch.tensor([1.0, -2.0, 0.5, 3.0])
    logp = train.clone().requires_grad_(True)
    loss, _ = policy_loss(logp, None, adv, res.loss_mask, force_on_policy=True, is_weights=res.is_weights)
    loss.backward()

    # by hand, from the engine's returned log-probs and the policy's own log-probs
    n_tokens = float(res.loss_mask.sum())
    dropped = min(range(4), key=lambda r: float(res0.seq_ratio[r]))
    want = torch.zeros_like(train)
    for r, row in enumerate(rows):
        if r == dropped:
            continue  # the whole row left the band: no gradient at all
        start = int(batch.response_start[r])
        p = row.prefix_length
        for j in range(p):  # shift mode: prefix tokens are trained, at weight 1 (not the engine's)
            want[r, start + j] = -adv[r] / n_tokens
        for j, elp in enumerate(row.completion.logprobs):
            t = start + p + j
            ratio = math.exp(float(train[r, t]) - elp)
            want[r, t] = -adv[r] * min(ratio, cap) / n_tokens
    torch.testing.assert_close(logp.grad, want, rtol=1e-5, atol=1e-7)
    assert float(res.loss_mask[dropped].sum()) == 0.0 and float(batch.loss_mask[dropped].sum()) > 0
    # the truncation bound: some token's ratio exceeded the cap, so TIS really changed the gradient
    assert res.metrics.get("mismatch/main/tis_clipped", 0) + res.metrics.get("mismatch/denoise/tis_clipped", 0) > 0
