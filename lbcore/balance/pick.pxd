# The one interface every balancing algorithm implements (one module each:
# wrr, least_conn, p2c, maglev):
#
#     cdef int pick(PickContext *ctx) noexcept nogil
#
# returning a row of the backend table (absolute index) or -1 when the
# service has no eligible backend left that is not excluded. The context and
# the helpers the algorithms share are in context.pxd; ``pick_backend`` is
# the one dispatch on the service's algorithm, and ``claim_backend`` the one
# claim of a pick (within the backend's max_conns), for the worker and the
# probe; ``pick_with_panic`` the pick that honours passive ejection
# (is_excluded) and falls back to panic.
from libc.stdint cimport uint8_t, uint32_t
from libc.stdint cimport int64_t
from lbcore.includes.layout cimport (
    FLC_ALGO_LEAST_CONN, FLC_ALGO_MAGLEV, FLC_ALGO_P2C, flc_add_fetch_i64, flc_add_i64, flc_cas_i64,
)
from lbcore.balance.context cimport RAMP_MET, PickContext, all_held_out
from lbcore.balance cimport least_conn, maglev, p2c, wrr


cdef inline int pick_backend(PickContext *ctx) noexcept nogil:
    # wrr and p2c stop at a ramping row (RAMP_MET, rare): their ramping pass
    # finishes the pick (least_conn thins in its own scan; maglev refuses
    # slow start)
    cdef uint8_t algorithm = ctx.service.algorithm
    cdef int row
    if algorithm == FLC_ALGO_LEAST_CONN:
        return least_conn.pick(ctx)
    if algorithm == FLC_ALGO_P2C:
        row = p2c.pick(ctx)
        return p2c.pick_ramping(ctx) if row == RAMP_MET else row
    if algorithm == FLC_ALGO_MAGLEV:
        return maglev.pick(ctx)
    row = wrr.pick(ctx)
    return wrr.pick_ramping(ctx) if row == RAMP_MET else row


cdef inline int pick_with_panic(PickContext *ctx) noexcept nogil:
    # The pick honours ejections and local_down; when that leaves nothing
    # because every eligible row of the service is ejected or down here
    # (not merely tried by this connection: its retries do not go to what
    # this node ejected), it picks again among every eligible row not yet
    # tried: panic, said by ctx.panic (the caller counts it once the pick
    # is claimed). Eligibility itself is never relaxed: a panic picks from
    # the image's eligible rows only, and the worker's I1 check still follows.
    # A caller that found the service in panic a moment ago sets ctx.panic
    # first: the pick then costs what a normal one does, not two scans of
    # the pool per connection for as long as the panic lasts.
    cdef int row
    if ctx.panic:
        return pick_backend(ctx)
    row = pick_backend(ctx)
    if row < 0 and ctx.service.eligible_count > 0 and all_held_out(ctx):
        ctx.panic = True
        row = pick_backend(ctx)
    return row


cdef enum Claim:
    CLAIMED = 0
    CLAIM_RACED = 1               # least_conn: another worker changed the count: scan again
    CLAIM_FULL = 2                # the backend is at its max_conns: pick again without it


cdef inline int claim_backend(PickContext *ctx, uint32_t slot, uint32_t max_conns, bint exact) noexcept nogil:
    # Count the pick as an open connection of the backend in ``slot``.
    # ``exact`` (least_conn): a compare-and-swap on the count the scan saw,
    # so two workers never both take the same least-loaded backend, and
    # never past ``max_conns``. Otherwise an increment; past ``max_conns``
    # (0: no limit) it is undone: each claim kept saw a count within the
    # limit when it made it, so the backend never has more than max_conns
    # open on the node, whatever the workers do at once.
    cdef int64_t *active = &ctx.counters[slot].active
    if exact:
        if max_conns != 0 and ctx.observed_active >= <int64_t>max_conns:
            return CLAIM_FULL
        return CLAIMED if flc_cas_i64(active, ctx.observed_active, ctx.observed_active + 1) else CLAIM_RACED
    if max_conns == 0:
        flc_add_i64(active, 1)
        return CLAIMED
    if flc_add_fetch_i64(active, 1) > <int64_t>max_conns:
        flc_add_i64(active, -1)
        return CLAIM_FULL
    return CLAIMED
