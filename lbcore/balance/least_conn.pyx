# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Weighted least connections over the node-wide shared counters.

The scan reads every worker's connections (counters live in shared memory).
It reports the raw count it saw in ``ctx.observed_active``; the worker claims
the backend with a compare-and-swap on that count, and scans again if another
worker got there first, so two workers never both take the same least-loaded
backend. Ties rotate with a per-worker cursor, so equal backends fill evenly
without a shared cache line written on every pick.

Slow start thins the picks a ramping backend would win: the scan's best,
when ramping, is declined with probability 1 - f (context.pxd
``ramp_declines``), and the pick scans again without it from a random
start (from the next row, its successor would take every declined tie).
Among equal loads it so takes f times the share it would have had; with
long-lived connections it fills up to the others' count at the rate f
allows, not at once. A scan that finds nothing but declined rows takes the
declined one: serving beats ramping.
"""
from libc.stdint cimport uint32_t, uint64_t, int64_t
from lbcore.includes.layout cimport FLC_MAX_BACKENDS, flc_backend, flc_load_i64
from lbcore.balance.context cimport (
    PickContext, at_limit, is_held_out, next_random, ramp_declines, row_is_eligible, slot_tried,
)

cdef enum:
    RAMP_RESCANS = 4   # ramping rows declined in one pick at most; the next best is then taken as it is


cdef inline bint declined_before(const int *declined, int n, uint32_t row) noexcept nogil:
    cdef int i
    for i in range(n):
        if declined[i] == <int>row:
            return True
    return False


cdef inline uint32_t random_start(PickContext *ctx, uint32_t first, uint32_t count,
                                  const int *declined, int n_declined) noexcept nogil:
    # a start on a declined row would hand its ties to the row after it
    cdef uint32_t start = 0
    cdef int tries
    for tries in range(4):
        start = <uint32_t>(next_random(ctx) % count)
        if not declined_before(declined, n_declined, first + start):
            break
    return start


cdef int scan(PickContext *ctx, uint32_t first, uint32_t count, uint32_t start,
              const int *declined, int n_declined, int64_t *observed) noexcept nogil:
    """The least loaded row by (active + 1) / weight, from ``start`` on;
    ``observed``: the raw count seen of the row returned."""
    cdef uint32_t i, row
    cdef const flc_backend *b
    cdef int best = -1
    cdef int64_t raw, active, best_active = 0, best_raw = 0
    cdef uint64_t weight, best_weight = 1
    for i in range(count):
        row = first + (start + i) % count
        b = &ctx.backends[row]
        if not row_is_eligible(b) or slot_tried(ctx, b.slot) or (not ctx.panic and is_held_out(ctx, b.slot)):
            continue
        if n_declined and declined_before(declined, n_declined, row):
            continue
        weight = b.weight
        raw = flc_load_i64(&ctx.counters[b.slot % FLC_MAX_BACKENDS].active)
        if at_limit(b.max_conns, raw):  # (is_excluded's is_full, on the count read here anyway)
            continue
        active = raw if raw > 0 else 0  # a count can dip below 0 around a worker's death
        # (active + 1) / weight < (best_active + 1) / best_weight
        if best < 0 or <uint64_t>(active + 1) * best_weight < <uint64_t>(best_active + 1) * weight:
            best = <int>row
            best_active = active
            best_raw = raw
            best_weight = weight
    observed[0] = best_raw
    return best


cdef int pick(PickContext *ctx) noexcept nogil:
    cdef uint32_t first = ctx.service.backend_first
    cdef uint32_t count = ctx.service.backend_count
    cdef int best, again
    cdef int declined[RAMP_RESCANS]
    cdef int n_declined = 0
    cdef int64_t raw = 0, raw_again = 0
    if first >= FLC_MAX_BACKENDS or count > FLC_MAX_BACKENDS - first or count == 0:
        return -1
    best = scan(ctx, first, count, <uint32_t>(ctx.tiebreak % count), NULL, 0, &raw)
    ctx.tiebreak += 1
    while best >= 0 and n_declined < RAMP_RESCANS and ramp_declines(ctx, <uint32_t>best):
        declined[n_declined] = best
        n_declined += 1
        again = scan(ctx, first, count, random_start(ctx, first, count, declined, n_declined),
                     declined, n_declined, &raw_again)
        if again < 0:
            break
        best, raw = again, raw_again
    ctx.observed_active = raw
    return best
