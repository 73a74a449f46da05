"""The typed outcome of verifying one text against its ground truth."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from enum import Enum
from typing import Iterable, Optional


class VerifyStatus(str, Enum):
    OK = "ok"            # the check ran to the end (score 0 or 1)
    NO_BOX = "no_box"    # no final \boxed{} in the text (or the last one is empty/unclosed): 0
    TIMEOUT = "timeout"  # the per-answer deadline passed (the worker may have been replaced): 0
    ERROR = "error"      # the check raised, the worker died, the guard blocked, answer too long: 0


@dataclass(frozen=True)
class VerifyResult:
    score: float                 # 1.0 correct, else 0.0
    status: VerifyStatus
    answer: Optional[str]        # the extracted last-box content (None without a box)
    elapsed_s: float = 0.0       # time from dispatch to a worker until the result (0 for no_box)
    detail: str = ""             # reason for a non-ok status or an unparsed side

    @property
    def correct(self) -> bool:
        return self.score > 0.5


def summarize(results: Iterable[VerifyResult]) -> dict[str, int]:
    """Counts per status plus `correct` and `total`, for the step metrics."""
    c: Counter = Counter()
    for r in results:
        c[r.status.value] += 1
        c["correct"] += int(r.correct)
        c["total"] += 1
    out = {s.value: c[s.value] for s in VerifyStatus}
    out["correct"] = c["correct"]
    out["total"] = c["total"]
    return out
