"""Stable slots: a backend keeps its counter slot (a service its service slot)
across versions, so a new image neither resets nor misattributes
the connections already open."""
from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from typing import Generic, TypeVar

Key = TypeVar("Key", bound=Hashable)


class SlotMap(Generic[Key]):
    """Keys to small integers in [0, capacity).

    A key that leaves keeps its slot until ``releasable(slot)`` says nothing
    still refers to it (no open connection, no worker still on an older
    image); only then is the slot given to a new key.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._slots: dict[Key, int] = {}
        self._retired: dict[Key, int] = {}

    def slot_of(self, key: Key) -> int:
        return self._slots[key]

    def copy(self) -> SlotMap[Key]:
        other: SlotMap[Key] = SlotMap(self.capacity)
        other._slots, other._retired = dict(self._slots), dict(self._retired)
        return other

    def assign(self, keys: Iterable[Key], releasable: Callable[[int], bool]) -> list[int]:
        """Make ``keys`` the current set; ValueError if they do not fit.
        Returns the slots given to keys that had none: their owner starts
        afresh there (the caller resets whatever the slot counts)."""
        wanted = dict.fromkeys(keys)  # ordered, and O(1) membership
        # Keys retired by an earlier call may be released now; the ones this
        # call retires are still in the image that workers hold.
        for key in list(self._retired):
            if key in wanted:
                self._slots[key] = self._retired.pop(key)
            elif releasable(self._retired[key]):
                del self._retired[key]
        for key in list(self._slots):
            if key not in wanted:
                self._retired[key] = self._slots.pop(key)
        used = set(self._slots.values()) | set(self._retired.values())
        free = (s for s in range(self.capacity) if s not in used)
        fresh = []
        for key in wanted:
            if key not in self._slots:
                slot = next(free, None)
                if slot is None:
                    raise ValueError(f"more than {self.capacity} slots in use")
                self._slots[key] = slot
                fresh.append(slot)
        return fresh
