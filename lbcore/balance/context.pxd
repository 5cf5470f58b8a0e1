# cython: cdivision=True
# What a pick reads and may update: the context a worker (or the test
# probe) fills per connection, and the helpers every algorithm shares.
# Preconditions: ctx.snap is the image buffer the worker holds, read under
# its seqlock, so any value read may be torn: every index taken from shared
# memory is checked against its bound before use, and the worker validates
# the pick afterwards.
from libc.math cimport pow
from libc.stdint cimport int32_t, uint32_t, uint64_t, int64_t
from lbcore.includes.layout cimport (
    FLC_MAX_BACKENDS, FLC_TABLE_POOL, flc_next_random, flc_image_header, flc_service,
    flc_backend, flc_counter, flc_service_state, flc_load_i64, flc_load_u32, flc_load_u64,
)

cdef enum:
    MAX_EXCLUDED = 8              # backends one connection may try: 1 + retries (<= 7)
    MAX_FULL = 8                  # slots one pick found full when claiming (max_conns), besides
    MAX_PICK_EXCLUDED = MAX_EXCLUDED + MAX_FULL


cdef struct PickContext:
    flc_image_header *snap
    const flc_service *service
    const flc_backend *backends
    const uint32_t *table
    flc_counter *counters
    flc_service_state *service_state
    uint32_t client_hash          # Maglev key: hash of the client address
    uint64_t rng                  # per-worker xorshift state
    uint64_t tiebreak             # per-worker rotation for equal least_conn scores
    uint32_t excluded[MAX_PICK_EXCLUDED]  # slots already tried for this connection (then full ones)
    int n_excluded
    int64_t observed_active       # least_conn: raw count seen, claimed by CAS; else -1
    uint64_t now_ms               # CLOCK_MONOTONIC ms: a slot ejected until later is skipped
    bint panic                    # ejections and local_down ignored (see pick_with_panic)
    int ramp_row                  # RAMP_MET: the ramping row the fast pass met, and its stamp
    uint32_t ramp_start


cdef inline bint row_is_eligible(const flc_backend *b) noexcept nogil:
    # The eligibility rule of an image row, written once: the worker's I1
    # check (backend_is_eligible) and every scan use it.
    return b.eligible == 1 and b.weight > 0


cdef inline bint is_excluded(const PickContext *ctx, uint32_t row) noexcept nogil:
    # Rows out of range (a torn read) count as excluded: never dereferenced.
    if row >= FLC_MAX_BACKENDS:
        return True
    return slot_excluded(ctx, row, ctx.backends[row].slot)


cdef inline bint slot_excluded(const PickContext *ctx, uint32_t row, uint32_t slot) noexcept nogil:
    # Exclusion is by slot, which stays the same when a retry meets a newer
    # image whose rows moved. A slot at its max_conns is excluded, in a
    # panic's pick too (the limit protects the backend, a panic only
    # relaxes what this node concluded about it). A slot this node ejected
    # (passive ejection, until its ejected_until_ms) or holds down by its
    # own probes (local_down) is excluded too, except in a panic's pick.
    # All live on the counter's cache line, which the claim writes anyway.
    if slot_tried(ctx, slot) or is_full(ctx, row, slot):
        return True
    if ctx.panic:
        return False
    return is_held_out(ctx, slot)


cdef inline bint slot_tried(const PickContext *ctx, uint32_t slot) noexcept nogil:
    # tried by this connection already (or found full by its claim)
    cdef int i
    for i in range(ctx.n_excluded):
        if ctx.excluded[i] == slot:
            return True
    return False


cdef inline bint excluded_or_ramping(const PickContext *ctx, uint32_t row, uint32_t *ramp_start) noexcept nogil:
    # is_excluded, and (when not) the row's ramp stamp in ``ramp_start`` (0:
    # not ramping), the slot read once: the stamp's load issues beside the
    # exclusion's, on the same counter line.
    cdef uint32_t slot
    if row >= FLC_MAX_BACKENDS:
        return True
    slot = ctx.backends[row].slot
    if slot_excluded(ctx, row, slot):
        return True
    ramp_start[0] = flc_load_u32(&ctx.counters[slot % FLC_MAX_BACKENDS].ramp_start_ms)
    return False


cdef inline bint is_full(const PickContext *ctx, uint32_t row, uint32_t slot) noexcept nogil:
    # At its max_conns: the node-wide count of open connections (connecting
    # and relaying, every worker's) has reached the row's limit.
    cdef uint32_t limit = ctx.backends[row].max_conns
    return limit != 0 and at_limit(limit, flc_load_i64(&ctx.counters[slot % FLC_MAX_BACKENDS].active))


cdef inline bint at_limit(uint32_t max_conns, int64_t active) noexcept nogil:
    return max_conns != 0 and active >= <int64_t>max_conns


cdef inline bint is_held_out(const PickContext *ctx, uint32_t slot) noexcept nogil:
    # Ejected by this node (until its ejected_until_ms) or held down by its own probes.
    cdef const flc_counter *counter = &ctx.counters[slot % FLC_MAX_BACKENDS]
    return flc_load_u64(&counter.ejected_until_ms) > ctx.now_ms or flc_load_u32(&counter.local_down) != 0


cdef inline bint all_held_out(const PickContext *ctx) noexcept nogil:
    # Every eligible row of the service ejected or held down here, whatever
    # this connection tried: the condition of a panic. O(backends), on a
    # pick that found nothing only.
    cdef uint32_t first = ctx.service.backend_first
    cdef uint32_t count = ctx.service.backend_count
    cdef uint32_t i
    if count == 0 or first >= FLC_MAX_BACKENDS or count > FLC_MAX_BACKENDS - first:
        return False
    for i in range(count):
        if row_is_eligible(&ctx.backends[first + i]) and not is_held_out(ctx, ctx.backends[first + i].slot):
            return False
    return True


