"""The training step's data flow, with scripted engine/policy/scorer (no processes, no models).

The fakes record what the step sends them, so these tests check the wiring of the method:
one generate call with N main + K denoise rows per problem, the verifier sees prefix +
continuation, advantages by group reach the policy, old log-probs only on the PPO path, the
engine is refitted unless the update was skipped, DAPO re-samples until B problems survive.
"""
from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from megatron_denoise.config.loader import load_config
from megatron_denoise.core.advantages import DynamicSamplingExhausted
from megatron_denoise.core.types import Completion, Problem, RowKind
from megatron_denoise.trainer.problems import ProblemStream
from megatron_denoise.trainer.step import StepContext, train_step

EOS = 1


class CharTokenizer:
    """ids = code points + 2 (0 pad, 1 EOS); no chat template: prompts are rendered by hand."""

    def encode(self, text, add_special_tokens=False):
        return [ord(c) + 2 for c in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i - 2) for i in ids if i > 1)


class ScriptedEngine:
    """Answers each row with a text chosen by `answer(request)`; records calls."""

    def __init__(self, answer):
        self.answer = answer
        self.calls = []
        self.refits = 0
        self.events = []

    def generate(self, requests, sampling):
        self.calls.append(list(requests))
        tok = CharTokenizer()
        out = []
        for r in requests:
            ids = tok.encode(self.answer(r))[: r.max_tokens - 1] + [EOS]
            out.append(Completion(token_ids=tuple(ids[: r.max_tokens]), finish_reason="stop"))
        return out

    def sleep(self, level=None):
        self.events.append(f"sleep({level})")

    def wake_up(self, tags=None):
        self.events.append(f"wake({','.join(tags) if tags else 'all'})")


class RecordingPolicy:
    def __init__(self, skipped=0.0):
        self.batches = []
        self.logprob_calls = 0
        self.skipped = skipped
        self.log = []  # shared with the engine's events by tests of the call order

    def empty_cache(self):
        self.log.append("empty_cache")

    def compute_logprobs(self, batch):
        self.logprob_calls += 1
        self.log.append("logprobs")
        return torch.zeros_like(batch.loss_mask)

    def train(self, batch, old_logprobs):
        self.log.append("train")
        self.batches.append((batch, old_logprobs))
        return {"loss": 0.5, "grad_norm": 1.0, "skipped": self.skipped, "updates": 1.0}

    def refit(self, engine):
        engine.refits += 1
        engine.events.append("refit")


class ExactScorer:
    """1 when the last \\boxed{} equals the ground truth as a string."""

    def __init__(self):
        self.texts = []

    def score_batch(self, texts, truths):
        self.texts.extend(texts)
        out = []
        for t, g in zip(texts, truths):
            i = t.rfind("\\boxed{")
            ans = t[i + 7: t.find("}", i)] if i >= 0 else None
            ok = ans is not None and ans == str(g)
            out.append(SimpleNamespace(score=1.0 if ok else 0.0, status=SimpleNamespace(value="ok" if ans else "no_box")))
        return out


def problems(n, pool=("wrong: the answer is \\boxed{7}",)):
    return [Problem(uid=f"p{i}", index=i, prompt=({"role": "user", "content": f"q{i}"},), ground_truth=str(i),
                    wrong_pool=tuple(pool)) for i in range(n)]


def make_ctx(overrides, answer, probs, policy=None):
    cfg = load_config(None, ["model.num_layers=2", "model.num_attention_heads=4", "model.num_query_groups=2",
                             "model.hidden_size=64", "model.ffn_hidden_size=128", "data.max_prompt_length=32",
                             "data.max_response_length=40", "trainer.micro_batch_tokens=128",
                             "data.problems_per_step=2", "denoise.n_main=2", "denoise.k_denoise=2",
                             "denoise.rho.value=0.5", *overrides], world_size=1)
    tok = CharTokenizer()
    stream = ProblemStream(probs, tok, seed=0, shuffle=False)
    stream.prompt_ids = lambda p: tuple(tok.encode(p.prompt[0]["content"] + ">"))
    engine = ScriptedEngine(answer)
    scorer = ExactScorer()
    policy = policy or RecordingPolicy()
    ctx = StepContext(cfg=cfg, policy=policy, engine=engine, scorer=scorer, problems=stream, tokenizer=tok,
                      prompt_ids=stream.prompt_ids, decode=lambda ids: tok.decode(ids))
    return ctx, engine, scorer, policy


