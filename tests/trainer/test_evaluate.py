"""AVG@k evaluation (trainer/evaluate.py): the pure aggregation with hand-derived values, and the
end-to-end path (prompt rendering -> engine -> decode -> verifier pool -> tables) with a fake
engine that returns canned token ids."""
from __future__ import annotations

import json
import math

import pytest

from megatron_denoise.config.schema import EvalConfig
from megatron_denoise.core.types import Completion, Problem
from megatron_denoise.trainer.evaluate import EvalResult, SetResult, avg_at_k, evaluate, k_for_set, pass_at_k


def test_avg_and_pass_at_k_hand_values():
    scores = [[1, 0, 1, 1], [0, 0, 0, 0], [1, 1, 1, 1]]
    # per problem: 3/4, 0, 1  -> (0.75 + 0 + 1) / 3
    assert avg_at_k(scores) == pytest.approx(1.75 / 3)
    assert pass_at_k(scores) == pytest.approx(2 / 3)
    # AVG@1 is plain accuracy
    assert avg_at_k([[1], [0], [1], [1]]) == 0.75 and pass_at_k([[1], [0], [1], [1]]) == 0.75
    assert avg_at_k([[1, 0], [1, 1]]) == pytest.approx(3 / 4)
    with pytest.raises(ValueError, match="problem 1 has 1 samples, expected 2"):
        avg_at_k([[1, 0], [1]])
    with pytest.raises(ValueError, match="no problems"):
        avg_at_k([])
    with pytest.raises(ValueError, match="problem 0 sample 1 has score 2"):
        pass_at_k([[1, 2]])


def _set(name, avg, n):
    return SetResult(name=name, k=1, num_problems=n, avg_at_k=avg, pass_at_k=avg, per_problem=[avg] * n,
                     mean_response_tokens=10.0, truncated_fraction=0.0, status_counts={"ok": n})


def test_overall_is_mean_of_sets_and_micro_weights_problems():
    from megatron_denoise.trainer.evaluate import _macro_micro

    sets = {"aime": _set("aime", 0.5, 2), "math": _set("math", 1.0, 6)}
    macro, micro = _macro_micro(sets)
    assert macro == pytest.approx(0.75) and micro == pytest.approx((1 + 6) / 8)


def test_k_per_set():
    cfg = EvalConfig()
    assert k_for_set(cfg, "aime24") == 16 and k_for_set(cfg, "math500") == 1
    assert k_for_set(cfg, "gsm8k") == 1 and k_for_set(cfg, "aime24", override=4) == 4
    with pytest.raises(ValueError, match=r"eval.k\['x'\]"):
        k_for_set(EvalConfig(k={"x": 0}), "x")


# ---------------------------------------------------------------------------------------------
# end to end with a fake engine (real tokenizer, real chat template, real verifier pool)
# ---------------------------------------------------------------------------------------------

SUFFIX = "\n\nPlease reason step by step, and put your final answer within \\boxed{}."


def _problem(uid, text, gt):
    prompt = ({"role": "system", "content": "you are a helpful assistant."},
              {"role": "user", "content": text + SUFFIX})
    return Problem(uid=uid, index=0, prompt=prompt, ground_truth=gt)


class CannedEngine:
    """Answers by (problem uid, sample index) from a table; records what it was asked."""

    def __init__(self, tokenizer, answers, max_model_len=None):
        self.tok, self.answers, self.max_model_len = tokenizer, answers, max_model_len
        self.calls = []

    def generate(self, requests, sampling):
        self.calls.append((list(requests), sampling))
        out = []
        for r in requests:
            text, finish = self.answers[r.problem_uid][r.slot]
            ids = tuple(self.tok.encode(text, add_special_tokens=False))
            if finish == "stop":
                ids += (self.tok.eos_token_id,)
            out.append(Completion(token_ids=ids[: r.max_tokens], finish_reason=finish))
        return out


@pytest.fixture(scope="module")
def pool():
    from megatron_denoise.reward import VerifierPool

    with VerifierPool(num_workers=1, deadline_s=10.0) as p:
        yield p


