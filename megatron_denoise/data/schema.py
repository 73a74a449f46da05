"""The reference parquet schema (verl / DenoiseRL data files) and how our rows are built.

One row per problem:
    data_source              string
    prompt                   list<struct<content: string, role: string>>   chat messages
    ability                  string                                        ("math")
    reward_model             struct<ground_truth: string, style: string>   style "rule"
    extra_info               struct<split, index, ...source fields>
    wrong_answer_with_boxed  list<string>     (after data preparation: the weak model's wrong
                                               solutions that box an answer, in sample order)
Files written by the reference code load unchanged and are written back unchanged: the data
layer never rewrites a table it reads (io.py), it only reads rows out of it (problems.py).
Other columns pass through.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import pyarrow as pa

from megatron_denoise.config.schema import PromptConfig

PROMPT = "prompt"
REWARD_MODEL = "reward_model"
GROUND_TRUTH = "ground_truth"
DATA_SOURCE = "data_source"
EXTRA_INFO = "extra_info"
ABILITY = "ability"
POOL = "wrong_answer_with_boxed"
REQUIRED_COLUMNS = (PROMPT, REWARD_MODEL)

MESSAGE_TYPE = pa.struct([("content", pa.string()), ("role", pa.string())])
PROMPT_TYPE = pa.list_(MESSAGE_TYPE)
REWARD_MODEL_TYPE = pa.struct([(GROUND_TRUTH, pa.string()), ("style", pa.string())])
POOL_TYPE = pa.list_(pa.string())


def build_prompt(problem: str, prompt: PromptConfig) -> list[dict[str, str]]:
    """Chat messages for one problem: optional system message, then problem + user suffix."""
    messages = []
    if prompt.system is not None:
        messages.append({"content": prompt.system, "role": "system"})
    messages.append({"content": problem + prompt.user_suffix, "role": "user"})
    return messages


def make_row(problem: str, ground_truth: str, data_source: str, extra_info: Mapping[str, Any],
             prompt: PromptConfig) -> dict[str, Any]:
    """One reference-format row (no pool column: data preparation adds it)."""
    return {
        DATA_SOURCE: data_source,
        PROMPT: build_prompt(problem, prompt),
        ABILITY: "math",
        REWARD_MODEL: {GROUND_TRUTH: ground_truth, "style": "rule"},
        EXTRA_INFO: dict(extra_info),
    }


def rows_to_table(rows: Sequence[Mapping[str, Any]]) -> pa.Table:
    """A table in the reference schema; `extra_info` gets the struct type its dicts imply."""
    known = {DATA_SOURCE: pa.string(), PROMPT: PROMPT_TYPE, ABILITY: pa.string(),
             REWARD_MODEL: REWARD_MODEL_TYPE, POOL: POOL_TYPE}
    columns = list(rows[0].keys()) if rows else [DATA_SOURCE, PROMPT, ABILITY, REWARD_MODEL, EXTRA_INFO]
    arrays, fields = [], []
    for name in columns:
        values = [r.get(name) for r in rows]
        typ: Optional[pa.DataType] = known.get(name)
        arr = pa.array(values, type=typ) if typ is not None else pa.array(values)
        arrays.append(arr)
        fields.append(pa.field(name, arr.type))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def with_pool_column(table: pa.Table, pools: Sequence[Sequence[str]], name: str = POOL) -> pa.Table:
    """`table` with the wrong-solution pool column set (added, or replaced in place)."""
    if len(pools) != table.num_rows:
        raise ValueError(f"{len(pools)} pools for {table.num_rows} rows")
    arr = pa.array([list(p) for p in pools], type=POOL_TYPE)
    if name in table.column_names:
        return table.set_column(table.column_names.index(name), pa.field(name, POOL_TYPE), arr)
    return table.append_column(pa.field(name, POOL_TYPE), arr)
