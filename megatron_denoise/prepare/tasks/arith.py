"""Multi-step arithmetic with carries: `Compute 47+38-19+6.`

Operands are drawn from [1, max_operand] (the first from [0, max_operand]); each step adds or
subtracts one operand, subtracting only when the running value stays >= 0, so every intermediate
result is a non-negative integer and carries/borrows happen naturally. Distractors are numbers
listed as "not used" before the expression. The solution writes one line per step:

    47+38=85
    85-19=66
    66+6=72
    \\boxed{72}
"""
from __future__ import annotations

import random

from megatron_denoise.config.schema import TaskConfig
from megatron_denoise.prepare.tasks.base import TaskProblem, boxed, steps_of


def make(rng: random.Random, s: TaskConfig) -> TaskProblem:
    steps = steps_of(rng, s)
    value = rng.randint(0, s.max_operand)
    expr = str(value)
    lines = []
    for _ in range(steps):
        b = rng.randint(1, s.max_operand)
        op = "-" if (rng.random() < 0.5 and value - b >= 0) else "+"
        new = value + b if op == "+" else value - b
        lines.append(f"{value}{op}{b}={new}")
        expr += f"{op}{b}"
        value = new
    ignore = [rng.randint(1, s.max_operand) for _ in range(s.distractors)]
    question = (f"Ignore {', '.join(map(str, ignore))}. " if ignore else "") + f"Compute {expr}."
    return TaskProblem(kind="arith", question=question, answer=value,
                       solution="\n".join(lines + [boxed(value)]), steps=steps)
