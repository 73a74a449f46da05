"""Finding the final answer in a solution text, and normalising ground truths.

Pure string code (no sympy): it runs in the trainer process before anything is shipped to a
verifier worker, so that texts without a box never cost a round trip and a 1 MB text is never
shipped.

The reference code judges on the LAST box only (METHOD.md section 1): `last_boxed` returns the
content of the last `\\boxed` / `\\fbox` command of the text, or None when there is none, when
that last box is empty, or when it is unclosed (a truncated generation). Earlier boxes are never
used as a fallback: a text whose final box is cut off has no final answer.
"""
from __future__ import annotations

import math
import re
from numbers import Integral, Real
from typing import Optional, Sequence, Union

# Commands that frame a final answer. `\boxed` and `\fbox` take one brace group; the hendrycks
# MATH grader also accepts `\boxed 5` (a single token after a space), which we keep.
_BOX_COMMANDS = ("\\boxed", "\\fbox")

GroundTruth = Union[str, int, float, Sequence[Union[str, int, float]]]


def _last_command_start(text: str) -> tuple[int, str]:
    """Position and name of the last box command in `text` ((-1, "") when none)."""
    best, name = -1, ""
    for cmd in _BOX_COMMANDS:
        pos = text.rfind(cmd)
        # `\boxedx` or `\fboxes` are other macros, not a box: walk back over them.
        while pos >= 0 and pos + len(cmd) < len(text) and text[pos + len(cmd)].isalpha():
            pos = text.rfind(cmd, 0, pos)
        if pos > best:
            best, name = pos, cmd
    return best, name


def _balanced_group(text: str, open_pos: int) -> Optional[str]:
    """Content of the brace group opening at text[open_pos] == "{", or None if unclosed.

    A backslash escapes the next character, so `\\{` and `\\}` are literal braces that neither open
    nor close a group (and `\\\\` is a literal backslash). Linear time, no recursion: a text of
    10k nested braces costs one pass.
    """
    depth = 0
    i = open_pos
    n = len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[open_pos + 1 : i]
        i += 1
    return None


def last_boxed(text: str) -> Optional[str]:
    """The content of the last `\\boxed{...}` / `\\fbox{...}` in `text`, stripped.

    Returns None when there is no box, the last box is empty, or the last box is unclosed.
    >>> last_boxed(r"so $\\boxed{1}$ ... finally \\boxed{\\frac{a}{b}}.")
    '\\\\frac{a}{b}'
    """
    pos, cmd = _last_command_start(text)
    if pos < 0:
        return None
    j = pos + len(cmd)
    n = len(text)
    k = j
    while k < n and text[k] in " \t":
        k += 1
    if k < n and text[k] == "{":
        content = _balanced_group(text, k)
    elif k > j:
        # `\boxed 5$`: one token up to the closing dollar or whitespace (hendrycks MATH form).
        m = re.match(r"[^\s$]+", text[k:])
        content = m.group(0) if m else None
    else:
        content = None
    if content is None:
        return None
    content = content.strip()
    return content or None


_DOLLARS = re.compile(r"^\$+\s*(.*?)\s*\$+$", re.DOTALL)


def _one_ground_truth(gt: object, where: str) -> str:
    if isinstance(gt, bool) or gt is None:
        raise ValueError(f"{where}: ground truth must be a string or a number, got {gt!r}")
    if isinstance(gt, Integral):
        return str(int(gt))
    if isinstance(gt, Real):
        x = float(gt)
        if not math.isfinite(x):
            raise ValueError(f"{where}: ground truth {gt!r} is not a finite number")
        # AMC23 stores answers as floats (27.0): compare them as the integer they denote.
        return str(int(x)) if x.is_integer() else repr(x)
    if isinstance(gt, str):
        s = gt.strip()
        if "\\boxed" in s or "\\fbox" in s:
            boxed = last_boxed(s)
            if boxed is not None:
                s = boxed
        m = _DOLLARS.match(s)
        if m:
            s = m.group(1)
        if not s:
            raise ValueError(f"{where}: empty ground truth {gt!r}")
        return s
    raise ValueError(f"{where}: ground truth must be a string or a number, got {type(gt).__name__}")


def normalize_ground_truth(gt: GroundTruth, where: str = "ground_truth") -> list[str]:
    """Ground truth(s) as LaTeX strings; a list means "any of these is correct".

    Numbers become their decimal text (27.0 -> "27", 0.5 -> "0.5"), strings lose surrounding
    `$...$` and an enclosing `\\boxed{}`. Raises ValueError naming `where` for None, bools,
    NaN/inf, empty strings or unsupported types.
    """
    if isinstance(gt, (list, tuple)):
        if not gt:
            raise ValueError(f"{where}: empty list of ground truths")
        return [_one_ground_truth(g, f"{where}[{i}]") for i, g in enumerate(gt)]
    return [_one_ground_truth(gt, where)]
