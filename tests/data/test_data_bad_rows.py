"""Bad rows are reported by file and row index, then skipped or raised; never silently dropped."""
from __future__ import annotations

import json

import pyarrow as pa
import pytest

from megatron_denoise.config.schema import DataConfig
from megatron_denoise.data import BadDataError, load_problems, rows_to_table, table_to_problems, write_table

SYS = {"role": "system", "content": "you are a helpful assistant."}


def row(content="What is 1+1?", gt="2", pool=("\\boxed{3}",), prompt=None, **kw):
    r = {"data_source": "t", "prompt": prompt if prompt is not None else [SYS, {"role": "user", "content": content}],
         "reward_model": {"ground_truth": gt, "style": "rule"}, "wrong_answer_with_boxed": list(pool)}
    r.update(kw)
    return r


# (row, expected reason fragment or None for a good row)
JSONL_CASES = [
    (row(), None),
    (row(prompt=[]), "prompt must be a non-empty list"),
    (row(content="   "), "empty problem"),
    (row(prompt=[SYS]), "no user message"),
    (row(prompt=[{"role": "user"}]), "needs string 'role' and 'content'"),
    (row(gt=""), "empty ground truth"),
    (row(gt=None), "ground_truth is missing"),
    (row(pool=("ok", 3)), "wrong_answer_with_boxed[1] is not a string (int)"),
    (row(pool=("ok", None)), "wrong_answer_with_boxed[1] is not a string (NoneType)"),
    (row(gt=27.0, pool=()), None),                                     # numeric ground truth is fine
    ({"prompt": None, "reward_model": {"ground_truth": "1"}}, "prompt is null"),
    (row(reward_model=None), "ground_truth is missing"),
    (row(wrong_answer_with_boxed="\\boxed{1}"), "must be a list of strings, got str"),
    ([1, 2], "row is not an object"),
]


def _write_jsonl(path, rows, broken_line_at=None):
    lines = [json.dumps(r) for r in rows]
    if broken_line_at is not None:
        lines.insert(broken_line_at, "{not json")
    path.write_text("\n".join(lines) + "\n")


def test_jsonl_bad_rows_reported_by_line_and_skipped(tmp_path):
    path = tmp_path / "train.jsonl"
    _write_jsonl(path, [r for r, _ in JSONL_CASES], broken_line_at=3)
    problems, report = load_problems([str(path)])
    # line numbers in the file: the broken line sits at 3, rows after it moved down by one
    lines = [i if i < 3 else i + 1 for i in range(len(JSONL_CASES))]
    expected = {lines[i]: why for i, (_, why) in enumerate(JSONL_CASES) if why is not None}
    expected[3] = "invalid JSON"
    got = {b.row: b.reason for b in report.bad_rows}
    assert sorted(got) == sorted(expected)
    for line, why in expected.items():
        assert why in got[line], (line, got[line])
        assert all(b.file == str(path) for b in report.bad_rows)
    assert report.rows_read == len(JSONL_CASES) + 1
    assert report.rows_kept == len(problems) == 2
    assert [p.ground_truth for p in problems] == ["2", "27"]
    assert "rows kept" in report.summary() and f"{path} row 3" in report.summary()

    with pytest.raises(BadDataError) as e:
        load_problems([str(path)], DataConfig(bad_rows="error"))
    assert len(e.value.bad_rows) == len(expected)          # every bad row, not only the first
    assert f"{path} row 1: prompt must be a non-empty list" in str(e.value)


def test_parquet_bad_rows_and_over_long_prompts(tmp_path):
    rows = [row(content="short"), row(content="x" * 500), row(content=""), row(gt="5")]
    path = tmp_path / "p.parquet"
    write_table(rows_to_table(rows), path)
    # A toy length function (characters); the real one is the chat template (tokenizer=...).
    length = lambda msgs: sum(len(m["content"]) for m in msgs)  # noqa: E731
    problems, report = load_problems([str(path)], DataConfig(max_prompt_length=100), length_fn=length)
    assert [(b.row, b.reason) for b in report.bad_rows] == [
        (1, f"prompt is {len(SYS['content']) + 500} tokens > data.max_prompt_length (100)"),
        (2, "prompt[1] (user) is empty: empty problem"),
    ]
    assert [p.extra["row"] for p in problems] == [0, 3]
    assert [p.index for p in problems] == [0, 1]
    # Without a length function nothing is filtered on length.
    problems, report = load_problems([str(path)], DataConfig(max_prompt_length=100))
    assert len(problems) == 3 and [b.row for b in report.bad_rows] == [2]


def test_missing_column_names_file_and_column(tmp_path):
    t = rows_to_table([row()]).drop_columns(["reward_model"])
    path = tmp_path / "nocol.parquet"
    write_table(t, path)
    with pytest.raises(ValueError, match=r"nocol.parquet: missing column\(s\) \['reward_model'\]"):
        load_problems([str(path)])
    with pytest.raises(ValueError, match="missing column"):
        table_to_problems(pa.table({"x": [1]}), "mem")


def test_bad_rows_mode_is_validated_and_max_problems_and_unique_uids(tmp_path):
    with pytest.raises(ValueError, match="data.bad_rows"):
        load_problems(["x.parquet"], DataConfig(bad_rows="ignore"))
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    for p in (a, b):  # two shards that both index their rows from 0
        write_table(rows_to_table([row(extra_info={"index": 0}), row(extra_info={"index": 1})]), p)
    problems, _ = load_problems([str(a), str(b)])
    assert [p.uid for p in problems] == ["t:0", "t:1", "t:0@b:0", "t:1@b:1"]
    assert [p.index for p in problems] == [0, 1, 2, 3]
    problems, _ = load_problems([str(a), str(b)], DataConfig(max_problems=3))
    assert len(problems) == 3
    with pytest.raises(ValueError, match="no usable problems"):
        bad = tmp_path / "bad.jsonl"
        _write_jsonl(bad, [row(gt="")])
        load_problems([str(bad)])
