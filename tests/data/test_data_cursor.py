"""The data cursor: seeded epochs, and a resumed run repeats no problem and skips none."""
from __future__ import annotations

import json

import pytest

from megatron_denoise.data import DataCursor


def test_epochs_are_seeded_permutations():
    c = DataCursor(10, seed=3)
    e0, e1 = c.next_indices(10), c.next_indices(10)
    assert sorted(e0) == sorted(e1) == list(range(10))
    assert e0 != e1                                    # reshuffled per epoch
    assert (c.epoch, c.position, c.seen) == (2, 0, 20)
    again = DataCursor(10, seed=3)
    assert again.next_indices(20) == e0 + e1           # reproducible from the seed
    assert DataCursor(10, seed=4).next_indices(10) != e0
    assert DataCursor(10, seed=3, shuffle=False).next_indices(12) == list(range(10)) + [0, 1]


def test_batches_crossing_epochs_skip_and_repeat_nothing():
    c = DataCursor(7, seed=0)
    drawn = []
    for k in (3, 5, 2, 6, 4, 1):                       # 21 = 3 full epochs
        drawn += c.next_indices(k)
    for e in range(3):
        assert drawn[7 * e: 7 * (e + 1)] == c.order(e)
    assert c.next_indices(0) == [] and c.seen == 21


@pytest.mark.parametrize("split", range(0, 9))
def test_resume_equivalence_at_every_step(split):
    sizes = [4, 4, 3, 5, 4, 4, 2, 6, 4]                # DAPO may draw extra generation batches
    ref = DataCursor(11, seed=123)
    expected = [ref.next_indices(k) for k in sizes]

    first = DataCursor(11, seed=123)
    got = [first.next_indices(k) for k in sizes[:split]]
    saved = json.loads(json.dumps(first.state_dict()))  # through a checkpoint file
    resumed = DataCursor(11, seed=123)
    resumed.load_state_dict(saved)
    got += [resumed.next_indices(k) for k in sizes[split:]]
    assert got == expected


def test_from_config():
    from megatron_denoise.config.schema import DataConfig

    c = DataCursor.from_config(9, DataConfig(seed=5, shuffle=False))
    assert (c.seed, c.shuffle, c.num_items) == (5, False, 9)
    assert DataCursor.from_config(9, DataConfig(seed=5)).next_indices(9) == DataCursor(9, seed=5).next_indices(9)


def test_state_mismatch_is_a_clear_error():
    c = DataCursor(5, seed=1)
    c.next_indices(3)
    s = c.state_dict()
    with pytest.raises(ValueError, match="num_items=5 but this run has num_items=6"):
        DataCursor(6, seed=1).load_state_dict(s)
    with pytest.raises(ValueError, match="seed=1 but this run has seed=2"):
        DataCursor(5, seed=2).load_state_dict(s)
    with pytest.raises(ValueError, match="invalid saved position"):
        DataCursor(5, seed=1).load_state_dict({"epoch": 0, "position": 5})
    with pytest.raises(ValueError, match="at least one item"):
        DataCursor(0)