def test_evaluate_end_to_end_with_canned_engine(pool, tmp_path):
    from megatron_denoise.core.prefix import render_prompt_ids
    from megatron_denoise.prepare.models import byte_tokenizer

    tok = byte_tokenizer()
    R, max_model_len = 64, 400
    ok, wrong = ("So \\boxed{42}.", "stop"), ("So \\boxed{41}.", "stop")
    sets = {
        # k = 4: a -> 2/4, b -> 4/4 (0.5 == 1/2 by math equivalence), c -> 0 (no box, one truncated)
        "aime24": [_problem("a", "What is 6*7?", "42"), _problem("b", "Half of one?", "\\frac{1}{2}"),
                   _problem("c", "Say nothing.", "3")],
        # k = 1 (from eval.k): d, f, g right; e's prompt leaves no room under max_model_len
        "math500": [_problem("d", "7?", "7"), _problem("e", "x" * 400, "1"),
                    _problem("f", "8?", "8"), _problem("g", "y" * 250 + " 9?", "9")],
    }
    answers = {
        "a": [ok, wrong, ok, wrong],
        "b": [("It is \\boxed{0.5}", "stop")] * 4,
        "c": [("I will not answer", "stop")] * 3 + [("I will not answer and then I keep going on and on", "length")],
        "d": [("The answer is \\boxed{7}", "stop")],
        "f": [("\\boxed{8}", "stop")],
        "g": [("\\boxed{9}", "stop")],
    }
    engine = CannedEngine(tok, answers, max_model_len=max_model_len)
    cfg = EvalConfig(sets=["aime24", "math500"], k={"aime24": 4, "math500": 1})
    res = evaluate(engine, tok, sets, cfg, scorer=pool, max_tokens=R, seed=5, keep_samples=True)

    # hand-derived: aime24 = (2/4 + 1 + 0) / 3, pass = 2/3; math500 = 3/4 (e scores 0)
    a, m = res.sets["aime24"], res.sets["math500"]
    assert a.k == 4 and a.avg_at_k == pytest.approx(0.5) and a.pass_at_k == pytest.approx(2 / 3)
    assert a.per_problem == [0.5, 1.0, 0.0]
    assert a.status_counts == {"ok": 8, "no_box": 4} and a.truncated_fraction == pytest.approx(1 / 12)
    assert m.k == 1 and m.avg_at_k == pytest.approx(0.75) and m.per_problem == [1.0, 0.0, 1.0, 1.0]
    assert m.prompt_too_long == 1 and m.status_counts == {"ok": 3, "prompt_too_long": 1}
    assert res.overall == pytest.approx((0.5 + 0.75) / 2)
    assert res.overall_micro == pytest.approx((0.5 * 3 + 0.75 * 4) / 7)

    # what the engine was asked: one call per set, temperature 0.6 / top_p 0.95, rendered prompts,
    # budget R (cut to fit max_model_len for g), distinct deterministic seeds
    assert len(engine.calls) == 2
    (reqs_a, samp_a), (reqs_m, _) = engine.calls
    assert samp_a.temperature == 0.6 and samp_a.top_p == 0.95
    assert [(r.problem_uid, r.slot) for r in reqs_a] == [(u, j) for u in "abc" for j in range(4)]
    assert [r.problem_uid for r in reqs_m] == ["d", "f", "g"]
    for r in reqs_a + reqs_m:
        p = next(p for s in sets.values() for p in s if p.uid == r.problem_uid)
        assert r.prompt_ids == render_prompt_ids(tok, p.prompt) and r.prefix is None
        assert r.max_tokens == min(R, max_model_len - len(r.prompt_ids))
    g_req = reqs_m[-1]
    assert g_req.max_tokens < R and m.capped == 1
    assert len({r.seed for r in reqs_a}) == 12
    engine2 = CannedEngine(tok, answers, max_model_len=max_model_len)
    evaluate(engine2, tok, sets, cfg, scorer=pool, max_tokens=R, seed=5)
    assert [r.seed for r in engine2.calls[0][0]] == [r.seed for r in reqs_a]  # same seeds each validation

    # the verifier saw the decoded continuation, special tokens skipped
    s0 = a.samples[0]
    assert s0["text"] == "So \\boxed{42}." and s0["answer"] == "42" and s0["score"] == 1.0

    # outputs: flat metrics for the logger, JSON, markdown
    mt = res.metrics()
    assert mt["val/aime24/avg@4"] == pytest.approx(0.5) and mt["val/math500/avg@1"] == pytest.approx(0.75)
    assert mt["val/overall"] == pytest.approx(0.625) and "time/eval" in mt
    d = json.loads(json.dumps(res.to_dict()))
    assert d["sets"]["aime24"]["avg_at_k"] == pytest.approx(0.5) and "samples" not in d["sets"]["aime24"]
    assert d["settings"]["k"] == {"aime24": 4, "math500": 1}
    table = res.markdown()
    assert "| aime24 | 3 | 4 | 50.0 | 66.7 |" in table and "| math500 | 4 | 1 | 75.0 | 75.0 |" in table
    assert table.splitlines()[3].endswith("| 1 |")  # math500: one prompt too long
    assert "62.5" in table.splitlines()[-1]
    empty = SetResult(name="x", k=1, num_problems=1, avg_at_k=0.0, pass_at_k=0.0, per_problem=[0.0],
                      mean_response_tokens=math.nan, truncated_fraction=math.nan, status_counts={},
                      prompt_too_long=1)
    only_long = EvalResult({"x": empty}, 0.0, 0.0)
    assert "| x | 1 | 1 | 0.0 | 0.0 | - | - | 1 |" in only_long.markdown()
    assert json.loads(json.dumps(only_long.to_dict(), allow_nan=False))["sets"]["x"]["mean_response_tokens"] is None

    # k override and max_problems
    cfg2 = EvalConfig(k={"aime24": 4}, max_problems=2)
    res2 = evaluate(CannedEngine(tok, answers), tok, {"aime24": sets["aime24"]}, cfg2, scorer=pool,
                    max_tokens=R, k=1)
    assert res2.sets["aime24"].k == 1 and res2.sets["aime24"].per_problem == [1.0, 1.0]