cdef enum Capacity:
    CAPACITY_NONE = 0             # no row to pick at all (none eligible, or all tried)
    CAPACITY_FULL = 1             # rows to pick, every one at its max_conns
    CAPACITY_ROOM = 2             # a row to pick has room (freed since the pick looked)


cdef inline int service_capacity(const PickContext *ctx, int n_tried) noexcept nogil:
    # Why a pick found nothing: the rows it may pick (eligible, not tried by
    # this connection, not held out unless in panic) all full, or none at
    # all. The excluded slots past ``n_tried`` are those its claims found
    # full. O(backends), on a pick that found nothing only.
    cdef uint32_t first = ctx.service.backend_first
    cdef uint32_t count = ctx.service.backend_count
    cdef uint32_t i, row, slot
    cdef int j
    cdef bint full = False, tried
    if count == 0 or first >= FLC_MAX_BACKENDS or count > FLC_MAX_BACKENDS - first:
        return CAPACITY_NONE
    for i in range(count):
        row = first + i
        if not row_is_eligible(&ctx.backends[row]):
            continue
        slot = ctx.backends[row].slot
        if not ctx.panic and is_held_out(ctx, slot):
            continue
        tried = False
        for j in range(ctx.n_excluded):
            if ctx.excluded[j] == slot:
                tried = True
                full = full or j >= n_tried
                break
        if tried:
            continue
        if not is_full(ctx, row, slot):
            return CAPACITY_ROOM
        full = True
    return CAPACITY_FULL if full else CAPACITY_NONE


cdef enum:
    RAMP_MET = -2                 # a pick's fast pass met a ramping row (ctx.ramp_row): pick.pxd finishes it


cdef inline bint ramp_declines(PickContext *ctx, uint32_t row) noexcept nogil:
    # Slow start, the one rule every algorithm that honours it applies to a
    # row it would pick: a row still ramping (its counter's ramp_start_ms
    # set, less than the service's slow_start_ms ago) is declined with
    # probability 1 - f, f its share of the weight for now (ramp_factor),
    # and the pick goes on as if the row were excluded this once. A row not
    # ramping costs one load, from the counter line the pick reads anyway.
    # Precondition: ``row`` passed is_excluded (it is in range).
    cdef uint32_t start = flc_load_u32(&ctx.counters[ctx.backends[row].slot % FLC_MAX_BACKENDS].ramp_start_ms)
    return start != 0 and ramp_draw_declines(ctx, start)


cdef inline bint still_ramping(const PickContext *ctx, uint32_t start) noexcept nogil:
    # A stamp whose window is not over (integer arithmetic only: the common
    # passes of wrr and p2c ask it without a call); 0 is no stamp.
    cdef int32_t elapsed
    if start == 0:
        return False
    elapsed = <int32_t>(<uint32_t>ctx.now_ms - start)
    return elapsed < 0 or <uint32_t>elapsed < ctx.service.slow_start_ms


cdef inline bint ramp_draw_declines(PickContext *ctx, uint32_t start) noexcept nogil:
    # The draw of ramp_declines, for a row whose stamp is ``start`` (not 0).
    # wrr and p2c meet it only in their ramping pass (pick.pxd): their
    # common pass then holds no call (libm's pow, here) and keeps its
    # registers, one load dearer than before slow start.
    cdef double f = ramp_factor(ctx.service, start, ctx.now_ms)
    if f >= 1.0:
        return False
    # a uniform double in [0, 1) from the top 53 bits of the worker's draw
    return <double>(next_random(ctx) >> 11) * (1.0 / 9007199254740992.0) >= f


cdef inline double ramp_factor(const flc_service *service, uint32_t start, uint64_t now_ms) noexcept nogil:
    # Envoy's ramp: max(min share, (t / window) ^ (1 / aggression)), t the
    # time since this node saw the backend become eligible; 1 once the
    # window is over. Clocks are compared on their low 32 bits (the stamp's
    # width); a stamp ahead of this worker's coarse clock (the agent's
    # clock runs a moment ahead) is a ramp just begun, not one long over.
    cdef uint32_t window = service.slow_start_ms
    cdef int32_t elapsed = <int32_t>(<uint32_t>now_ms - start)
    cdef double f, least
    if elapsed < 0:
        elapsed = 0
    if window == 0 or <uint32_t>elapsed >= window:
        return 1.0
    least = service.slow_start_min_permille / 1000.0
    f = pow(<double>elapsed / window, service.slow_start_exponent)
    return f if f > least else least  # (a NaN from a torn exponent: the least)


cdef inline bint table_in_pool(uint32_t offset, uint32_t length) noexcept nogil:
    # a torn read may give any offset and length: never index past the pool
    return length > 0 and offset < FLC_TABLE_POOL and length <= FLC_TABLE_POOL - offset


cdef inline uint64_t next_random(PickContext *ctx) noexcept nogil:
    return flc_next_random(&ctx.rng)


cdef inline int scan_for_any(const PickContext *ctx, uint32_t start) noexcept nogil:
    # After a failed connect, a bounded draw or probe can miss the few rows
    # left (one heavy backend excluded dominates the table): the retry then
    # walks the service's rows, O(backends) on retries only.
    cdef uint32_t first = ctx.service.backend_first
    cdef uint32_t count = ctx.service.backend_count
    cdef uint32_t i, row
    if count == 0 or first >= FLC_MAX_BACKENDS or count > FLC_MAX_BACKENDS - first:
        return -1
    for i in range(count):
        row = first + (start + i) % count
        if row_is_eligible(&ctx.backends[row]) and not is_excluded(ctx, row):
            return <int>row
    return -1
