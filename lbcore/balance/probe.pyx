# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Run the compiled picks from Python, for tests and micro benchmarks.

Picks read a real image in a real segment, exactly as a worker does;
``hold`` counts each pick as an open connection (what a worker's claim does),
so least-connections sees its own earlier picks.
"""
import time

import numpy as np
from libc.stdint cimport uint8_t, uint32_t, uint64_t, int64_t, uintptr_t
from lbcore.includes.layout cimport *
from lbcore.balance.context cimport MAX_EXCLUDED, MAX_PICK_EXCLUDED, PickContext
from lbcore.balance.pick cimport CLAIM_FULL, CLAIMED, claim_backend, pick_backend, pick_with_panic


cdef bint context_of(PickContext *ctx, uintptr_t base, uint32_t service_slot) noexcept nogil:
    """The context a worker fills for a connection of the service in
    ``service_slot``, on the segment's current image; False: no such service."""
    cdef void *segment = <void *>base
    cdef flc_image_header *snap = flc_buffer_of(segment, flc_load_acquire_u64(
        &flc_control_of(segment).generation))
    if service_slot >= snap.n_services:
        return False
    ctx.snap = snap
    ctx.service = &flc_services_of(snap)[service_slot]
    ctx.backends = flc_backends_of(snap)
    ctx.table = flc_table_of(snap)
    ctx.counters = flc_counters_of(segment)
    ctx.service_state = &flc_service_states_of(segment)[service_slot]
    ctx.panic = False
    return True


def monotonic_ms():
    """The clock of ejected_until_ms (CLOCK_MONOTONIC), in ms."""
    return time.monotonic_ns() // 1_000_000


def picks(uintptr_t base, uint32_t service_slot, Py_ssize_t n, client_hashes=None,
          bint hold=False, excluded_slots=(), uint64_t seed=12345, now_ms=None, bint panic=False):
    """Rows picked for ``n`` connections of the service in slot
    ``service_slot``, at ``now_ms`` (default: now) for ejections. ``panic``:
    each pick as the worker makes it (pick_with_panic); then returns (rows,
    whether each was a panic's), else rows."""
    cdef PickContext ctx
    cdef flc_counter *counters = flc_counters_of(<void *>base)
    cdef Py_ssize_t i
    cdef int row
    cdef uint32_t slot
    cdef int64_t[::1] out
    cdef uint8_t[::1] panicked
    cdef uint32_t[::1] hashes
    result = np.full(n, -1, dtype=np.int64)
    out = result
    panics = np.zeros(n, dtype=np.uint8)
    panicked = panics
    hashes = np.zeros(n, dtype=np.uint32) if client_hashes is None else \
        np.ascontiguousarray(client_hashes, dtype=np.uint32)
    if not context_of(&ctx, base, service_slot):
        raise ValueError(f"no service in slot {service_slot}")
    ctx.rng = seed | 1
    ctx.tiebreak = 0
    ctx.now_ms = monotonic_ms() if now_ms is None else now_ms
    ctx.n_excluded = min(len(excluded_slots), MAX_EXCLUDED)
    for i, slot in enumerate(excluded_slots[:MAX_EXCLUDED]):
        ctx.excluded[i] = slot
    with nogil:
        for i in range(n):
            ctx.client_hash = hashes[i]
            ctx.observed_active = -1
            if panic:
                row = pick_with_panic(&ctx)
                panicked[i] = ctx.panic
            else:
                row = pick_backend(&ctx)
            out[i] = row
            if hold and row >= 0:
                flc_add_i64(&counters[ctx.backends[row].slot].active, 1)
    return (result, panics.astype(bool)) if panic else result


def hash_address(uint32_t ip_network_order):
    """The worker's hash of a client address, for tests."""
    return flc_hash_address(ip_network_order)


def notice_loop(uintptr_t base, Py_ssize_t n):
    """What a worker does per accept to notice a new image: an atomic load
    of the generation and a compare. Returns how many changes it saw."""
    cdef flc_control *control = flc_control_of(<void *>base)
    cdef uint64_t held = flc_load_acquire_u64(&control.generation)
    cdef uint64_t now
    cdef Py_ssize_t i, changes = 0
    with nogil:
        for i in range(n):
            now = flc_load_acquire_u64(&control.generation)
            if now != held:
                held = now
                changes += 1
    return changes


def read_backends_under_seqlock(uintptr_t base, Py_ssize_t reads, uint8_t[:, ::1] out):
    """Read the current buffer's backend table ``reads`` times the way a
    worker reads an image: seqlock begin, copy, validate. The buffer pointer
    is taken once per read, so a publisher that laps the reader rewrites the
    very bytes being copied. Copies that validated go to ``out`` (one row each,
    the first ``out.shape[1]`` bytes of the table). Returns (validated, torn)."""
    cdef void *segment = <void *>base
    cdef flc_control *control = flc_control_of(segment)
    cdef flc_image_header *snap
    cdef const uint8_t *rows
    cdef uint64_t seq
    cdef Py_ssize_t i, j, width = out.shape[1], validated = 0, torn = 0
    with nogil:
        for i in range(reads):
            snap = flc_buffer_of(segment, flc_load_acquire_u64(&control.generation))
            seq = flc_read_begin(snap)
            rows = <const uint8_t *>flc_backends_of(snap)
            for j in range(width):
                out[validated, j] = rows[j]
            if flc_read_validate(snap, seq):
                validated += 1
            else:
                torn += 1
            if validated == out.shape[0]:
                break
    return validated, torn


def claim_with_a_rival(uintptr_t base, uint32_t service_slot, bint rival):
    """One worker's least_conn pick and claim, as choose_backend makes them,
    with (``rival``) another worker's claim of the same backend landing
    between the scan and the compare-and-swap. Returns (first row, claimed,
    row of the scan again or -1, claimed then)."""
    cdef PickContext ctx
    cdef int row, again = -1
    cdef bint claimed, claimed_again = False
    if not context_of(&ctx, base, service_slot):
        raise ValueError(f"no service in slot {service_slot}")
    ctx.rng = 1
    ctx.tiebreak = 0
    ctx.n_excluded = 0
    ctx.observed_active = -1
    ctx.now_ms = monotonic_ms()
    row = pick_backend(&ctx)
    if row < 0:
        return row, False, -1, False
    if rival:
        flc_add_i64(&ctx.counters[ctx.backends[row].slot].active, 1)
    claimed = claim_backend(&ctx, ctx.backends[row].slot, ctx.backends[row].max_conns, True) == CLAIMED
    if not claimed:
        ctx.observed_active = -1
        again = pick_backend(&ctx)
        if again >= 0:
            claimed_again = claim_backend(&ctx, ctx.backends[again].slot, ctx.backends[again].max_conns,
                                          True) == CLAIMED
    return row, claimed, again, claimed_again


def hammer(uintptr_t base, uint32_t service_slot, Py_ssize_t rounds, Py_ssize_t hold, uintptr_t held_address,
           uint64_t seed=1):
    """``rounds`` times: pick and claim (within max_conns) ``hold``
    connections as a worker does (a claim found full is picked again
    without that slot), count each claim kept in ``held`` (an int64 per
    slot, shared by every caller at once), then drop them all. Runs without
    the GIL, so callers in threads race for real. Returns (claims kept,
    claims found full, most held at once in one slot)."""
    cdef PickContext ctx
    cdef int64_t *held = <int64_t *>held_address
    cdef int claimed_rows[64]
    cdef Py_ssize_t i, k, j, claims = 0, full = 0
    cdef int64_t most = 0, now_held
    cdef int row, attempt, result, n_claimed
    cdef uint32_t slot
    if hold > 64:
        raise ValueError("hold at most 64")
    if not context_of(&ctx, base, service_slot):
        raise ValueError(f"no service in slot {service_slot}")
    ctx.rng = seed | 1
    ctx.tiebreak = seed
    ctx.now_ms = monotonic_ms()
    with nogil:
        for i in range(rounds):
            n_claimed = 0
            for k in range(hold):
                ctx.n_excluded = 0
                for attempt in range(16):
                    ctx.observed_active = -1
                    row = pick_with_panic(&ctx)
                    if row < 0:
                        break
                    slot = ctx.backends[row].slot
                    result = claim_backend(&ctx, slot, ctx.backends[row].max_conns,
                                           ctx.service.algorithm == FLC_ALGO_LEAST_CONN and attempt < 8)
                    if result == CLAIMED:
                        now_held = flc_add_fetch_i64(&held[slot], 1)
                        if now_held > most:
                            most = now_held
                        claimed_rows[n_claimed] = <int>slot
                        n_claimed += 1
                        claims += 1
                        break
                    if result == CLAIM_FULL:
                        full += 1
                        if ctx.n_excluded < MAX_PICK_EXCLUDED:
                            ctx.excluded[ctx.n_excluded] = slot
                            ctx.n_excluded += 1
            for j in range(n_claimed):
                flc_add_i64(&held[claimed_rows[j]], -1)
                flc_add_i64(&ctx.counters[claimed_rows[j]].active, -1)
    return claims, full, most
