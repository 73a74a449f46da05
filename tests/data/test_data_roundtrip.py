"""A reference-format parquet (with wrong_answer_with_boxed) reads and writes back unchanged."""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megatron_denoise.data import (POOL, load_problems, read_table, rows_to_table, table_to_problems,
                                   with_pool_column, write_table)

MSG = pa.struct([("content", pa.string()), ("role", pa.string())])


def reference_table() -> pa.Table:
    """What the reference code writes: verl preprocessing columns + the pool, pandas metadata."""
    prompts = [
        [{"content": "you are a helpful assistant.", "role": "system"},
         {"content": "What is $1+1$?\n\nPlease reason step by step, and put your final answer within \\boxed{{}}.",
          "role": "user"}],
        [{"content": "Compute $\\frac{1}{2} + \\frac{1}{3}$. ünïcödé ✓", "role": "user"}],
        [{"content": "you are a helpful assistant.", "role": "system"},
         {"content": "Find $x$ if $2x = 10$.", "role": "user"}],
    ]
    pools = [
        ["1+1 is \\boxed{3}", "I think \\boxed{11}"],
        [],
        ["Let me think... " * 200 + "\\boxed{4}", "x = \\boxed{6}", "wrong: \\boxed{\\frac{5}{2}} ✗"],
    ]
    meta = {b"pandas": json.dumps({"index_columns": [], "column_indexes": [], "columns": [],
                                   "creator": {"library": "pyarrow"}, "pandas_version": "2.2.3"}).encode()}
    schema = pa.schema([
        ("data_source", pa.string()),
        ("prompt", pa.list_(MSG)),
        ("ability", pa.string()),
        ("reward_model", pa.struct([("ground_truth", pa.string()), ("style", pa.string())])),
        ("extra_info", pa.struct([("index", pa.int64()), ("split", pa.string())])),
        ("level", pa.string()),                    # another column: must pass through
        (POOL, pa.list_(pa.string())),
    ], metadata=meta)
    return pa.Table.from_pydict({
        "data_source": ["DigitalLearningGmbH/MATH-lighteval"] * 3,
        "prompt": prompts,
        "ability": ["math"] * 3,
        "reward_model": [{"ground_truth": g, "style": "rule"} for g in ["2", "\\frac{5}{6}", "5"]],
        "extra_info": [{"index": i, "split": "train"} for i in (7, 8, 9)],
        "level": ["Level 1", "Level 2", None],
        POOL: pools,
    }, schema=schema)


def test_reference_parquet_round_trips_unchanged(tmp_path):
    src = tmp_path / "MATH7500.with_wrong_boxed.parquet"
    ref = reference_table()
    pq.write_table(ref, src)                       # as the reference pipeline would

    # As stored (parquet names list children `element`; arrow in memory says `item`).
    stored = pq.read_table(src)
    table = read_table(src)
    assert table.schema.equals(stored.schema, check_metadata=True)
    assert table.schema.metadata == ref.schema.metadata
    assert table.equals(stored) and table.to_pylist() == ref.to_pylist()

    problems, report = table_to_problems(table, str(src))
    assert report.bad_rows == [] and report.rows_kept == 3
    assert [p.uid for p in problems] == [f"DigitalLearningGmbH/MATH-lighteval:{i}" for i in (7, 8, 9)]
    assert [p.ground_truth for p in problems] == ["2", "\\frac{5}{6}", "5"]
    assert [p.wrong_pool for p in problems] == [tuple(x) for x in ref.column(POOL).to_pylist()]
    assert problems[1].prompt == ({"role": "user", "content": "Compute $\\frac{1}{2} + \\frac{1}{3}$. ünïcödé ✓"},)
    assert problems[0].extra["level"] == "Level 1" and problems[0].extra["ability"] == "math"
    assert problems[2].extra["extra_info"] == {"index": 9, "split": "train"}

    out = tmp_path / "copy.parquet"
    write_table(table, out)
    again = pq.read_table(out)
    assert again.schema.equals(stored.schema, check_metadata=True)
    assert again.equals(stored)
    assert again.to_pylist() == ref.to_pylist()
    assert pq.read_schema(out).equals(pq.read_schema(src), check_metadata=True)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]   # no temp file left

    # The same file through the high-level loader.
    probs2, _ = load_problems([str(src)])
    assert [p.wrong_pool for p in probs2] == [p.wrong_pool for p in problems]


def test_generated_rows_round_trip_and_pool_column(tmp_path):
    rows = [{"data_source": "math500", "prompt": [{"content": "q", "role": "user"}], "ability": "math",
             "reward_model": {"ground_truth": "1", "style": "rule"},
             "extra_info": {"split": "test", "index": 0, "level": 3}}]
    table = rows_to_table(rows)
    assert table.to_pylist() == rows
    with_pool = with_pool_column(table, [["\\boxed{2}"]])
    assert with_pool.column_names == table.column_names + [POOL]
    assert with_pool.schema.field(POOL).type == pa.list_(pa.string())
    assert with_pool.drop_columns([POOL]).equals(table)
    replaced = with_pool_column(with_pool, [[]])
    assert replaced.column(POOL).to_pylist() == [[]] and replaced.column_names == with_pool.column_names
    path = tmp_path / "t.parquet"
    write_table(with_pool, path)
    assert read_table(path).equals(with_pool)
    with pytest.raises(ValueError, match="2 pools for 1 rows"):
        with_pool_column(table, [[], []])


def test_map_typed_extra_info_passes_through(tmp_path):
    t = pa.table({
        "prompt": pa.array([[{"content": "q1", "role": "user"}], [{"content": "q2", "role": "user"}]], pa.list_(MSG)),
        "reward_model": [{"ground_truth": "1", "style": "rule"}, {"ground_truth": "2", "style": "rule"}],
        "extra_info": pa.array([[("index", "10"), ("split", "train")], [("index", "11")]],
                               pa.map_(pa.string(), pa.string())),
    })
    path = tmp_path / "m.parquet"
    pq.write_table(t, path)
    table = read_table(path)
    assert table.equals(pq.read_table(path))
    problems, report = table_to_problems(table, str(path))
    assert report.bad_rows == []
    assert problems[0].extra["extra_info"] == {"index": "10", "split": "train"}
    assert [p.uid for p in problems] == ["m:10", "m:11"]   # data_source defaults to the file stem
    write_table(table, tmp_path / "m2.parquet")
    assert pq.read_table(tmp_path / "m2.parquet").equals(pq.read_table(path))
