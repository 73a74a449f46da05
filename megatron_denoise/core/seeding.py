"""Stable seeds derived from named parts, independent of batch composition and of PYTHONHASHSEED.

A denoise slot's pool choice and rho depend only on (seed, step, generation batch, problem uid,
slot): reordering or resizing the batch, or adding problems, leaves every other slot's draw
unchanged, and a resumed run draws the same values. Python's `hash()` is salted per process, so
the parts are hashed with BLAKE2b instead.
"""
from __future__ import annotations

import hashlib
import random

__all__ = ["derive_seed", "derived_rng"]


def derive_seed(*parts: object, bits: int = 63) -> int:
    """A non-negative integer < 2**bits from the repr of `parts` (str, int, float, tuples of those).

    Strings and ints stay distinct (`repr("1") != repr(1)`), and the stream name comes first so that
    different consumers (pool choice, rho, sampling) get independent streams.
    """
    if not 1 <= bits <= 64:
        raise ValueError(f"bits ({bits}) must be in [1, 64]")
    digest = hashlib.blake2b(repr(parts).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> (64 - bits)


def derived_rng(*parts: object) -> random.Random:
    """A `random.Random` seeded from `derive_seed(*parts)`."""
    return random.Random(derive_seed(*parts))
