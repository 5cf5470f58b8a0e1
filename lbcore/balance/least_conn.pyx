# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Weighted least connections over the node-wide shared counters.

The scan reads every worker's connections (counters live in shared memory).
It reports the count it saw in ``ctx.observed_active``; the worker claims the
backend with a compare-and-swap on that count, and scans again if another
worker got there first, so two workers never both take the same least-loaded
backend. Ties go to the backend after the one picked last (a shared cursor),
so equal backends fill evenly.
"""
from libc.stdint cimport uint32_t, uint64_t, int64_t
from lbcore.includes.layout cimport FLC_MAX_BACKENDS, flc_load_i64, flc_fetch_inc_u64
from lbcore.balance.pick cimport PickContext, is_excluded


cdef int pick(PickContext *ctx) noexcept nogil:
    cdef uint32_t first = ctx.service.backend_first
    cdef uint32_t count = ctx.service.backend_count
    cdef uint32_t start, i, row
    cdef int best = -1
    cdef int64_t active, best_active = 0
    cdef uint64_t weight, best_weight = 1
    if first >= FLC_MAX_BACKENDS or count > FLC_MAX_BACKENDS - first or count == 0:
        return -1
    start = <uint32_t>(flc_fetch_inc_u64(&ctx.service_state.rr_cursor) % count)
    for i in range(count):
        row = first + (start + i) % count
        weight = ctx.backends[row].weight
        if not ctx.backends[row].eligible or weight == 0 or is_excluded(ctx, row):
            continue
        active = flc_load_i64(&ctx.counters[ctx.backends[row].slot % FLC_MAX_BACKENDS].active)
        if active < 0:
            active = 0
        # (active + 1) / weight < (best_active + 1) / best_weight
        if best < 0 or <uint64_t>(active + 1) * best_weight < <uint64_t>(best_active + 1) * weight:
            best = <int>row
            best_active = active
            best_weight = weight
    ctx.observed_active = best_active
    return best
