"""Errors raised by checkpoint conversion. Each message names what is wrong (keys, tensor names,
both shapes) so that a user can fix the input without reading the converter."""
from __future__ import annotations

from typing import Iterable, Sequence


class ConversionError(ValueError):
    """Base class of every conversion error."""


class UnknownArchitectureError(ConversionError):
    def __init__(self, arch: str, supported: Iterable[str], source: str = "config.json"):
        self.arch = arch
        super().__init__(
            f"unknown architecture {arch!r} in {source}; supported: {', '.join(sorted(supported))}")


class UnsupportedConfigError(ConversionError):
    """A config value the converter (and the megatron model) cannot represent."""


class ConfigMismatchError(ConversionError):
    """Two configs that must describe the same model disagree; ``problems`` lists every field."""

    def __init__(self, problems: Sequence[str], what: str = "configs"):
        self.problems = list(problems)
        super().__init__(f"{what} disagree ({len(problems)} field(s)):\n  " + "\n  ".join(problems))


def _names(names: Sequence[str], limit: int = 40) -> str:
    names = sorted(names)
    more = f"\n  ... and {len(names) - limit} more" if len(names) > limit else ""
    return "\n  ".join(names[:limit]) + more


class MissingTensorsError(ConversionError):
    def __init__(self, names: Sequence[str], where: str):
        self.names = sorted(names)
        super().__init__(f"{len(names)} tensor(s) missing from {where}:\n  {_names(names)}")


class UnexpectedTensorsError(ConversionError):
    def __init__(self, names: Sequence[str], where: str):
        self.names = sorted(names)
        super().__init__(
            f"{len(names)} unexpected tensor(s) in {where} (not part of the model's name table):\n  {_names(names)}")


class ShapeMismatchError(ConversionError):
    def __init__(self, name: str, expected: Sequence[int], got: Sequence[int], context: str = ""):
        self.name, self.expected, self.got = name, tuple(expected), tuple(got)
        ctx = f" ({context})" if context else ""
        super().__init__(f"shape mismatch for {name}{ctx}: expected {tuple(expected)}, got {tuple(got)}")
