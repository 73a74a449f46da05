"""What the data layer did with each input row: a report, never a silent drop."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

BAD_ROW_MODES = ("skip", "error")


@dataclass(frozen=True)
class BadRow:
    """One rejected row: where it is and why."""

    file: str             # file path or named set
    row: int              # 0-based row index in that file
    reason: str           # names the column and what is wrong with it

    def __str__(self) -> str:
        return f"{self.file} row {self.row}: {self.reason}"


@dataclass
class DataReport:
    """Rows read, rows kept, and every rejected row with its reason.

    `notes` hold facts about kept rows worth knowing (e.g. eval prompts longer than
    max_prompt_length, kept so that AVG@k keeps the full denominator).
    """

    rows_read: int = 0
    rows_kept: int = 0
    bad_rows: list[BadRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)

    def extend(self, other: "DataReport") -> None:
        self.rows_read += other.rows_read
        self.rows_kept += other.rows_kept
        self.bad_rows.extend(other.bad_rows)
        self.notes.extend(other.notes)
        self.files.extend(other.files)

    def summary(self, max_listed: int = 10) -> str:
        head = (f"{self.rows_kept}/{self.rows_read} rows kept from {len(self.files)} file(s)"
                f"; {len(self.bad_rows)} bad row(s) skipped")
        lines = [head] + [f"  {b}" for b in self.bad_rows[:max_listed]]
        if len(self.bad_rows) > max_listed:
            lines.append(f"  ... and {len(self.bad_rows) - max_listed} more")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


class BadDataError(ValueError):
    """Raised with `data.bad_rows: error`; lists every bad row found (not just the first)."""

    def __init__(self, bad_rows: list[BadRow], max_listed: int = 20):
        self.bad_rows = list(bad_rows)
        listed = "\n".join(f"  {b}" for b in self.bad_rows[:max_listed])
        more = f"\n  ... and {len(self.bad_rows) - max_listed} more" if len(self.bad_rows) > max_listed else ""
        super().__init__(f"{len(self.bad_rows)} bad row(s) (data.bad_rows=error):\n{listed}{more}")


def check_mode(mode: str) -> str:
    if mode not in BAD_ROW_MODES:
        raise ValueError(f"data.bad_rows ({mode!r}) must be one of {'|'.join(BAD_ROW_MODES)}")
    return mode


def apply_mode(bad: list[BadRow], mode: str) -> Optional[BadDataError]:
    """The error to raise for `bad` under `mode` (None when skipping or nothing is bad)."""
    check_mode(mode)
    if bad and mode == "error":
        return BadDataError(bad)
    return None
