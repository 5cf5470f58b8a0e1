# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Power of two choices: two random candidates, the less loaded one wins.

Candidates are drawn uniformly from the WRR schedule, where each backend
appears in proportion to its weight, so the draw is weighted in O(1); the
comparison uses node-wide active counts scaled by weight. The second draw
avoids the first backend, so there is a real choice whenever two exist.

Slow start: a ramping backend is only ever the first candidate, and its
draw is thinned: declined with probability 1 - f (context.pxd
``ramp_draw_declines``) and drawn again, so it is the first candidate
w·f / (the others' weights + w·f) of the time; the second candidate is
drawn among the backends not ramping. It so takes Envoy's effective share
whatever the loads (with loads, as the second candidate too it would win
nearly every comparison it is in, its share twice the formula's, being the
least loaded); with long-lived connections it fills up at the rate f allows.
A ramping first draw in the common pass hands the pick to ``pick_ramping``
(RAMP_MET), so a pick that draws none costs one load more, not a call.
"""
from libc.stdint cimport uint32_t, uint64_t, int64_t
from lbcore.includes.layout cimport FLC_MAX_BACKENDS, flc_load_i64
from lbcore.balance.context cimport (
    RAMP_MET, PickContext, excluded_or_ramping, next_random, ramp_draw_declines, scan_for_any, still_ramping,
    table_in_pool,
)

cdef enum:
    DRAWS = 16   # bound on draws when retries exclude most of a small pool


cdef inline int draw(PickContext *ctx, uint32_t offset, uint32_t length, int other) noexcept nogil:
    # The common pass's first draw: a ramping row hands the pick to pick_ramping.
    cdef int i
    cdef uint32_t row, start = 0
    for i in range(DRAWS):
        row = ctx.table[offset + <uint32_t>(next_random(ctx) % length)]
        if <int>row == other or excluded_or_ramping(ctx, row, &start):
            continue
        if not still_ramping(ctx, start):
            return <int>row
        ctx.ramp_row, ctx.ramp_start = <int>row, start
        return RAMP_MET
    return -1


cdef inline int draw_steady(PickContext *ctx, uint32_t offset, uint32_t length, int other) noexcept nogil:
    # The second candidate: never a ramping row.
    cdef int i
    cdef uint32_t row, start = 0
    for i in range(DRAWS):
        row = ctx.table[offset + <uint32_t>(next_random(ctx) % length)]
        if <int>row == other or excluded_or_ramping(ctx, row, &start) or still_ramping(ctx, start):
            continue
        return <int>row
    return -1


cdef inline int draw_thinned(PickContext *ctx, uint32_t offset, uint32_t length) noexcept nogil:
    # The first candidate in the ramping pass: each ramping row drawn thinned.
    cdef int i
    cdef uint32_t row, start = 0
    for i in range(DRAWS):
        row = ctx.table[offset + <uint32_t>(next_random(ctx) % length)]
        if excluded_or_ramping(ctx, row, &start):
            continue
        if not still_ramping(ctx, start) or not ramp_draw_declines(ctx, start):
            return <int>row
    return -1


cdef inline int64_t load_of(PickContext *ctx, int row) noexcept nogil:
    cdef int64_t active = flc_load_i64(&ctx.counters[ctx.backends[row].slot % FLC_MAX_BACKENDS].active)
    return active if active > 0 else 0


cdef inline int less_loaded(PickContext *ctx, int a, int b) noexcept nogil:
    # (active_a + 1) / w_a <= (active_b + 1) / w_b, without division
    if (load_of(ctx, a) + 1) * ctx.backends[b].weight <= (load_of(ctx, b) + 1) * ctx.backends[a].weight:
        return a
    return b


cdef int pick(PickContext *ctx) noexcept nogil:
    cdef uint32_t offset = ctx.service.schedule_offset
    cdef uint32_t length = ctx.service.schedule_len
    cdef int a, b
    if not table_in_pool(offset, length):
        return -1
    a = draw(ctx, offset, length, -1)
    if a == RAMP_MET:
        return a
    if a < 0:
        return scan_for_any(ctx, <uint32_t>next_random(ctx))
    return second(ctx, offset, length, a)


cdef int pick_ramping(PickContext *ctx) noexcept nogil:
    """The pick after ``pick`` drew a ramping first candidate: that draw
    decided (kept with probability f), else the first candidate drawn again
    thinned; then the second as ever. (Drawing the whole pick again would
    bias: only picks that met a ramping row would come here.)"""
    cdef uint32_t offset = ctx.service.schedule_offset
    cdef uint32_t length = ctx.service.schedule_len
    cdef int a
    if not table_in_pool(offset, length):
        return -1
    a = ctx.ramp_row if not ramp_draw_declines(ctx, ctx.ramp_start) else draw_thinned(ctx, offset, length)
    if a < 0:
        return scan_for_any(ctx, <uint32_t>next_random(ctx))
    return second(ctx, offset, length, a)


cdef inline int second(PickContext *ctx, uint32_t offset, uint32_t length, int a) noexcept nogil:
    cdef int b = draw_steady(ctx, offset, length, a)
    if b < 0:
        return a
    return less_loaded(ctx, a, b)