def test_one_call_with_main_and_denoise_rows_and_group_advantages():
    # main rows of problem i answer correctly, denoise rows keep the wrong answer of their prefix
    def answer(r):
        return " ok" if r.kind is RowKind.DENOISE else f"so \\boxed{{{r.group_id}}}"

    ctx, engine, scorer, policy = make_ctx([], answer, problems(4))
    m = train_step(ctx, step=0)
    assert len(engine.calls) == 1 and len(engine.calls[0]) == 2 * (2 + 2)
    kinds = [r.kind for r in engine.calls[0]]
    assert kinds == [RowKind.MAIN, RowKind.MAIN, RowKind.DENOISE, RowKind.DENOISE] * 2
    # |w| = 31 chars -> p = floor(0.5 * 31) = 15; cutdown budget R - p = 25
    den = [r for r in engine.calls[0] if r.kind is RowKind.DENOISE]
    assert all(r.prefix_length == 15 and r.max_tokens == 40 - 15 for r in den)
    # the verifier saw prefix + continuation
    assert scorer.texts[2] == "wrong: the answer is \\boxed{7}"[:15] + " ok"
    assert m["main_accuracy"] == 1.0 and m["recovery_rate"] == 0.0
    # rewards per group [1, 1, 0, 0]: mean 0.5, unbiased std sqrt(1/3) -> A = +-0.5/0.57735 = +-0.8660
    batch, old = policy.batches[0]
    a = 0.5 / (1 / 3) ** 0.5
    assert torch.allclose(batch.row_advantages, torch.tensor([a, a, -a, -a] * 2), atol=1e-4)
    assert old is None and policy.logprob_calls == 0  # force_on_policy: no old log-probs
    # cutdown: the prefix tokens of denoise rows carry no loss
    start = int(batch.response_start[2])
    assert batch.loss_mask[2, start:start + 15].sum() == 0 and batch.loss_mask[2, start + 15] == 1
    assert engine.events == ["sleep(2)", "wake(weights)", "refit", "wake(kv_cache)"]
    for k in ("time/generate", "time/reward", "time/train", "time/refit", "time/step"):
        assert m[k] >= 0.0
    assert m["step"] == 1.0 and m["fallbacks"] == 0.0


def test_k0_is_plain_grpo_and_ppo_path_recomputes_old_logprobs():
    ctx, engine, _, policy = make_ctx(["denoise.k_denoise=0", "algorithm.force_on_policy=false"],
                                      lambda r: "\\boxed{0}", problems(2))
    m = train_step(ctx, step=0)
    assert all(r.kind is RowKind.MAIN for r in engine.calls[0]) and len(engine.calls[0]) == 4
    assert policy.logprob_calls == 1 and policy.batches[0][1] is not None
    assert m["rows"] == 4.0


def test_empty_pool_falls_back_and_is_counted():
    ctx, engine, _, _ = make_ctx([], lambda r: "x", problems(2, pool=()))
    m = train_step(ctx, step=0)
    assert [r.kind for r in engine.calls[0]].count(RowKind.FALLBACK) == 4
    assert m["fallbacks"] == 4.0 and m["problems_without_pool"] == 2.0


def test_skipped_update_does_not_refit():
    # level-1 sleep keeps the engine's weights (in host memory): nothing to refit
    ctx, engine, _, _ = make_ctx(["rollout.sleep_level=1"], lambda r: "x", problems(2),
                                 policy=RecordingPolicy(skipped=1.0))
    train_step(ctx, step=0)
    assert engine.refits == 0
    # level 2 dropped them: the engine is refitted with the (unchanged) policy weights
    ctx, engine, _, _ = make_ctx(["rollout.sleep_level=2"], lambda r: "x", problems(2),
                                 policy=RecordingPolicy(skipped=1.0))
    train_step(ctx, step=0)
    assert engine.refits == 1


class OrderedEngine(ScriptedEngine):
    def generate(self, requests, sampling):
        self.events.append("generate")
        return super().generate(requests, sampling)


@pytest.mark.parametrize("level", [2, 1, 0])
def test_gpu_memory_choreography_call_order_per_step(level):
    """generate -> sleep -> old log-probs -> train -> empty_cache -> wake weights -> refit -> wake KV
    cache, each step (the PPO path computes old log-probs; level 0 never sleeps)."""
    policy = RecordingPolicy()
    ctx, engine, _, _ = make_ctx([f"rollout.sleep_level={level}", "algorithm.force_on_policy=false"],
                                 lambda r: "x", problems(4), policy=policy)
    ctx.engine = engine = OrderedEngine(lambda r: "x")
    policy.log = engine.events
    for step in range(2):
        m = train_step(ctx, step=step)
    one = (["generate", f"sleep({level})", "logprobs", "train", "empty_cache", "wake(weights)", "refit",
            "wake(kv_cache)"] if level else ["generate", "logprobs", "train", "empty_cache", "refit"])
    assert engine.events == one * 2
    assert ("time/sleep" in m) == bool(level) and ("time/wake" in m) == bool(level)
    # colocate false: the engine is never put to sleep
    policy = RecordingPolicy()
    ctx, engine, _, _ = make_ctx(["rollout.colocate=false"], lambda r: "x", problems(2), policy=policy)
    policy.log = engine.events
    train_step(ctx, step=0)
    assert engine.events == ["train", "refit"]


