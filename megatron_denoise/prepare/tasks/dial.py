"""A modular word problem: a dial with m positions turned forward and back.

    A dial has 7 positions, 0 to 6. It starts at 3. It turns 5 forward. The box weighs 4
    kilograms. It turns 2 back. Where does it stop?

Positions m are drawn from [5, max_modulus], turns from [1, max_operand]; distractor sentences
carry numbers that play no part. The solution reduces after every turn:

    3+5=8, 8%7=1
    1-2=-1, -1%7=6
    \\boxed{6}
"""
from __future__ import annotations

import random

from megatron_denoise.config.schema import TaskConfig
from megatron_denoise.prepare.tasks.base import TaskProblem, boxed, distractor_sentences, steps_of


def make(rng: random.Random, s: TaskConfig) -> TaskProblem:
    steps = steps_of(rng, s)
    m = rng.randint(5, s.max_modulus)
    pos = rng.randint(0, m - 1)
    sentences = [f"A dial has {m} positions, 0 to {m - 1}.", f"It starts at {pos}."]
    turns, lines = [], []
    for _ in range(steps):
        b = rng.randint(1, s.max_operand)
        forward = rng.random() < 0.5
        raw = pos + b if forward else pos - b
        new = raw % m
        turns.append(f"It turns {b} {'forward' if forward else 'back'}.")
        lines.append(f"{pos}{'+' if forward else '-'}{b}={raw}, {raw}%{m}={new}")
        pos = new
    # distractors go between the turns (never before the set-up), at seeded places
    for d in distractor_sentences(rng, s.distractors, s.max_operand):
        turns.insert(rng.randint(0, len(turns)), d)
    question = " ".join(sentences + turns + ["Where does it stop?"])
    return TaskProblem(kind="dial", question=question, answer=pos,
                       solution="\n".join(lines + [boxed(pos)]), steps=steps)
