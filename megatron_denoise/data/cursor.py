"""A seeded, resumable position in the stream of problems: epoch + offset into that epoch's order.

Epoch e visits every index of range(num_items) once, in an order shuffled by (seed, e) (or in
file order without shuffling). A draw that crosses the end of an epoch continues into the next
epoch's order, so no problem is skipped and none repeats within an epoch. The state is three
integers; a run resumed from `state_dict()` draws exactly what the uninterrupted run would have.
"""
from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

from megatron_denoise.core.seeding import derive_seed

if TYPE_CHECKING:
    from megatron_denoise.config.schema import DataConfig


class DataCursor:
    def __init__(self, num_items: int, seed: int = 42, shuffle: bool = True):
        if num_items < 1:
            raise ValueError(f"DataCursor needs at least one item, got num_items={num_items}")
        self.num_items = int(num_items)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.epoch = 0
        self.position = 0          # items of the current epoch already drawn
        self._order_epoch = -1
        self._order: list[int] = []

    @classmethod
    def from_config(cls, num_items: int, data: "DataConfig") -> "DataCursor":
        """The cursor `data.seed` / `data.shuffle` describe, over `num_items` problems."""
        return cls(num_items, seed=data.seed, shuffle=data.shuffle)

    def order(self, epoch: int) -> list[int]:
        """The visiting order of `epoch` (a permutation of range(num_items))."""
        if epoch != self._order_epoch:
            order = list(range(self.num_items))
            if self.shuffle:
                random.Random(derive_seed("data_order", self.seed, epoch)).shuffle(order)
            self._order, self._order_epoch = order, epoch
        return self._order

    def next_indices(self, k: int) -> list[int]:
        """The next `k` item indices (crossing into the next epoch when this one runs out)."""
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        out: list[int] = []
        while len(out) < k:
            order = self.order(self.epoch)
            take = min(k - len(out), self.num_items - self.position)
            out.extend(order[self.position:self.position + take])
            self.position += take
            if self.position == self.num_items:
                self.epoch += 1
                self.position = 0
        return out

    @property
    def seen(self) -> int:
        """Items drawn since the start (all epochs)."""
        return self.epoch * self.num_items + self.position

    def state_dict(self) -> dict[str, Any]:
        return {"version": 1, "epoch": self.epoch, "position": self.position, "seed": self.seed,
                "shuffle": self.shuffle, "num_items": self.num_items}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a saved position; the data (num_items), seed and shuffle must match."""
        for key in ("num_items", "seed", "shuffle"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"data cursor: saved {key}={state[key]!r} but this run has {key}="
                                 f"{getattr(self, key)!r} (different data or data.seed/shuffle?)")
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < self.num_items:
            raise ValueError(f"data cursor: invalid saved position epoch={epoch} position={position} "
                             f"for {self.num_items} items")
        self.epoch, self.position = epoch, position