def test_dapo_resamples_until_b_problems_survive_and_gives_up():
    # problem i is mixed (some right, some wrong) only when i is odd
    def answer(r):
        i = int(r.problem_uid[1:])
        return f"\\boxed{{{i}}}" if (r.slot == 0 or i % 2 == 0) else "no"

    over = ["algorithm.name=dapo", "algorithm.dynamic_sampling.enabled=true",
            "algorithm.dynamic_sampling.max_gen_batches=3"]
    ctx, engine, _, policy = make_ctx(over, answer, problems(8))
    m = train_step(ctx, step=0)
    # batches of 2: (p0 all-right, p1 mixed), (p2 all-right, p3 mixed) -> 2 survivors after 2 batches
    assert len(engine.calls) == 2 and m["dapo/kept"] == 2.0 and m["dapo/dropped_all_correct"] == 2.0
    assert policy.batches[0][0].num_rows == 2 * 4

    ctx, *_ = make_ctx(over, lambda r: "no", problems(8))
    with pytest.raises(DynamicSamplingExhausted, match="max_gen_batches=3"):
        train_step(ctx, step=0)


def test_problem_stream_resume_repeats_nothing_and_skips_nothing():
    tok = CharTokenizer()
    full = ProblemStream(problems(5), tok, seed=3, shuffle=True)
    seq = [p.uid for _ in range(4) for p in full.next_problems(3)]
    a = ProblemStream(problems(5), tok, seed=3, shuffle=True)
    first = [p.uid for _ in range(2) for p in a.next_problems(3)]
    b = ProblemStream(problems(5), tok, seed=3, shuffle=True)
    b.load_state_dict(a.state_dict())
    second = [p.uid for _ in range(2) for p in b.next_problems(3)]
    assert first + second == seq
    assert sorted(seq[:5]) == [f"p{i}" for i in range(5)]  # one epoch visits every problem once


class LogprobEngine(ScriptedEngine):
    """Also returns a sampling log-prob per generated token (-0.1 x its position)."""

    def generate(self, requests, sampling):
        out = super().generate(requests, sampling)
        return [dataclasses.replace(c, logprobs=tuple(-0.1 * (i + 1) for i in range(len(c.token_ids)))) for c in out]


class TrainLogprobPolicy(RecordingPolicy):
    """The actor's log-probs are a fixed function of the tokens (-0.01 x id), whether a separate
    forward (compute_logprobs) or the update's own forward (train(return_logprobs=True)) computes them."""

    trains_with_logprobs = True

    @staticmethod
    def _lp(batch):
        return -0.01 * batch.input_ids.float() * (batch.loss_mask > 0)

    def compute_logprobs(self, batch):
        super().compute_logprobs(batch)
        return self._lp(batch)

    def train(self, batch, old_logprobs, return_logprobs=False, **extra):
        m = super().train(batch, old_logprobs)
        return (m, self._lp(batch)) if return_logprobs else m


@pytest.mark.parametrize("extra", [[], ["algorithm.mismatch.tis_cap=2.0"], ["algorithm.force_on_policy=false"]])
def test_mismatch_metrics_from_the_update_forward_equal_the_separate_forward(extra):
    """trainer.logprobs_from_train: with force_on_policy, one update and metrics only, the mismatch
    metrics come from the update's own forward (no old-log-prob phase) and equal the separate
    forward's; a correction (tis_cap) or the PPO path still runs the separate forward first."""
    answer = lambda r: f"so \\boxed{{{r.group_id}}}"  # noqa: E731
    out = {}
    for on in (True, False):
        ctx, engine, _, policy = make_ctx(["algorithm.mismatch.metrics=true", f"trainer.logprobs_from_train={str(on).lower()}",
                                           *extra], answer, problems(2), policy=TrainLogprobPolicy())
        ctx.engine = LogprobEngine(answer)
        m = train_step(ctx, step=0)
        out[on] = (m, policy.logprob_calls, "time/old_logprob" in m)
    keys = [k for k in out[False][0] if k.startswith("mismatch/")]
    assert keys and all(out[True][0][k] == out[False][0][k] for k in keys)
    assert out[False][1] == 1 and out[False][2]
    fused = not extra
    assert out[True][1] == (0 if fused else 1) and out[True][2] == (not fused)
