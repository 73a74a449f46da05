"""What every synthetic task kind produces: a problem text, its integer answer, and a step-by-step
solution that ends in `\\boxed{answer}` (the supervised warm-start's target).

A kind is a pure function `make(rng, settings) -> TaskProblem`; all randomness comes from the
`random.Random` it is given, so a seed fixes every problem (see `tasks.generate`).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

from megatron_denoise.config.schema import TaskConfig


@dataclass(frozen=True)
class TaskProblem:
    kind: str        # the task kind that made it (arith | dial)
    question: str    # the problem text the user message carries (before the prompt's suffix)
    answer: int      # the verifier's ground truth
    solution: str    # one line per reasoning step, then \boxed{answer}
    steps: int       # reasoning steps (the difficulty knob the report buckets by)

    @property
    def bucket(self) -> str:
        return f"steps={self.steps}"


TaskMaker = Callable[[random.Random, TaskConfig], TaskProblem]


def boxed(answer: int) -> str:
    return "\\boxed{" + str(answer) + "}"


def steps_of(rng: random.Random, s: TaskConfig) -> int:
    return rng.randint(s.min_steps, s.max_steps)


# Sentences that carry numbers the solution must NOT use (distractors); {n} is filled at random.
DISTRACTORS = (
    "It is {n} degrees outside.",
    "There are {n} birds on the roof.",
    "The page number is {n}.",
    "A bus leaves at {n} o'clock.",
    "The box weighs {n} kilograms.",
    "Room {n} is on the left.",
)


def distractor_sentences(rng: random.Random, count: int, max_value: int) -> list[str]:
    picks = rng.sample(range(len(DISTRACTORS)), k=min(count, len(DISTRACTORS)))
    return [DISTRACTORS[i].format(n=rng.randint(1, max_value)) for i in picks]
