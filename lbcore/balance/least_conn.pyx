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
``ramp_declines``). Tied with others (equal loads: short connections, the
common case), the pick is drawn again among them from a random start, the
declined one included, as wrr and p2c draw again: it so takes
f / (tied - 1 + f) of those picks, Envoy's effective weight. Alone the
least loaded (long-lived connections), the pick takes the next best, so it
fills up to the others' count at the rate f allows, not at once. A scan
that finds nothing but declined rows takes the declined one: serving beats
ramping.
"""
from libc.stdint cimport uint32_t, uint64_t, int64_t
from lbcore.includes.layout cimport FLC_MAX_BACKENDS, flc_backend, flc_load_i64
from lbcore.balance.context cimport (
    PickContext, at_limit, is_held_out, next_random, ramp_declines, row_is_eligible, slot_tried,
)

cdef enum:
    RAMP_ROUNDS = 8    # declines in one pick at most; the best is then taken as it is


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
              int64_t *observed) noexcept nogil:
    """The least loaded row by (active + 1) / weight, from ``start`` on;
    ``observed``: the raw count seen of the row returned."""
    cdef uint32_t ties
    return scan_body(ctx, first, count, start, NULL, 0, observed, &ties, False)


cdef int rescan(PickContext *ctx, uint32_t first, uint32_t count, uint32_t start,
                const int *declined, int n_declined, int64_t *observed, uint32_t *ties) noexcept nogil:
    """scan, the ``declined`` rows left out; ``ties``: the rows of the
    score found (itself included). Only after a decline: the common scan
    counts no ties."""
    return scan_body(ctx, first, count, start, declined, n_declined, observed, ties, True)


cdef inline int scan_body(PickContext *ctx, uint32_t first, uint32_t count, uint32_t start,
                          const int *declined, int n_declined, int64_t *observed, uint32_t *ties,
                          bint count_ties) noexcept nogil:
    cdef uint32_t i, row
    cdef const flc_backend *b
    cdef int best = -1
    cdef int64_t raw, active, best_active = 0, best_raw = 0
    cdef uint64_t weight, best_weight = 1, score, best_score
    cdef uint32_t n_ties = 0
    for i in range(count):
        row = first + (start + i) % count
        b = &ctx.backends[row]
        if not row_is_eligible(b) or slot_tried(ctx, b.slot) or (not ctx.panic and is_held_out(ctx, b.slot)):
            continue
        if count_ties and n_declined and declined_before(declined, n_declined, row):
            continue
        weight = b.weight
        raw = flc_load_i64(&ctx.counters[b.slot % FLC_MAX_BACKENDS].active)
        if at_limit(b.max_conns, raw):  # (is_excluded's is_full, on the count read here anyway)
            continue
        active = raw if raw > 0 else 0  # a count can dip below 0 around a worker's death
        # (active + 1) / weight < (best_active + 1) / best_weight
        score, best_score = <uint64_t>(active + 1) * best_weight, <uint64_t>(best_active + 1) * weight
        if best < 0 or score < best_score:
            best = <int>row
            best_active = active
            best_raw = raw
            best_weight = weight
            n_ties = 1
        elif count_ties and score == best_score:
            n_ties += 1
    observed[0] = best_raw
    ties[0] = n_ties
    return best


cdef int pick(PickContext *ctx) noexcept nogil:
    cdef uint32_t first = ctx.service.backend_first
    cdef uint32_t count = ctx.service.backend_count
    cdef uint32_t start, ties = 0, ties_again = 0
    cdef int best, again, rounds
    cdef int declined[RAMP_ROUNDS]
    cdef int n_declined = 0
    cdef int64_t raw = 0, raw_again = 0
    if first >= FLC_MAX_BACKENDS or count > FLC_MAX_BACKENDS - first or count == 0:
        return -1
    best = scan(ctx, first, count, <uint32_t>(ctx.tiebreak % count), &raw)
    ctx.tiebreak += 1
    for rounds in range(RAMP_ROUNDS):
        if best < 0 or not ramp_declines(ctx, <uint32_t>best):
            break
        if rounds == 0:  # the first scan's best: its ties counted now (a decline is rare)
            rescan(ctx, first, count, 0, NULL, 0, &raw_again, &ties)
        if ties > 1:
            start = <uint32_t>(next_random(ctx) % count)  # drawn again among the tied, itself too
        else:
            declined[n_declined] = best  # alone the least loaded: the next best
            n_declined += 1
            start = random_start(ctx, first, count, declined, n_declined)
        again = rescan(ctx, first, count, start, declined, n_declined, &raw_again, &ties_again)
        if again < 0:
            break
        best, raw, ties = again, raw_again, ties_again
    ctx.observed_active = raw
    return best
