"""Stable slots: counters stay with their backend across snapshot versions."""
from __future__ import annotations

import pytest

from lbcore.slots import SlotMap


def test_keys_keep_their_slots_across_assignments():
    slots: SlotMap[str] = SlotMap(8)
    slots.assign(["a", "b", "c"], lambda s: True)
    before = {k: slots.slot_of(k) for k in "abc"}
    slots.assign(["c", "d", "a"], lambda s: True)
    assert slots.slot_of("a") == before["a"] and slots.slot_of("c") == before["c"]
    assert slots.slot_of("d") not in (before["a"], before["c"])


def test_a_retired_slot_is_not_reused_while_still_referenced():
    slots: SlotMap[str] = SlotMap(2)
    slots.assign(["a", "b"], lambda s: True)
    a = slots.slot_of("a")
    busy = {a}
    slots.assign(["b"], lambda s: s not in busy)
    with pytest.raises(ValueError):
        slots.assign(["b", "c"], lambda s: s not in busy)  # a's slot still held
    busy.clear()
    slots.assign(["b", "c"], lambda s: s not in busy)
    assert slots.slot_of("c") == a


def test_a_key_that_comes_back_before_release_gets_its_slot_back():
    slots: SlotMap[str] = SlotMap(4)
    slots.assign(["a", "b"], lambda s: True)
    a = slots.slot_of("a")
    slots.assign(["b"], lambda s: False)
    slots.assign(["a", "b"], lambda s: False)
    assert slots.slot_of("a") == a
