# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Power of two choices: two random candidates, the less loaded one wins.

Candidates are drawn uniformly from the WRR schedule, where each backend
appears in proportion to its weight, so the draw is weighted in O(1); the
comparison uses node-wide active counts scaled by weight. The second draw
avoids the first backend, so there is a real choice whenever two exist.

Slow start thins the draws of a ramping backend: a draw that lands on it is
declined with probability 1 - f (context.pxd ``ramp_draw_declines``) and
drawn again, so each candidate is the ramping backend w·f / (the others' weights
+ w·f) of the time, and its picks are thinned by f. With long-lived
connections it still fills up to the others' load (the comparison favours
it meanwhile), at the rate f allows. A draw of a ramping backend in the
common pass hands the pick to ``pick_ramping`` (RAMP_MET), so a pick that
draws none costs one load more, not a call.
"""
from libc.stdint cimport uint32_t, uint64_t, int64_t
from lbcore.includes.layout cimport FLC_MAX_BACKENDS, flc_load_i64
from lbcore.balance.context cimport (
    RAMP_MET, PickContext, excluded_or_ramping, next_random, ramp_draw_declines, scan_for_any, table_in_pool,
)

cdef enum:
    DRAWS = 16   # bound on draws when retries exclude most of a small pool


cdef inline int draw(PickContext *ctx, uint32_t offset, uint32_t length, int other) noexcept nogil:
    # the common pass: a ramping row drawn hands the pick to pick_ramping
    cdef int i
    cdef uint32_t row, start = 0
    for i in range(DRAWS):
        row = ctx.table[offset + <uint32_t>(next_random(ctx) % length)]
        if <int>row == other or excluded_or_ramping(ctx, row, &start):
            continue
        if start == 0:
            return <int>row
        ctx.ramp_row, ctx.ramp_start = <int>row, start
        return RAMP_MET
    return -1


cdef inline int draw_thinned(PickContext *ctx, uint32_t offset, uint32_t length, int other) noexcept nogil:
    cdef int i
    cdef uint32_t row, start = 0
    for i in range(DRAWS):
        row = ctx.table[offset + <uint32_t>(next_random(ctx) % length)]
        if <int>row == other or excluded_or_ramping(ctx, row, &start):
            continue
        if start == 0 or not ramp_draw_declines(ctx, start):
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
        ctx.ramp_first = -1
        return a
    if a < 0:
        return scan_for_any(ctx, <uint32_t>next_random(ctx))
    b = draw(ctx, offset, length, a)
    if b == RAMP_MET:
        ctx.ramp_first = a
        return b
    if b < 0:
        return a
    return less_loaded(ctx, a, b)


cdef int pick_ramping(PickContext *ctx) noexcept nogil:
    """The pick after ``pick`` drew a ramping row: that draw decided (kept
    with probability f), then the draws go on where ``pick`` stopped, each
    ramping row drawn thinned. (Drawing again from the start would bias:
    only picks that met a ramping row would come here.)"""
    cdef uint32_t offset = ctx.service.schedule_offset
    cdef uint32_t length = ctx.service.schedule_len
    cdef int a = ctx.ramp_first, b
    cdef bint kept = not ramp_draw_declines(ctx, ctx.ramp_start)
    if not table_in_pool(offset, length):
        return -1
    if a < 0:
        a = ctx.ramp_row if kept else draw_thinned(ctx, offset, length, -1)
        if a < 0:
            return scan_for_any(ctx, <uint32_t>next_random(ctx))
        b = draw_thinned(ctx, offset, length, a)
    else:
        b = ctx.ramp_row if kept else draw_thinned(ctx, offset, length, a)
    if b < 0:
        return a
    return less_loaded(ctx, a, b)
