"""Reading and writing problem tables: parquet (the reference format) and JSONL.

`read_table` returns the file's table exactly as stored (schema, metadata, column order, extra
columns); `write_table` writes a table back without touching it, atomically (a crash mid-write
leaves the previous file). Reading a file and writing it again gives the same schema and values.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Union

import pyarrow as pa
import pyarrow.parquet as pq

PathLike = Union[str, os.PathLike]


def read_table(path: PathLike) -> pa.Table:
    """A parquet file, or a JSONL file whose lines are rows in the reference schema."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"data file {p} does not exist")
    if p.suffix == ".parquet":
        return pq.read_table(p)
    if p.suffix in (".jsonl", ".json"):
        rows = []
        for i, rec in iter_jsonl(p):
            if isinstance(rec, Exception):
                raise ValueError(f"{p} line {i + 1}: {rec}")
            rows.append(rec)
        if not rows:
            raise ValueError(f"{p}: no rows")
        from megatron_denoise.data.schema import rows_to_table

        return rows_to_table(rows)
    raise ValueError(f"data file {p}: unsupported extension {p.suffix!r} (use .parquet or .jsonl)")


def write_table(table: pa.Table, path: PathLike) -> None:
    """Write `table` to parquet at `path` atomically (temp file in the same folder + rename)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, p)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class BadLine(ValueError):
    """A JSONL line that is not a record: invalid UTF-8 or invalid JSON (the reason says which)."""


def iter_jsonl(path: PathLike) -> Iterator[tuple[int, Any]]:
    """(line index, record) for every non-blank line; a malformed line (bytes that are not UTF-8,
    text that is not JSON) yields a BadLine saying why, so one bad line never hides the rest."""
    with open(path, "rb") as f:
        for i, raw in enumerate(f):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield i, BadLine(f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})")
                continue
            if not line.strip():
                continue
            try:
                yield i, json.loads(line)
            except json.JSONDecodeError as e:
                yield i, BadLine(f"invalid JSON ({e})")


def read_jsonl_rows(path: PathLike) -> tuple[list[Any], list[int], list[tuple[int, str]]]:
    """(rows, their line numbers, [(line, error)] of malformed lines) of a JSONL file, untyped.

    Rows stay plain Python values so that a row arrow cannot type (a pool entry that is a
    number) is reported as that row's problem instead of failing the whole file.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"data file {p} does not exist")
    rows, lines, bad = [], [], []
    for i, rec in iter_jsonl(p):
        if isinstance(rec, Exception):
            bad.append((i, str(rec)))
        else:
            rows.append(rec)
            lines.append(i)
    return rows, lines, bad
