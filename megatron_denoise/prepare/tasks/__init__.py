"""Synthetic verifiable reasoning tasks: the science testbed's data.

    problems = generate(TaskConfig(kind="arith", seed=1, count=4000), exclude=questions_of(["heldout.parquet"]))
    table = to_table(problems, PromptConfig(...), split="train")     # the reference parquet schema

Every problem has an integer answer (the verifier's ground truth, judged by the project's verifier
unchanged) and a step-by-step solution ending in `\\boxed{answer}` (`extra_info.solution`, the
supervised warm-start's target). Same settings and seed give the same problems in the same order
(and `write_task_file` a byte-identical file); problems are distinct within a file and from every
excluded file (compared by question text). Pure: no engine, no torch.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Iterable, Optional, Sequence

from megatron_denoise.config.schema import PromptConfig, TaskConfig, TaskKind
from megatron_denoise.prepare.tasks import arith, dial
from megatron_denoise.prepare.tasks.base import DISTRACTORS, TaskMaker, TaskProblem, boxed

MAKERS: dict[str, TaskMaker] = {TaskKind.ARITH.value: arith.make, TaskKind.DIAL.value: dial.make}
DATA_SOURCE = "synthetic/{kind}"
# Problems the generator may draw before it gives up finding new distinct ones (per problem wanted)
_TRIES_PER_PROBLEM = 50

# The testbed's prompt: the question alone (no system message, no suffix). Every token of a prompt
# costs generation and training time with a byte-level tokenizer, and the warm-start teaches the
# answer format, so no instruction is needed. Runs that train on task files use the same template.
TESTBED_PROMPT = PromptConfig(system=None, user_suffix="", apply_chat_template=True)

__all__ = ["TaskProblem", "TESTBED_PROMPT", "check", "generate", "to_table", "questions_of", "write_task_file"]


def check(s: TaskConfig, key: str = "task") -> list[str]:
    """Every problem with the settings, each naming its key."""
    errors = []
    if s.kind not in (*MAKERS, TaskKind.MIX.value):
        errors.append(f"{key}.kind: {s.kind!r} is not one of {TaskKind.values()}")
    if s.count < 1:
        errors.append(f"{key}.count ({s.count}) must be >= 1")
    if s.min_steps < 1:
        errors.append(f"{key}.min_steps ({s.min_steps}) must be >= 1")
    if s.max_steps < s.min_steps:
        errors.append(f"{key}.max_steps ({s.max_steps}) must be >= {key}.min_steps ({s.min_steps})")
    if s.max_operand < 1:
        errors.append(f"{key}.max_operand ({s.max_operand}) must be >= 1")
    if s.max_modulus < 5:
        errors.append(f"{key}.max_modulus ({s.max_modulus}) must be >= 5")
    if not 0.0 <= s.boxed_fraction <= 1.0:
        errors.append(f"{key}.boxed_fraction ({s.boxed_fraction}) must be in [0, 1]")
    if s.distractors < 0:
        errors.append(f"{key}.distractors ({s.distractors}) must be >= 0")
    if s.kind != TaskKind.ARITH.value and s.distractors > len(DISTRACTORS):
        errors.append(f"{key}.distractors ({s.distractors}) must be <= {len(DISTRACTORS)} for the dial kind "
                      f"(distinct distractor sentences)")
    return errors


def generate(s: TaskConfig, exclude: Iterable[str] = (), key: str = "task") -> list[TaskProblem]:
    """`s.count` distinct problems (none of whose questions is in `exclude`), seeded by `s.seed`.
    `key` names the settings in errors (e.g. prepare.task.heldout)."""
    errors = check(s, key)
    if errors:
        raise ValueError("; ".join(errors))
    rng = random.Random(f"megatron-denoise-task/{s.seed}")
    kinds = sorted(MAKERS) if s.kind == TaskKind.MIX.value else [s.kind]
    seen = set(exclude)
    out: list[TaskProblem] = []
    for _ in range(s.count * _TRIES_PER_PROBLEM):
        if len(out) == s.count:
            return unbox(out, s)
        kind = kinds[0] if len(kinds) == 1 else rng.choice(kinds)
        p = MAKERS[kind](rng, s)
        if p.question not in seen:
            seen.add(p.question)
            out.append(p)
    if len(out) < s.count:
        raise ValueError(f"{key}: only {len(out)} distinct problems of {s.count} found with these settings "
                         f"(kind={s.kind}, steps {s.min_steps}-{s.max_steps}, max_operand {s.max_operand}); "
                         f"widen the ranges or ask for fewer")
    return unbox(out, s)


def unbox(problems: list[TaskProblem], s: TaskConfig) -> list[TaskProblem]:
    """All but `s.boxed_fraction` of the solutions end in 'The answer is N.' instead of the box.
    Its own random stream (seeded by `s.seed`), so the problems themselves do not change, and at the
    default 1.0 nothing is drawn: files stay byte-identical to those made before the knob existed."""
    if s.boxed_fraction >= 1.0:
        return problems
    from dataclasses import replace

    rng = random.Random(f"megatron-denoise-task-format/{s.seed}")
    out = []
    for p in problems:
        if rng.random() >= s.boxed_fraction:
            head, last = p.solution.rsplit("\n", 1) if "\n" in p.solution else ("", p.solution)
            assert last == boxed(p.answer), p.solution
            p = replace(p, solution=(head + "\n" if head else "") + f"The answer is {p.answer}.")
        out.append(p)
    return out


def to_table(problems: Sequence[TaskProblem], prompt: PromptConfig, split: str, seed: int = 0):
    """The reference parquet schema: chat `prompt`, `reward_model.ground_truth`, and `extra_info`
    with the question, the step-by-step solution, the kind and the difficulty bucket."""
    from megatron_denoise.data.schema import make_row, rows_to_table

    rows = [make_row(p.question, str(p.answer), DATA_SOURCE.format(kind=p.kind),
                     {"split": split, "index": i, "kind": p.kind, "steps": p.steps, "bucket": p.bucket,
                      "question": p.question, "solution": p.solution, "seed": seed}, prompt)
            for i, p in enumerate(problems)]
    return rows_to_table(rows)


def questions_of(paths: Iterable[str | Path]) -> set[str]:
    """Question texts of task files (`extra_info.question`), for --exclude."""
    from megatron_denoise.data.io import read_table

    out: set[str] = set()
    for path in paths:
        table = read_table(path)
        if "extra_info" not in table.column_names:
            raise ValueError(f"{path}: no extra_info column: not a task file (exclude needs extra_info.question)")
        for i, info in enumerate(table.column("extra_info").to_pylist()):
            q = (info or {}).get("question")
            if not isinstance(q, str):
                raise ValueError(f"{path} row {i}: extra_info.question is missing: not a task file")
            out.add(q)
    return out


def write_task_file(path: str | Path, s: TaskConfig, prompt: PromptConfig = TESTBED_PROMPT, split: str = "train",
                    exclude_files: Sequence[str | Path] = (), key: str = "task") -> list[TaskProblem]:
    """Generate and write one task file (parquet or JSONL by extension), atomically."""
    import json

    from megatron_denoise.data.io import write_table

    problems = generate(s, exclude=questions_of(exclude_files), key=key)
    table = to_table(problems, prompt, split, seed=s.seed)
    path = Path(path)
    if path.suffix == ".parquet":
        write_table(table, path)
    elif path.suffix == ".jsonl":
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in table.to_pylist()))
        tmp.replace(path)
    else:
        raise ValueError(f"{path}: unsupported extension {path.suffix!r} (use .parquet or .jsonl)")
    return problems


def difficulty_buckets(table) -> Optional[list[str]]:
    """Per-row difficulty bucket of a task file (None when the file is not a task file)."""
    if "extra_info" not in table.column_names:
        return None
    infos = table.column("extra_info").to_pylist()
    buckets = [(i or {}).get("bucket") for i in infos]
    return buckets if all(isinstance(b, str) for b in buckets) else None
