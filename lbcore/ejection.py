"""Passive ejection as the node agent and ``lbproxy stats`` see it.

The workers decide ejections themselves, node-local and immediate
(lbcore/worker.pyx: ``note_failure``, ``try_eject``): a backend slot's
connect failures in a row reach its service's ``consecutive_failures``, and
the slot is skipped by every pick until its ``ejected_until_ms``, within
``max_ejection_percent`` of the service (past it: panic, counted per
service). This module reads that state and writes the two things the agent
owns: ``local_down`` (the node's own probe verdict, skipped by picks the
same way) and the ejection lock of a worker that died holding it.

State lives in the segment (``flc_counter``, ``flc_service_state``): read
through the segment's numpy views, written through the compiled atomics.
``ejected_until_ms`` is CLOCK_MONOTONIC in ms, the clock of
``time.monotonic_ns``.
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np

from lbcore import layout
from lbcore._layout import ffi, lib
from lbcore.image import Image
from lbcore.segment import Segment


def monotonic_ms() -> int:
    """Now, on the clock of ``ejected_until_ms``."""
    return time.monotonic_ns() // 1_000_000


def _active_services(image: Image) -> list[tuple[int, Any]]:
    return [(slot, row) for slot, row in enumerate(image.services) if row["active"]]


def ejected(segment: Segment, image: Image, now_ms: int | None = None) -> dict[str, dict[str, int]]:
    """Service -> backend id -> ms of ejection left, for the backends of
    ``image`` ejected at ``now_ms`` (default: now); services with none
    ejected are left out."""
    now = monotonic_ms() if now_ms is None else now_ms
    until_of_slot = segment.counters["ejected_until_ms"]
    out: dict[str, dict[str, int]] = {}
    for _slot, row in _active_services(image):
        first, count = int(row["backend_first"]), int(row["backend_count"])
        rows = image.backends[first:first + count]
        left = until_of_slot[rows["slot"]].astype(np.int64) - now
        out_now = left > 0
        if out_now.any():
            ids, ms_left = rows["id"][out_now].tolist(), left[out_now].tolist()
            out[row["name"].decode()] = {i.decode(): int(ms) for i, ms in zip(ids, ms_left, strict=True)}
    return out


def panics(segment: Segment, image: Image) -> dict[str, int]:
    """Service -> connections routed in panic (every backend left was
    ejected or down here), for every service of ``image``."""
    return {row["name"].decode(): int(segment.service_states[slot]["panics"])
            for slot, row in _active_services(image)}


def set_local_down(segment: Segment, slot: int, down: bool) -> None:
    """Hold the backend in counter ``slot`` down on this node (its own probe
    verdict; picks skip it as they skip an ejected one), or let it go.
    Precondition: the caller is the node agent."""
    if not 0 <= slot < layout.MAX_BACKENDS:
        raise ValueError(f"backend slot {slot} out of range")
    lib.flc_store_u32(ffi.addressof(segment.counter_ptr(slot), "local_down"), 1 if down else 0)


def release_eject_locks(segment: Segment, worker_index: int) -> int:
    """Free the ejection locks the worker ``worker_index`` held when it died
    (a live worker holds one only for the few reads of one decision).
    Returns how many it held. Precondition: that worker is gone."""
    if not 0 <= worker_index < layout.MAX_WORKERS:
        raise ValueError(f"worker index {worker_index} out of range")
    holder = worker_index + 1
    states = ffi.cast("flc_service_state *", segment.base_pointer + layout.OFF_SERVICE_STATE)
    released = 0
    for slot in np.flatnonzero(segment.service_states["eject_lock"] == holder).tolist():
        released += bool(lib.flc_cas_u32(ffi.addressof(states[slot], "eject_lock"), holder, 0))
    return released
