"""Equivalence of one boxed answer with the ground truth, with math-verify (in-process, no deadline).

This is the code a verifier worker runs; the deadline, the sandbox and the process isolation are
the worker's and the pool's business (see worker.py, guard.py, pool.py). Importing this module
imports sympy and math-verify (~1 s), so only workers and benchmarks import it.

Parsing path, chosen so that model text never reaches `eval` (guard.py explains the details):
the answer is already cut out of the text by `boxed.last_boxed` and is given to `math_verify.parse`
as `\\boxed{answer}` with ONLY `LatexExtractionConfig` (ANTLR LaTeX grammar -> sympy objects).
`ExprExtractionConfig`, which calls sympy's `parse_expr` (eval) on regex-extracted text, is never
used. The ground truth takes the same path, so both sides are normalised identically.
math-verify's own SIGALRM timeouts are switched off (`parsing_timeout=None`,
`timeout_seconds=None`): they only work on a main thread, and the worker enforces its own.
"""
from __future__ import annotations

import logging
from functools import lru_cache
from typing import Any

from math_verify import LatexExtractionConfig, parse, verify

# math-verify warns once that its timeouts are off, and logs every parse failure; both are
# expected here.
for _name in ("math_verify", "latex2sympy2_extended"):
    logging.getLogger(_name).setLevel(logging.ERROR)

_LATEX_ONLY = [LatexExtractionConfig(boxed_match_priority=0)]


def parse_boxed(latex: str) -> list[Any]:
    """math-verify's parse of `\\boxed{latex}`: [sympy object, normalised string] or a subset."""
    return parse(
        "\\boxed{" + latex + "}",
        extraction_config=_LATEX_ONLY,
        fallback_mode="first_match",
        parsing_timeout=None,
    )


@lru_cache(maxsize=4096)
def _parse_gold(gold: str) -> tuple:
    # The N+K rows of a problem share one ground truth: parse it once per worker.
    return tuple(parse_boxed(gold))


def judge(answer: str, golds: list[str]) -> tuple[float, str]:
    """(score, detail) for one extracted answer against any of the ground truths.

    score is 1.0 when math-verify finds `answer` equivalent to one of `golds`, else 0.0.
    detail is "" or a short reason for a 0 that is not a plain mismatch.
    """
    pred = parse_boxed(answer)
    if not pred:
        return 0.0, "answer unparsed"
    parsed_any_gold = False
    for g in golds:
        gold = list(_parse_gold(g))
        if not gold:
            continue
        parsed_any_gold = True
        if verify(gold, pred, timeout_seconds=None):
            return 1.0, ""
    if not parsed_any_gold:
        return 0.0, "ground truth unparsed"
    return 0.0, ""
