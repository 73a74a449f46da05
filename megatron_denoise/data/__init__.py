"""Problem data: the reference parquet schema, named sets, validation into Problems, and the cursor.

Public API (pyarrow only; no engine imports):
    load_problems(sources, data_cfg, tokenizer=None | length_fn=None) -> (list[Problem], DataReport)
        sources: file paths (.parquet/.jsonl in the reference schema) and/or named sets
    load_eval_set(name_or_path, data_cfg=None, tokenizer=None, max_problems=None) -> list[Problem]
    load_table(source, prompt_cfg) -> (pa.Table, DataReport, label)  a file as stored, or a named set
    read_table(path) / write_table(table, path)                     unchanged round trip, atomic write
    NAMED_SETS, load_named_set(name, prompt_cfg)                    gsm8k, gsm8k_train, math_train,
                                                                    math_test, math500, aime24, aime25, amc23
    table_to_problems(table, file, ...) / rows_to_problems(rows, ...) rows -> Problems + bad-row report
    DataCursor(num_items, seed, shuffle)                            seeded, resumable epoch/position
    DataReport, BadRow, BadDataError                                bad rows, by file and row index
    build_prompt, make_row, rows_to_table, with_pool_column         the schema
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence, Union

import pyarrow as pa

from megatron_denoise.config.schema import DataConfig, PromptConfig
from megatron_denoise.core.types import Problem
from megatron_denoise.data.cursor import DataCursor
from megatron_denoise.data.io import read_jsonl_rows, read_table, write_table
from megatron_denoise.data.problems import LengthFn, rows_to_problems, table_to_problems
from megatron_denoise.data.report import BadDataError, BadRow, DataReport, apply_mode, check_mode
from megatron_denoise.data.schema import (POOL, build_prompt, make_row, rows_to_table,
                                          with_pool_column)
from megatron_denoise.data.sources import NAMED_SETS, load_named_set, named_set

__all__ = [
    "load_problems", "load_eval_set", "eval_set_names", "load_table", "read_table", "write_table", "NAMED_SETS",
    "load_named_set", "named_set", "table_to_problems", "rows_to_problems", "DataCursor", "DataReport", "BadRow",
    "BadDataError", "build_prompt", "make_row", "rows_to_table", "with_pool_column",
    "prompt_length_fn", "POOL",
]


def prompt_length_fn(tokenizer: Any) -> LengthFn:
    """Prompt length in tokens as the policy sees it: chat template + generation header."""
    from megatron_denoise.core.prefix import render_prompt_ids

    return lambda messages: len(render_prompt_ids(tokenizer, messages))


def load_table(source: Union[str, Path], prompt: Optional[PromptConfig] = None) -> tuple[pa.Table, DataReport, str]:
    """(table, report of rows dropped while reading, file label) for a named set or a file."""
    if isinstance(source, str) and source in NAMED_SETS:
        table, report = load_named_set(source, prompt)
        return table, report, report.files[0]
    table = read_table(source)
    return table, DataReport(files=[]), str(source)


def load_problems(
    sources: Sequence[Union[str, Path]],
    data: Optional[DataConfig] = None,
    *,
    tokenizer: Any = None,
    length_fn: Optional[LengthFn] = None,
    pool_column: str = POOL,
    filter_length: bool = True,
) -> tuple[list[Problem], DataReport]:
    """Problems of all `sources` in order, and a report of every rejected row.

    Over-long prompts (`tokenizer` or `length_fn` given, `filter_length`) are bad rows.
    `data.bad_rows`: skip (report and drop) | error (raise BadDataError listing all of them).
    `data.max_problems` keeps the first n problems. uids are made unique across files.
    """
    data = data or DataConfig()
    check_mode(data.bad_rows)
    if isinstance(sources, (str, Path)):
        sources = [sources]
    if not sources:
        raise ValueError("no data sources given (data.train_files / data.val_files is empty)")
    if length_fn is None and tokenizer is not None:
        length_fn = prompt_length_fn(tokenizer)
    report = DataReport()
    problems: list[Problem] = []
    for src in sources:
        kw = dict(pool_column=pool_column, length_fn=length_fn if filter_length else None,
                  max_prompt_length=data.max_prompt_length, start_index=len(problems))
        if isinstance(src, str) and src in NAMED_SETS:
            table, read_report = load_named_set(src, data.prompt)
            label = read_report.files[0]
            probs, rep = table_to_problems(table, label, **kw)
            rep.rows_read = read_report.rows_read
            rep.bad_rows[:0] = read_report.bad_rows
        elif str(src).endswith((".jsonl", ".json")):
            label = str(src)
            rows, lines, bad_lines = read_jsonl_rows(src)
            columns = list(dict.fromkeys(k for r in rows if isinstance(r, dict) for k in r))
            probs, rep = rows_to_problems(rows, label, columns, row_numbers=lines, **kw)
            rep.rows_read += len(bad_lines)
            rep.bad_rows.extend(BadRow(label, i, why) for i, why in bad_lines)
            rep.bad_rows.sort(key=lambda b: b.row)
        else:
            label = str(src)
            probs, rep = table_to_problems(read_table(src), label, **kw)
        report.extend(rep)
        problems.extend(probs)
    err = apply_mode(report.bad_rows, data.bad_rows)
    if err is not None:
        raise err
    if data.max_problems is not None:
        problems = problems[: data.max_problems]
    problems, renamed = _unique_uids(problems)
    if renamed:
        listed = "; ".join(f"{old} -> {new} ({file} row {row})" for old, new, file, row in renamed[:5])
        more = f"; ... and {len(renamed) - 5} more" if len(renamed) > 5 else ""
        report.notes.append(f"{len(renamed)} duplicate uid(s) renamed to stay unique (problems.jsonl and "
                            f"resumption key on uids): {listed}{more}")
    if not problems:
        raise ValueError(f"no usable problems in {list(map(str, sources))}:\n{report.summary()}")
    return problems, report


def _unique_uids(problems: list[Problem]) -> tuple[list[Problem], list[tuple[str, str, str, int]]]:
    """Problems with unique uids (a repeated uid gets `@<file stem>:<row>`), and every renaming
    as (old uid, new uid, file, row)."""
    import dataclasses

    seen: set[str] = set()
    out, renamed = [], []
    for p in problems:
        uid = p.uid
        if uid in seen:
            uid = f"{p.uid}@{Path(str(p.extra.get('file', ''))).stem}:{p.extra.get('row')}"
            renamed.append((p.uid, uid, str(p.extra.get("file", "")), p.extra.get("row")))
        seen.add(uid)
        out.append(p if uid == p.uid else dataclasses.replace(p, uid=uid))
    return out, renamed


def eval_set_names(sources: Sequence[Union[str, Path]]) -> dict[str, Union[str, Path]]:
    """Short display names for eval sources: a named set keeps its name, a file is named by its
    stem (metrics read `val/aime24/avg@16`, not `val//data/.../aime24.jsonl/avg@16`); `eval.k` is
    keyed by these names. Two sources with one name are an error naming both."""
    out: dict[str, Union[str, Path]] = {}
    for src in sources:
        name = str(src) if str(src) in NAMED_SETS else Path(str(src)).name.split(".")[0]
        if name in out:
            raise ValueError(f"eval sets {str(out[name])!r} and {str(src)!r} share the name {name!r}; "
                             f"rename one of the files")
        out[name] = src
    return out


def load_eval_set(
    source: Union[str, Path],
    data: Optional[DataConfig] = None,
    tokenizer: Any = None,
    max_problems: Optional[int] = None,
    report: Optional[DataReport] = None,
) -> list[Problem]:
    """Problems of one eval set (named set or file) with the configured prompt template.

    Over-long prompts are KEPT (AVG@k keeps the full denominator; the evaluator scores them 0);
    with a tokenizer their number is added to `report.notes`.
    """
    import dataclasses

    # data.max_problems limits TRAINING problems; eval sets are cut by `max_problems` only.
    data = dataclasses.replace(data or DataConfig(), max_problems=None)
    probs, rep = load_problems([source], data, pool_column=POOL, filter_length=False)
    if tokenizer is not None:
        fn = prompt_length_fn(tokenizer)
        n_long = sum(fn(p.prompt) > data.max_prompt_length for p in probs)
        if n_long:
            rep.notes.append(f"{source}: {n_long} prompt(s) longer than data.max_prompt_length "
                             f"({data.max_prompt_length}) kept for evaluation")
    if report is not None:
        report.extend(rep)
    if max_problems is not None:
        probs = probs[:max_problems]
    return probs
