"""The synthetic task generator: solutions that are right step by step, determinism, distinct and
disjoint problems, the knobs, and clear errors. Pure: no engine, no process."""
from __future__ import annotations

import re

import pytest

from megatron_denoise.config.schema import PromptConfig, TaskConfig
from megatron_denoise.prepare.tasks import TESTBED_PROMPT, check, generate, questions_of, to_table, write_task_file
from megatron_denoise.reward.boxed import last_boxed
from megatron_denoise.reward.judge import judge


def _lines(p):
    *steps, last = p.solution.split("\n")
    return steps, last


def test_arith_solutions_are_right_line_by_line_and_match_the_expression():
    for p in generate(TaskConfig(kind="arith", seed=3, count=300, min_steps=1, max_steps=5, max_operand=99)):
        steps, last = _lines(p)
        assert len(steps) == p.steps and p.bucket == f"steps={p.steps}"
        expr = re.fullmatch(r"Compute ([0-9+\-]+)\.", p.question).group(1)
        value = None
        for line in steps:
            a, op, b, c = re.fullmatch(r"(\d+)([+-])(\d+)=(\d+)", line).groups()
            a, b, c = int(a), int(b), int(c)
            assert value is None or a == value          # each step starts from the previous result
            assert c == (a + b if op == "+" else a - b) and c >= 0
            value = c
        assert value == p.answer == eval(expr)  # noqa: S307 - digits and +/- only (matched above)
        assert last == "\\boxed{%d}" % p.answer and last_boxed(p.solution) == str(p.answer)


def test_dial_solutions_reduce_modulo_the_dial_and_ignore_distractors():
    ps = generate(TaskConfig(kind="dial", seed=4, count=200, max_operand=30, max_modulus=9, distractors=2))
    for p in ps:
        m = int(re.match(r"A dial has (\d+) positions, 0 to (\d+)\.", p.question).group(1))
        pos = int(re.search(r"It starts at (\d+)\.", p.question).group(1))
        turns = [(int(n), d) for n, d in re.findall(r"It turns (\d+) (forward|back)\.", p.question)]
        assert len(turns) == p.steps and 5 <= m <= 9
        for n, d in turns:  # hand-derived walk of the dial, independent of the generator
            pos = (pos + n) % m if d == "forward" else (pos - n) % m
        assert pos == p.answer and _lines(p)[1] == "\\boxed{%d}" % pos
        # two distractor sentences (numbers that take no part): set-up 2 + turns + 2, then the question
        assert p.question.count(".") == 2 + p.steps + 2 and p.question.endswith("Where does it stop?")


def test_the_projects_verifier_accepts_every_solution_as_written():
    ps = generate(TaskConfig(kind="mix", seed=5, count=40))
    assert {p.kind for p in ps} == {"arith", "dial"}
    for p in ps:
        assert judge(last_boxed(p.solution), [str(p.answer)])[0] == 1.0, p
        assert judge(last_boxed(p.solution), [str(p.answer + 1)])[0] == 0.0, p


def test_same_settings_same_problems_other_seed_disjoint_and_exclude_respected():
    s = TaskConfig(kind="arith", seed=7, count=500, max_operand=9)
    a, b = generate(s), generate(s)
    assert a == b and len({p.question for p in a}) == 500
    other = generate(TaskConfig(kind="arith", seed=8, count=500, max_operand=9), exclude={p.question for p in a})
    assert not {p.question for p in a} & {p.question for p in other}


def test_task_file_schema_and_exclude_by_file(tmp_path):
    train = tmp_path / "train.parquet"
    write_task_file(train, TaskConfig(seed=1, count=50), TESTBED_PROMPT)
    held = tmp_path / "held.jsonl"
    write_task_file(held, TaskConfig(seed=1, count=20), TESTBED_PROMPT, split="heldout", exclude_files=[train])
    assert not questions_of([train]) & questions_of([held])
    from megatron_denoise.data import load_problems
    from megatron_denoise.config.schema import DataConfig

    problems, report = load_problems([str(train)], DataConfig(), tokenizer=None)
    assert len(problems) == 50 and not report.bad_rows
    row = to_table(generate(TaskConfig(seed=1, count=1)), PromptConfig(system="sys", user_suffix=" X"), "train").to_pylist()[0]
    assert row["prompt"] == [{"content": "sys", "role": "system"},
                             {"content": row["extra_info"]["question"] + " X", "role": "user"}]
    assert row["reward_model"]["ground_truth"] == last_boxed(row["extra_info"]["solution"])


def test_bad_settings_are_reported_all_at_once_by_key():
    errs = check(TaskConfig(count=0, min_steps=3, max_steps=2, max_operand=0, max_modulus=4, distractors=-1), "prepare.task.train")
    assert [e.split(" ")[0] for e in errs] == ["prepare.task.train.count", "prepare.task.train.max_steps",
                                               "prepare.task.train.max_operand", "prepare.task.train.max_modulus",
                                               "prepare.task.train.distractors"]
    with pytest.raises(ValueError, match="only 3 distinct problems of 11"):
        # one step, first operand 0..1, second 1: 0+1, 1+1, 1-1 are the only problems
        generate(TaskConfig(kind="arith", seed=0, count=11, min_steps=1, max_steps=1, max_operand=1))


def test_boxed_fraction_unboxes_some_answers_and_changes_nothing_else():
    boxed_all = generate(TaskConfig(kind="mix", seed=3, count=400))
    part = generate(TaskConfig(kind="mix", seed=3, count=400, boxed_fraction=0.25))
    assert [(p.question, p.answer, p.steps) for p in part] == [(p.question, p.answer, p.steps) for p in boxed_all]
    unboxed = 0
    for p, q in zip(part, boxed_all):
        steps, last = _lines(p)
        assert steps == _lines(q)[0]                       # the reasoning lines are untouched
        if last == q.solution.split("\n")[-1]:
            assert judge(last_boxed(p.solution), [str(p.answer)])[0] == 1.0
        else:
            unboxed += 1
            assert last == f"The answer is {p.answer}." and last_boxed(p.solution) is None  # the verifier scores 0
    assert 0.70 < unboxed / 400 < 0.80                     # 75% unboxed, within sampling noise at n=400
    assert generate(TaskConfig(kind="mix", seed=3, count=400, boxed_fraction=0.25)) == part
    assert check(TaskConfig(boxed_fraction=1.5), "t") == ["t.boxed_fraction (1.5) must be in [0, 1]"]
