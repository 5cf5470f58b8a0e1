# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Smooth weighted round robin with an O(1) pick.

The agent precomputes the schedule (``build_schedule``, below): each eligible
backend appears ``weight`` times, interleaved smoothly. Workers share one
cursor per service in shared memory, so the shares are exact across all
workers of a node, not only per worker.

Slow start thins a ramping backend's entries: each is declined with
probability 1 - f (context.pxd ``ramp_draw_declines``) and the cursor steps
on to the next entry, so a ramping backend of weight w takes w·f / (the
others' weights + w·f) of the connections, Envoy's effective weight. A
pick that finds only declined and excluded entries in its steps takes the
scan's row, ramping or not: serving beats ramping. The common pass stops
at the first ramping entry it meets (RAMP_MET) and ``pick_ramping`` goes
on from there, so a pick that meets none costs one load more, not a call.
"""
from libc.stdlib cimport calloc, free, malloc
from libc.stdint cimport int64_t, uint32_t, uint64_t
from lbcore.includes.layout cimport flc_backend, flc_fetch_inc_u64
from lbcore.balance.context cimport (
    RAMP_MET, PickContext, excluded_or_ramping, ramp_draw_declines, scan_for_any, still_ramping, table_in_pool,
)

cdef enum:
    STEPS = 32   # cursor steps before a scan, when retries or ejections exclude rows


cdef int pick(PickContext *ctx) noexcept nogil:
    cdef uint32_t offset = ctx.service.schedule_offset
    cdef uint32_t length = ctx.service.schedule_len
    cdef uint32_t tries, row, start = 0
    cdef uint64_t cursor = 0
    if not table_in_pool(offset, length):
        return -1
    # A retry or an ejection skips rows; the steps that find one left are
    # few unless a heavy backend is excluded (its entries fill the
    # schedule), or every row is: then, after STEPS, a walk of the rows
    # (each step is an atomic increment of a shared cursor).
    for tries in range(length if length < STEPS else STEPS):
        cursor = flc_fetch_inc_u64(&ctx.service_state.rr_cursor)
        row = ctx.table[offset + <uint32_t>(cursor % length)]
        if excluded_or_ramping(ctx, row, &start):
            continue
        if not still_ramping(ctx, start):
            return <int>row
        ctx.ramp_row, ctx.ramp_start = <int>row, start  # pick_ramping decides on it and steps on
        return RAMP_MET
    # (also when L <= STEPS: other workers' steps move the cursor meanwhile)
    return scan_for_any(ctx, <uint32_t>cursor)


cdef int pick_ramping(PickContext *ctx) noexcept nogil:
    """The pick after ``pick`` met a ramping entry: that entry, then the next
    ones, each ramping one thinned (the same steps, with the draw)."""
    cdef uint32_t offset = ctx.service.schedule_offset
    cdef uint32_t length = ctx.service.schedule_len
    cdef uint32_t tries, row, start = 0
    cdef uint64_t cursor = 0
    if not ramp_draw_declines(ctx, ctx.ramp_start):
        return ctx.ramp_row
    if not table_in_pool(offset, length):
        return -1
    for tries in range(length if length < STEPS else STEPS):
        cursor = flc_fetch_inc_u64(&ctx.service_state.rr_cursor)
        row = ctx.table[offset + <uint32_t>(cursor % length)]
        if excluded_or_ramping(ctx, row, &start):
            continue
        if start == 0 or not ramp_draw_declines(ctx, start):
            return <int>row
    return scan_for_any(ctx, <uint32_t>cursor)


# Schedules are built by counting the reduced weights: a weight (divided by
# the gcd) past this is refused; a backend row holds a 16-bit weight
# (flc_backend.weight), and config.MAX_WEIGHT keeps it far lower.
cdef int64_t MAX_REDUCED = 1 << 16


cdef inline bint _earlier(int64_t k_a, int64_t w_a, int64_t k_b, int64_t w_b) noexcept nogil:
    # deadlines (2k + 1) / 2w compared exactly, by cross-multiplying
    return (2 * k_a + 1) * w_b < (2 * k_b + 1) * w_a


cdef inline bint _same_time(int64_t k_a, int64_t w_a, int64_t k_b, int64_t w_b) noexcept nogil:
    return (2 * k_a + 1) * w_b == (2 * k_b + 1) * w_a


cdef Py_ssize_t _merge_due(const uint32_t *owners, const Py_ssize_t *end, Py_ssize_t *cursor,
                           Py_ssize_t n_due, uint32_t *out) noexcept nogil:
    """The owners of groups due at the same time, merged by position; the
    last group left is copied whole."""
    cdef Py_ssize_t written = 0, j, best, left
    while True:
        best, left = -1, 0
        for j in range(n_due):
            if cursor[j] < end[j]:
                left += 1
                if best < 0 or owners[cursor[j]] < owners[cursor[best]]:
                    best = j
        if left <= 1:
            break
        out[written] = owners[cursor[best]]
        written += 1
        cursor[best] += 1
    if best >= 0:
        for j in range(cursor[best], end[best]):
            out[written] = owners[j]
            written += 1
    return written


cdef Py_ssize_t _fill(const uint32_t *owners, const Py_ssize_t *group_start, const int64_t *group_weight,
                      Py_ssize_t groups, int64_t *turn, Py_ssize_t *scratch, uint32_t *out) noexcept nogil:
    """Backends of one reduced weight share their deadlines, so the
    schedule is a walk over each group's turns in deadline order: the
    owners of the groups due next, merged by position. O(S + E * G) for S
    entries, E distinct deadlines and G distinct weights (weights are few)."""
    cdef Py_ssize_t written = 0, g, n_due, first
    cdef Py_ssize_t *cursor = scratch
    cdef Py_ssize_t *end = scratch + groups
    cdef Py_ssize_t *due = scratch + 2 * groups
    while True:
        first = -1
        for g in range(groups):  # the earliest deadline among the groups with turns left
            if turn[g] < group_weight[g] and (first < 0 or _earlier(turn[g], group_weight[g],
                                                                   turn[first], group_weight[first])):
                first = g
        if first < 0:
            return written
        n_due = 0
        for g in range(groups):
            if turn[g] < group_weight[g] and _same_time(turn[g], group_weight[g],
                                                       turn[first], group_weight[first]):
                due[n_due], cursor[n_due], end[n_due] = g, group_start[g], group_start[g + 1]
                n_due += 1
        written += _merge_due(owners, end, cursor, n_due, out + written)
        for g in range(n_due):
            turn[due[g]] += 1


cdef inline int64_t _reduced(int64_t weight, int64_t g) noexcept nogil:
    return weight if g == 1 else weight // g


cdef int64_t _gcd(int64_t a, int64_t b) noexcept nogil:
    while b:
        a, b = b, a % b
    return a


def build_schedule(weights):
    """Positions into ``weights`` (a uint32 array): each i appears
    weights[i] / g times (g the gcd of the positive weights), interleaved
    smoothly by earliest deadline: the k-th turn of i is due at
    (k + 1/2) / (weights[i] / g), ties to the lower position."""
    import numpy as np  # here, not at import: workers load this module too
    return _schedule(np.ascontiguousarray(weights, dtype=np.int64))


def schedule_of_rows(rows):
    """(schedule, eligible count) of one service's backend rows (a
    contiguous layout.BACKEND array): build_schedule of each row's weight,
    0 for a row not eligible, read straight from the rows."""
    import numpy as np
    if rows.dtype.itemsize != sizeof(flc_backend) or not rows.flags.c_contiguous:
        raise ValueError("rows must be a contiguous array of layout.BACKEND")
    cdef Py_ssize_t i, n = len(rows), eligible = 0
    if n == 0:
        return np.empty(0, dtype=np.uint32), 0
    weights = np.empty(n, dtype=np.int64)
    cdef int64_t[::1] w = weights
    cdef const unsigned char[::1] raw = rows.view(np.uint8)
    cdef const flc_backend *row = <const flc_backend *>&raw[0]
    with nogil:
        for i in range(n):
            w[i] = row[i].weight if row[i].eligible else 0
            eligible += row[i].eligible != 0
    return _schedule(weights), eligible


def _schedule(int64_t[::1] w):
    """build_schedule of int64 weights. Its scratch comes from malloc, not
    numpy: a node builds one per version it applies."""
    import numpy as np
    cdef Py_ssize_t n = w.shape[0], total = 0, groups, at
    cdef int64_t g = 0, top = 0
    if n:
        _gcd_and_top(&w[0], n, &g, &top)
    if g == 0:
        return np.empty(0, dtype=np.uint32)
    if top // g > MAX_REDUCED:
        raise ValueError(f"weight {top} is too large for a schedule (at most {MAX_REDUCED} "
                         "after division by the weights' gcd)")
    # owners grouped by reduced weight (a counting sort: position order kept)
    cdef Py_ssize_t *count = <Py_ssize_t *>calloc(top // g + 2, sizeof(Py_ssize_t))
    cdef Py_ssize_t *starts = NULL
    cdef int64_t *group_weight = NULL
    cdef uint32_t *owners = NULL
    cdef uint32_t[::1] out
    try:
        if count == NULL:
            raise MemoryError()
        groups = _count_weights(&w[0], n, g, top, count, &total)
        # group starts (groups + 1) then three scratch columns; weights then turns (zeroed)
        starts = <Py_ssize_t *>malloc((4 * groups + 1) * sizeof(Py_ssize_t))
        group_weight = <int64_t *>calloc(2 * groups, sizeof(int64_t))
        owners = <uint32_t *>malloc(n * sizeof(uint32_t))
        if starts == NULL or group_weight == NULL or owners == NULL:
            raise MemoryError()
        schedule = np.empty(total, dtype=np.uint32)
        out = schedule
        with nogil:
            at = _fill_schedule(&w[0], n, g, top, count, owners, starts, group_weight, &out[0])
    finally:
        free(count)
        free(starts)
        free(group_weight)
        free(owners)
    if at != total:
        raise AssertionError(f"schedule of {at} entries, {total} expected")
    return schedule


cdef void _gcd_and_top(const int64_t *w, Py_ssize_t n, int64_t *g, int64_t *top) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        if w[i] > 0:
            if g[0] != 1:  # 1 divides everything: no more divisions (they cost more than the rest)
                g[0] = _gcd(w[i], g[0])
            if w[i] > top[0]:
                top[0] = w[i]


cdef Py_ssize_t _count_weights(const int64_t *w, Py_ssize_t n, int64_t g, int64_t top, Py_ssize_t *count,
                               Py_ssize_t *total) noexcept nogil:
    """count[r]: the backends of reduced weight r; returns how many weights occur."""
    cdef Py_ssize_t i, groups = 0
    cdef int64_t r
    for i in range(n):
        if w[i] > 0:
            r = _reduced(w[i], g)
            count[r] += 1
            total[0] += r
    for r in range(1, top // g + 1):
        groups += count[r] > 0
    return groups


cdef Py_ssize_t _fill_schedule(const int64_t *w, Py_ssize_t n, int64_t g, int64_t top, Py_ssize_t *count,
                               uint32_t *owners, Py_ssize_t *starts, int64_t *group_weight,
                               uint32_t *out) noexcept nogil:
    cdef Py_ssize_t i, at = 0, groups = 0
    cdef int64_t r
    for r in range(1, top // g + 1):  # count[r] becomes where group r's owners go
        if count[r]:
            starts[groups], group_weight[groups] = at, r
            at += count[r]
            count[r] = starts[groups]
            groups += 1
    starts[groups] = at
    for i in range(n):
        if w[i] > 0:
            r = _reduced(w[i], g)
            owners[count[r]] = <uint32_t>i
            count[r] += 1
    return _fill(owners, starts, group_weight, groups, group_weight + groups, starts + groups + 1, out)
