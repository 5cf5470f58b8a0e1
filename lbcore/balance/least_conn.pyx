# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Weighted least connections over the node-wide shared counters.

The scan reads every worker's connections (counters live in shared memory).
It reports the raw count it saw in ``ctx.observed_active``; the worker claims
the backend with a compare-and-swap on that count, and scans again if another
worker got there first, so two workers never both take the same least-loaded
backend. Ties rotate with a per-worker cursor, so equal backends fill evenly
without a shared cache line written on every pick.
"""
from libc.stdint cimport uint32_t, uint64_t, int64_t
from lbcore.includes.layout cimport FLC_MAX_BACKENDS, flc_load_i64
from lbcore.balance.context cimport PickContext, is_excluded, row_is_eligible


cdef int pick(PickContext *ctx) noexcept nogil:
    cdef uint32_t first = ctx.service.backend_first
    cdef uint32_t count = ctx.service.backend_count
    cdef uint32_t start, i, row
    cdef int best = -1
    cdef int64_t raw, active, best_active = 0, best_raw = 0
    cdef uint64_t weight, best_weight = 1
    if first >= FLC_MAX_BACKENDS or count > FLC_MAX_BACKENDS - first or count == 0:
        return -1
    start = <uint32_t>(ctx.tiebreak % count)
    ctx.tiebreak += 1
    for i in range(count):
        row = first + (start + i) % count
        if not row_is_eligible(&ctx.backends[row]) or is_excluded(ctx, row):
            continue
        weight = ctx.backends[row].weight
        raw = flc_load_i64(&ctx.counters[ctx.backends[row].slot % FLC_MAX_BACKENDS].active)
        active = raw if raw > 0 else 0  # a count can dip below 0 around a worker's death
        # (active + 1) / weight < (best_active + 1) / best_weight
        if best < 0 or <uint64_t>(active + 1) * best_weight < <uint64_t>(best_active + 1) * weight:
            best = <int>row
            best_active = active
            best_raw = raw
            best_weight = weight
    ctx.observed_active = best_raw
    return best
