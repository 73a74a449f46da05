"""Last-box extraction and ground-truth normalisation (pure string code, no workers)."""
from __future__ import annotations

import math

import pytest

from megatron_denoise.reward.boxed import last_boxed, normalize_ground_truth


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"first \boxed{1} then \boxed{2}", "2"),                     # the LAST box wins
        (r"$\boxed{\frac{a}{b}}$.", r"\frac{a}{b}"),                   # nested braces
        (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),                            # escaped braces are literal
        (r"\boxed{a\}b}", r"a\}b"),                                    # escaped close does not end it
        (r"\fbox{7}", "7"),
        (r"\boxed{1} and \fbox{3}", "3"),
        (r"\fbox{3} and \boxed{1}", "1"),
        (r"so $\boxed 5$ done", "5"),                                  # hendrycks `\boxed 5` form
        (r"\boxed {  x+1 }", "x+1"),                                   # space before the group, stripped
        (r"\boxed{\boxed{4}}", "4"),
        (r"\boxed{\text{(C)}}", r"\text{(C)}"),
        (r"\boxed{a \\ b}", r"a \\ b"),                                # `\\` is a literal backslash pair
    ],
)
def test_last_boxed_content(text, expected):
    assert last_boxed(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "no box at all",
        r"\boxed{}",                          # empty
        r"\boxed{   }",                       # blank
        r"good \boxed{1} then cut \boxed{2",  # the last box is unclosed: no final answer
        r"\boxedx{3}",                        # another macro
        r"\boxed",                            # command at the very end
    ],
)
def test_last_boxed_none(text):
    assert last_boxed(text) is None


def test_last_boxed_is_linear_on_deep_nesting():
    depth = 10_000
    text = r"\boxed{" + "{" * depth + "1" + "}" * depth + "}"
    assert last_boxed(text) == "{" * depth + "1" + "}" * depth
    assert last_boxed(r"\boxed{" + "{" * depth) is None


@pytest.mark.parametrize(
    "gt, expected",
    [
        (27.0, ["27"]),             # AMC23 floats
        (0.5, ["0.5"]),
        (-3.0, ["-3"]),
        (18, ["18"]),
        ("  \\frac{1}{2} ", ["\\frac{1}{2}"]),
        ("$3\\sqrt{2}$", ["3\\sqrt{2}"]),
        ("\\boxed{70}", ["70"]),
        (["1", 2.0], ["1", "2"]),
    ],
)
def test_normalize_ground_truth(gt, expected):
    assert normalize_ground_truth(gt) == expected


@pytest.mark.parametrize("gt", [None, True, math.nan, math.inf, "", "   ", "$$", [], object()])
def test_normalize_ground_truth_rejects_with_location(gt):
    with pytest.raises(ValueError, match="row 7"):
        normalize_ground_truth(gt, where="row 7")
