"""Rows of a reference-schema table -> `core.types.Problem` records, with every bad row reported.

A row is bad (reported by file and row index, then skipped or raised per `data.bad_rows`) when:
- `prompt` is missing/null, not a list of {role, content} messages with string fields, or has no
  user message with non-blank content;
- `reward_model.ground_truth` is missing, null, empty, or not a string/number;
- the pool column holds something other than a list of strings;
- a length function is given and the prompt is longer than `max_prompt_length`.
A file without a `prompt` or `reward_model` column is rejected as a whole (an error naming the
file and the column), whatever the mode.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import pyarrow as pa

from megatron_denoise.core.types import Problem
from megatron_denoise.data.report import BadRow, DataReport
from megatron_denoise.data.schema import (DATA_SOURCE, EXTRA_INFO, GROUND_TRUTH, POOL, PROMPT,
                                          REQUIRED_COLUMNS, REWARD_MODEL)
from megatron_denoise.reward.boxed import normalize_ground_truth

# messages -> prompt length in tokens (e.g. the chat template with its generation header)
LengthFn = Callable[[Sequence[Mapping[str, str]]], int]


def check_columns(table: pa.Table, file: str) -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(f"{file}: missing column(s) {missing} (columns: {table.column_names})")


def _prompt_error(prompt: Any) -> Optional[str]:
    if prompt is None:
        return "prompt is null"
    if not isinstance(prompt, (list, tuple)) or not prompt:
        return f"prompt must be a non-empty list of messages, got {type(prompt).__name__}"
    has_user = False
    for j, m in enumerate(prompt):
        if not isinstance(m, Mapping):
            return f"prompt[{j}] is not a message mapping ({type(m).__name__})"
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or not isinstance(content, str):
            return f"prompt[{j}] needs string 'role' and 'content' (got {type(role).__name__}, {type(content).__name__})"
        if role == "user":
            if not content.strip():
                return f"prompt[{j}] (user) is empty: empty problem"
            has_user = True
    if not has_user:
        return "prompt has no user message"
    return None


def _as_mapping(info: Any) -> Any:
    """extra_info as a dict when it is an arrow map (read back as a list of (key, value) pairs)."""
    if isinstance(info, list) and all(isinstance(kv, tuple) and len(kv) == 2 for kv in info):
        return dict(info)
    return info


def _pool_error(pool: Any, column: str) -> Optional[str]:
    if not isinstance(pool, (list, tuple)):
        return f"{column} must be a list of strings, got {type(pool).__name__}"
    for j, w in enumerate(pool):
        if not isinstance(w, str):
            return f"{column}[{j}] is not a string ({type(w).__name__})"
    return None


def table_to_problems(
    table: pa.Table,
    file: str,
    *,
    pool_column: str = POOL,
    length_fn: Optional[LengthFn] = None,
    max_prompt_length: Optional[int] = None,
    start_index: int = 0,
) -> tuple[list[Problem], DataReport]:
    """Problems of the good rows (in row order) and a report of the bad ones.

    Problem.index is `start_index` + position among the kept problems (the dataset position the
    cursor samples); Problem.uid is `<data_source>:<extra_info.index>` (row index if absent);
    Problem.extra holds file, row, extra_info and any other columns of the row.
    """
    check_columns(table, file)
    return rows_to_problems(table.to_pylist(), file, table.column_names, pool_column=pool_column,
                            length_fn=length_fn, max_prompt_length=max_prompt_length, start_index=start_index)


def rows_to_problems(
    rows: Sequence[Any],
    file: str,
    columns: Sequence[str],
    *,
    pool_column: str = POOL,
    length_fn: Optional[LengthFn] = None,
    max_prompt_length: Optional[int] = None,
    start_index: int = 0,
    row_numbers: Optional[Sequence[int]] = None,
) -> tuple[list[Problem], DataReport]:
    """`table_to_problems` on plain rows (dicts), e.g. JSONL lines that arrow could not type.

    `columns` are the table's columns (the union of the rows' keys for JSONL); `row_numbers`
    the row index of each row in its file (default: its position).
    """
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise ValueError(f"{file}: missing column(s) {missing} (columns: {list(columns)})")
    report = DataReport(rows_read=len(rows), files=[file])
    has_pool = pool_column in columns
    other_cols = [c for c in columns if c not in (PROMPT, REWARD_MODEL, DATA_SOURCE, EXTRA_INFO, pool_column)]
    default_source = Path(file).stem
    problems: list[Problem] = []
    for pos, row in enumerate(rows):
        r = row_numbers[pos] if row_numbers is not None else pos
        if not isinstance(row, Mapping):
            report.bad_rows.append(BadRow(file, r, f"row is not an object ({type(row).__name__})"))
            continue
        reason = _prompt_error(row.get(PROMPT))
        gt: Optional[str] = None
        if reason is None:
            rm = row.get(REWARD_MODEL)
            if not isinstance(rm, Mapping) or rm.get(GROUND_TRUTH) is None:
                reason = f"{REWARD_MODEL}.{GROUND_TRUTH} is missing"
            else:
                try:
                    gts = normalize_ground_truth(rm[GROUND_TRUTH], where=f"{REWARD_MODEL}.{GROUND_TRUTH}")
                    if len(gts) != 1:
                        raise ValueError(f"{REWARD_MODEL}.{GROUND_TRUTH} must be one answer, got a list")
                    gt = gts[0]
                except ValueError as e:
                    reason = str(e)
        pool: tuple[str, ...] = ()
        if reason is None and has_pool:
            raw = row.get(pool_column)
            if raw is not None:  # null = no pool (the reference writes empty lists)
                reason = _pool_error(raw, pool_column)
                pool = tuple(raw) if reason is None else ()
        if reason is None and length_fn is not None and max_prompt_length is not None:
            n = int(length_fn(row[PROMPT]))
            if n > max_prompt_length:
                reason = f"prompt is {n} tokens > data.max_prompt_length ({max_prompt_length})"
        if reason is not None:
            info = _as_mapping(row.get(EXTRA_INFO))
            if isinstance(info, Mapping) and info.get("index") is not None:
                reason += f" (extra_info.index={info['index']})"
            report.bad_rows.append(BadRow(file, r, reason))
            continue
        source = row.get(DATA_SOURCE) or default_source
        extra_info = _as_mapping(row.get(EXTRA_INFO))
        idx = extra_info.get("index") if isinstance(extra_info, Mapping) else None
        if isinstance(idx, str) and idx.isdigit():
            idx = int(idx)  # map-typed extra_info stores everything as strings
        uid = f"{source}:{idx if isinstance(idx, int) and not isinstance(idx, bool) else r}"
        extra = {"file": file, "row": r, EXTRA_INFO: extra_info}
        extra.update({c: row.get(c) for c in other_cols})
        problems.append(Problem(
            uid=uid, index=start_index + len(problems),
            prompt=tuple({"role": m["role"], "content": m["content"]} for m in row[PROMPT]),
            ground_truth=gt, wrong_pool=pool, data_source=str(source), extra=extra))
    report.rows_kept = len(problems)
    return problems, report