def test_evaluate_rejects_empty_set(pool):
    from megatron_denoise.prepare.models import byte_tokenizer

    tok = byte_tokenizer()
    with pytest.raises(ValueError, match="'aime25' has no problems"):
        evaluate(CannedEngine(tok, {}), tok, {"aime25": []}, EvalConfig(), scorer=pool, max_tokens=8)


# ---------------------------------------------------------------------------------------------
# the command: named sets from the data layer, a real (transformers) engine on a tiny model
# ---------------------------------------------------------------------------------------------

def test_evaluate_command_on_tiny_model(tmp_path, capsys):
    from megatron_denoise.data import load_eval_set
    from megatron_denoise.launch.evaluate import main
    from megatron_denoise.prepare.models import tiny_random_model

    model = tiny_random_model("llama", tokenizer="bytes")
    out = tmp_path / "eval"
    rc = main(["--model", model, "--sets", "math500", "aime24", "--k", "2", "--engine", "hf",
               "--max-tokens", "6", "--max-problems", "2", "--temperature", "0.7", "--workers", "1",
               "--output", str(out), "--save-samples"])
    assert rc == 0
    stdout = capsys.readouterr().out
    assert "| math500 | 2 | 2 |" in stdout and "| aime24 | 2 | 2 |" in stdout
    res = json.loads((out / "eval_results.json").read_text())
    assert res["model"] == model and set(res["sets"]) == {"math500", "aime24"}
    assert res["settings"]["temperature"] == 0.7 and res["settings"]["top_p"] == 0.95
    assert res["settings"]["max_tokens"] == 6 and res["settings"]["k"] == {"math500": 2, "aime24": 2}
    assert (out / "eval_results.md").read_text().strip() == res_table(stdout)

    samples = [json.loads(l) for l in (out / "eval_samples.jsonl").read_text().splitlines()]
    assert len(samples) == 8  # 2 sets x 2 problems x k = 2
    truths = {s: [p.ground_truth for p in load_eval_set(s, max_problems=2)] for s in ("math500", "aime24")}
    for name, r in res["sets"].items():
        mine = [s for s in samples if s["set"] == name]
        assert [s["ground_truth"] for s in mine[::2]] == truths[name]
        assert all(1 <= s["tokens"] <= 6 for s in mine)
        assert r["truncated_fraction"] == sum(s["finish_reason"] == "length" for s in mine) / 4
        # the JSON's per-problem means and AVG@k are the sample scores' means
        per = [(mine[2 * i]["score"] + mine[2 * i + 1]["score"]) / 2 for i in range(2)]
        assert r["per_problem"] == per and r["avg_at_k"] == pytest.approx(sum(per) / 2)

    # a folder that is not a model is refused with a clear message
    assert main(["--model", str(tmp_path), "--sets", "math500"]) == 2
    assert "not a Hugging Face model folder" in capsys.readouterr().err


def res_table(stdout: str) -> str:
    lines = stdout.splitlines()
    start = next(i for i, l in enumerate(lines) if l.startswith("| set |"))
    end = next(i for i in range(start, len(lines)) if not lines[i].startswith("|"))
    return "\n".join(lines[start:end])
