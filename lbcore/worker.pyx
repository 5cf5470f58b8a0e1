# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The data-path worker: one epoll loop per process, run with the GIL released.

Every socket is registered once, edge-triggered, for reading and writing, and
never modified: readiness is kept in flags on each Side (set by events,
cleared by short reads, EAGAIN or partial writes). A relay direction reads
into a scratch buffer and writes at once (4 system calls per small
request/response); when a read fills RW_CHUNK the direction switches to
splice(2) through a pipe from the worker's pool, held only while bytes are in
flight.

The image (the routing snapshot in shared memory) is read under its seqlock (see
includes/fulcrum_layout.h); a new generation is noticed with one atomic load
per accept, and once per tick when idle.

A backend's lifecycle: a claim never takes a backend past its max_conns
(balance/pick.pxd ``claim_backend``). A new connection whose service has
every backend it may take full waits, accepted, in a FIFO of its service
(per worker, bounded node-wide by the service's max_queue), and is connected
when a slot frees: after this worker drops a claim, or at its next look
(QUEUE_POLL_MS) for slots other workers freed; past queue_timeout_ms it is
closed. Once a service has connections waiting, new ones queue behind them.
A row closing (its drain timed out) has its connections reset at the next
tick after the image is noticed.
"""
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int32_t, int64_t
from libc.string cimport memcpy, memmove, memset

from lbcore.includes.system cimport *
from lbcore.includes.layout cimport *
from lbcore.balance.context cimport (
    CAPACITY_FULL, CAPACITY_ROOM, MAX_EXCLUDED, MAX_FULL, PickContext, row_is_eligible, service_capacity,
)
from lbcore.balance.pick cimport CLAIM_FULL, CLAIM_RACED, claim_backend, pick_with_panic
from lbcore.worker cimport *


# ---------------------------------------------------------------- utilities

cdef inline uint64_t monotonic_ms() noexcept nogil:
    # CLOCK_MONOTONIC_COARSE is served by the vDSO: no system call
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC_COARSE, &ts)
    return <uint64_t>ts.tv_sec * 1000 + <uint64_t>(ts.tv_nsec // 1000000)


cdef inline uint64_t token(uint32_t kind, uint32_t tag, uint32_t index) noexcept nogil:
    return (<uint64_t>kind << 56) | (<uint64_t>tag << 24) | (index & 0xFFFFFF)


cdef int epoll_add(Worker *w, int fd, uint32_t events, uint64_t data) noexcept nogil:
    cdef epoll_event ev
    ev.events = events
    ev.data.u64 = data
    return epoll_ctl(w.epfd, EPOLL_CTL_ADD, fd, &ev)


cdef inline bint would_block() noexcept nogil:
    return errno == EAGAIN  # == EWOULDBLOCK on Linux


cdef inline bint out_of_resources() noexcept nogil:
    return errno == EMFILE or errno == ENFILE or errno == ENOBUFS or errno == ENOMEM


# ---------------------------------------------------------------- image

cdef bint backend_is_eligible(flc_image_header *snap, uint32_t service_slot,
                              int row) noexcept nogil:
    """I1, enforced here and only here: a worker connects only to a backend
    that is eligible in the image it holds at decision time (a row of that
    image, of the connection's service, marked eligible, weight > 0)."""
    cdef const flc_backend *b
    if row < 0 or <uint32_t>row >= snap.n_backends or <uint32_t>row >= FLC_MAX_BACKENDS:
        return False
    b = &flc_backends_of(snap)[row]
    return row_is_eligible(b) and b.service_slot == service_slot


cdef void close_listener(Worker *w, int slot) noexcept nogil:
    if w.listen_fd[slot] >= 0:
        close(w.listen_fd[slot])
        w.listen_fd[slot] = -1


cdef int open_listener(Worker *w, int slot, uint32_t ip, uint16_t port) noexcept nogil:
    cdef sockaddr_in sa
    cdef int one = 1
    cdef int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0)
    if fd < 0:
        return -1
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one))
    setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one))
    memset(&sa, 0, sizeof(sa))
    sa.sin_family = AF_INET
    sa.sin_port = htons(port)
    sa.sin_addr.s_addr = ip
    if bind(fd, <sockaddr *>&sa, sizeof(sa)) < 0 or listen(fd, 4096) < 0:
        close(fd)
        return -1
    w.listen_fd[slot] = fd
    w.listen_ip[slot] = ip
    w.listen_port[slot] = port
    if not w.accepts_paused:
        epoll_add(w, fd, EPOLLIN, token(TOKEN_LISTENER, 0, slot))
    return 0


cdef bint read_listeners(flc_image_header *snap, uint32_t *ips, uint16_t *ports,
                         uint32_t *limits) noexcept nogil:
    """Copy the listener set and limits out of ``snap``; False if torn."""
    cdef uint64_t seq = flc_read_begin(snap)
    cdef uint32_t n = snap.n_services
    cdef flc_service *services = flc_services_of(snap)
    cdef int i
    for i in range(FLC_MAX_SERVICES):
        ips[i] = 0
        ports[i] = 0
        if <uint32_t>i < n and services[i].active:
            ips[i] = services[i].listen_ip
            ports[i] = services[i].listen_port
    limits[0] = snap.connect_timeout_ms
    limits[1] = snap.idle_timeout_ms
    limits[2] = snap.retries
    limits[3] = snap.relay_mode
    limits[4] = snap.fin_timeout_ms
    limits[5] = snap.source_ip
    return flc_read_validate(snap, seq) and snap.magic == FLC_MAGIC \
        and snap.layout_version == FLC_LAYOUT_VERSION


cdef bint read_closing(Worker *w, flc_image_header *snap) noexcept nogil:
    """Mark the slots whose rows are closing in ``snap`` (only services
    that count some are walked); False if torn (the marks are then wrong:
    the caller reads again or clears them)."""
    cdef uint64_t seq = flc_read_begin(snap)
    cdef uint32_t n = snap.n_services
    cdef flc_service *services = flc_services_of(snap)
    cdef const flc_backend *backends = flc_backends_of(snap)
    cdef uint32_t s, first, count, row, slot
    clear_closing(w)
    if n > FLC_MAX_SERVICES:
        n = FLC_MAX_SERVICES
    for s in range(n):
        if not services[s].active or services[s].closing_count == 0:
            continue
        first, count = services[s].backend_first, services[s].backend_count
        if first >= FLC_MAX_BACKENDS or count > FLC_MAX_BACKENDS - first:
            continue
        for row in range(first, first + count):
            if backends[row].drain == FLC_DRAIN_CLOSING:
                slot = backends[row].slot % FLC_MAX_BACKENDS
                w.closing[slot >> 6] |= (<uint64_t>1) << (slot & 63)
                w.n_closing += 1
    return flc_read_validate(snap, seq)


cdef inline void clear_closing(Worker *w) noexcept nogil:
    if w.n_closing:
        memset(w.closing, 0, sizeof(w.closing))
        w.n_closing = 0


cdef inline bint slot_closing(Worker *w, uint32_t slot) noexcept nogil:
    return (w.closing[(slot % FLC_MAX_BACKENDS) >> 6] >> (slot & 63)) & 1


cdef void notice_image(Worker *w) noexcept nogil:
    """Adopt a new generation if the agent published one: one atomic load."""
    cdef uint64_t generation = flc_load_acquire_u64(&w.control.generation)
    cdef flc_image_header *snap
    cdef uint32_t ips[FLC_MAX_SERVICES]
    cdef uint16_t ports[FLC_MAX_SERVICES]
    cdef uint32_t limits[6]
    cdef int attempt, slot
    cdef bint complete = True
    if generation == w.generation:
        return
    snap = flc_buffer_of(w.base, generation)
    for attempt in range(16):
        if read_listeners(snap, ips, ports, limits) and read_closing(w, snap):
            break
        generation = flc_load_acquire_u64(&w.control.generation)
        snap = flc_buffer_of(w.base, generation)
    else:
        clear_closing(w)  # marks of a torn read: none rather than wrong ones
        return  # the agent is mid-publish: try again at the next notice
    if w.n_closing:
        w.next_tick_ms = w.now_ms  # their connections are reset by the tick: the next turn of the loop
    w.snap = snap
    w.generation = generation
    w.connect_timeout_ms = limits[0]
    w.idle_timeout_ms = limits[1]
    w.retries = limits[2] if limits[2] < MAX_EXCLUDED else MAX_EXCLUDED - 1
    w.relay_mode = limits[3]
    w.fin_timeout_ms = limits[4]
    w.source_ip = limits[5]
    if not w.draining:
        for slot in range(FLC_MAX_SERVICES):
            if w.listen_fd[slot] >= 0 and (ports[slot] == 0 or ips[slot] != w.listen_ip[slot]
                                           or ports[slot] != w.listen_port[slot]):
                close_listener(w, slot)
            if ports[slot] != 0 and w.listen_fd[slot] < 0:
                if open_listener(w, slot, ips[slot], ports[slot]) < 0:
                    complete = False
        w.me.listening = 1 if complete else 0
    # read by the agent: no worker still picks from a buffer older than this
    w.me.generation = w.generation


# ---------------------------------------------------------------- pools

cdef char *take_buffer(Worker *w) noexcept nogil:
    if w.n_spare_buffers > 0:
        w.n_spare_buffers -= 1
        return w.spare_buffers[w.n_spare_buffers]
    return <char *>calloc(1, RW_CHUNK)


cdef void give_buffer(Worker *w, char *buf) noexcept nogil:
    if w.n_spare_buffers < MAX_SPARE_BUFFERS:
        w.spare_buffers[w.n_spare_buffers] = buf
        w.n_spare_buffers += 1
    else:
        free(buf)


cdef bint take_pipe(Worker *w, Direction *d) noexcept nogil:
    cdef int fds[2]
    if w.n_spare_pipes > 0:
        w.n_spare_pipes -= 1
        d.pipe_r = w.pipes[2 * w.n_spare_pipes]
        d.pipe_w = w.pipes[2 * w.n_spare_pipes + 1]
        return True
    if w.n_pipes >= MAX_PIPES or pipe2(fds, O_NONBLOCK | O_CLOEXEC) < 0:
        return False
    # Fewer, larger splices per megabyte; if the system refuses the size the
    # pipe keeps its default and the splices are just smaller.
    fcntl(fds[1], F_SETPIPE_SZ, <int>PIPE_SIZE)
    w.n_pipes += 1
    d.pipe_r = fds[0]
    d.pipe_w = fds[1]
    return True


cdef void give_pipe(Worker *w, Direction *d) noexcept nogil:
    if d.pipe_r < 0:
        return
    if d.pipe_len == 0:
        w.pipes[2 * w.n_spare_pipes] = d.pipe_r
        w.pipes[2 * w.n_spare_pipes + 1] = d.pipe_w
        w.n_spare_pipes += 1
    else:
        # bytes still inside: the pipe cannot be reused
        close(d.pipe_r)
        close(d.pipe_w)
        w.n_pipes -= 1
    d.pipe_r = d.pipe_w = -1
    d.pipe_len = 0


cdef void release_spares(Worker *w) noexcept nogil:
    cdef int i
    for i in range(2 * w.n_spare_pipes):
        close(w.pipes[i])
    w.n_pipes -= w.n_spare_pipes
    w.n_spare_pipes = 0
    for i in range(w.n_spare_buffers):
        free(w.spare_buffers[i])
    w.n_spare_buffers = 0


cdef void release_direction(Worker *w, Direction *d) noexcept nogil:
    if d.buf != NULL:
        give_buffer(w, d.buf)
        d.buf = NULL
    give_pipe(w, d)


# ---------------------------------------------------------------- counters

cdef void flush_bytes(Worker *w, Conn *c) noexcept nogil:
    cdef flc_counter *counter
    if not c.holds_claim:
        return
    counter = &w.counters[c.backend_slot]
    if c.up.unflushed:
        flc_add_u64(&counter.bytes_to_backend, c.up.unflushed)
        c.up.unflushed = 0
    if c.down.unflushed:
        flc_add_u64(&counter.bytes_to_client, c.down.unflushed)
        c.down.unflushed = 0


cdef void drop_claim(Worker *w, Conn *c, bint failed) noexcept nogil:
    if not c.holds_claim:
        return
    flush_bytes(w, c)
    flc_add_i64(&w.counters[c.backend_slot].active, -1)
    w.my_active[c.backend_slot] -= 1
    if failed:
        flc_add_u64(&w.counters[c.backend_slot].failed, 1)
        note_failure(w, c)
    c.holds_claim = False
    if w.n_waiting:
        w.queue_kick = True  # a slot is free: the loop tries the queues' heads after this turn


# ---------------------------------------------------------------- passive ejection

cdef void note_failure(Worker *w, Conn *c) noexcept nogil:
    """The backend of ``c`` failed a connection (refused, timed out, or
    reset before its first byte): one more failure in a row of its slot; at
    the service's consecutive_failures, try to eject it. Precondition: ``c``
    holds its claim (c.backend_slot is the slot it picked)."""
    cdef uint32_t failures = flc_add_fetch_u32(&w.counters[c.backend_slot].consecutive_failures, 1)
    cdef flc_image_header *snap = w.snap
    cdef uint32_t threshold
    if snap == NULL or c.service_slot >= FLC_MAX_SERVICES:
        return
    # may be torn: only a trigger, eject_locked reads it again under the seqlock
    threshold = flc_services_of(snap)[c.service_slot].consecutive_failures
    if threshold != 0 and failures >= threshold:
        try_eject(w, c.service_slot, c.backend_slot)


cdef void try_eject(Worker *w, uint32_t service_slot, uint32_t slot) noexcept nogil:
    """Eject the backend in ``slot`` under the service's eject_lock, a
    try-lock: one worker at a time decides for a service, so two never both
    take the last ejection max_ejection_percent allows. Taken by another
    worker: skip (the next failure tries again; a lock left by a dead
    worker is freed by the agent, lbcore.ejection.release_eject_locks)."""
    cdef uint32_t *lock = &w.service_states[service_slot].eject_lock
    if not flc_cas_u32(lock, 0, <uint32_t>w.index + 1):
        return
    eject_locked(w, service_slot, slot)
    flc_store_release_u32(lock, 0)


cdef inline uint64_t ejection_ms(uint64_t base, uint64_t longest, uint32_t ejections) noexcept nogil:
    # base << (ejections - 1), at most longest; shifted only where it cannot
    # overflow (base < 2**32, shift < 32)
    cdef uint32_t shift = ejections - 1 if ejections > 0 else 0
    if shift >= 32 or (base << shift) >= longest:
        return longest
    return base << shift


cdef void eject_locked(Worker *w, uint32_t service_slot, uint32_t slot) noexcept nogil:
    """The ejection itself. Precondition: this worker holds the service's
    eject_lock. The service's settings and rows come from the image this
    worker holds, read under its seqlock (torn: nothing is done)."""
    cdef flc_image_header *snap = w.snap
    cdef flc_service *service
    cdef const flc_backend *backends
    cdef flc_counter *counter = &w.counters[slot]
    cdef uint64_t seq, until, now = w.now_ms
    cdef uint32_t first, count, threshold, percent, base, longest, row, ejections, ejected = 0
    if snap == NULL:
        return
    seq = flc_read_begin(snap)
    if seq & 1 or service_slot >= snap.n_services:
        return
    service = &flc_services_of(snap)[service_slot]
    first, count = service.backend_first, service.backend_count
    threshold, percent = service.consecutive_failures, service.max_ejection_percent
    base, longest = service.base_ejection_ms, service.max_ejection_ms
    if count == 0 or first >= FLC_MAX_BACKENDS or count > FLC_MAX_BACKENDS - first:
        return
    backends = flc_backends_of(snap)
    for row in range(first, first + count):
        if flc_load_u64(&w.counters[backends[row].slot % FLC_MAX_BACKENDS].ejected_until_ms) > now:
            ejected += 1
    if not flc_read_validate(snap, seq):
        return
    if threshold == 0 or flc_load_u32(&counter.consecutive_failures) < threshold:
        return  # another worker ejected it meanwhile (and reset the count)
    until = flc_load_u64(&counter.ejected_until_ms)
    if until > now:
        # failures of connections begun before the ejection: not a new one
        flc_store_u32(&counter.consecutive_failures, 0)
        return
    # the cap, counted after this ejection; past it the backend stays in
    # (its failures keep it at the threshold: the next one asks again)
    if <uint64_t>(ejected + 1) * 100 > <uint64_t>percent * count:
        return
    ejections = flc_load_u32(&counter.ejections)
    if until == 0 or ejections == 0 or now - until >= longest:
        ejections = 1  # the last ejection is long over: start the back-off again
    elif ejections < MAX_BACKOFF:
        ejections += 1
    flc_store_u32(&counter.ejections, ejections)
    flc_store_u64(&counter.ejected_until_ms, now + ejection_ms(base, longest, ejections))
    flc_store_u32(&counter.consecutive_failures, 0)


cdef void note_backend_spoke(Worker *w, Conn *c) noexcept nogil:
    """After a relay turn: a first byte (or a clean FIN) from the backend
    ends its failures in a row. Written only when not 0 already, so a
    healthy backend's counter line sees no write here."""
    cdef uint32_t *failures
    if c.down.unflushed == 0 and c.down.buf_len == 0 and c.down.pipe_len == 0 and not c.down.eof:
        return
    c.backend_spoke = True
    if c.holds_claim:
        failures = &w.counters[c.backend_slot].consecutive_failures
        if flc_load_u32(failures) != 0:
            flc_store_u32(failures, 0)


# ---------------------------------------------------------------- connections

cdef void close_conn(Worker *w, int index) noexcept nogil:
    cdef Conn *c = &w.conns[index]
    if c.state == CONN_FREE:
        return
    if c.waiting:
        leave_queue(w, index)
    drop_claim(w, c, False)
    if c.client.fd >= 0:
        close(c.client.fd)
    if c.backend.fd >= 0:
        close(c.backend.fd)
    release_direction(w, &c.up)
    release_direction(w, &c.down)
    c.state = CONN_FREE
    c.next_free = w.free_head
    w.free_head = index
    w.n_open -= 1
    w.me.active = w.n_open


cdef int choose_backend(Worker *w, Conn *c, sockaddr_in *sa) noexcept nogil:
    """Pick a backend for ``c`` and claim it (count it active); fills ``sa``.
    Returns CONNECT_STARTED (claimed), CONNECT_FULL when every backend it
    may take is at its max_conns, or CONNECT_NONE when the service has no
    eligible backend left to try."""
    cdef PickContext ctx
    cdef flc_image_header *snap
    cdef flc_service *service
    cdef const flc_backend *b
    cdef uint64_t seq
    cdef int attempt, row, claim, capacity, i
    cdef uint32_t slot, max_conns = 0
    cdef uint32_t full[MAX_FULL]  # slots a claim of this call found full: not picked again by it
    cdef int n_full = 0
    cdef uint8_t algorithm
    for attempt in range(16):
        snap = w.snap
        if snap == NULL:
            return CONNECT_NONE  # no image adopted yet: nothing is eligible
        seq = flc_read_begin(snap)
        if seq & 1 or c.service_slot >= snap.n_services or c.service_slot >= FLC_MAX_SERVICES:
            notice_image(w)
            continue
        service = &flc_services_of(snap)[c.service_slot]
        ctx.snap = snap
        ctx.service = service
        ctx.backends = flc_backends_of(snap)
        ctx.table = flc_table_of(snap)
        ctx.counters = w.counters
        ctx.service_state = &w.service_states[c.service_slot]
        ctx.client_hash = c.client_hash
        ctx.rng = w.rng
        ctx.tiebreak = w.tiebreak
        ctx.n_excluded = c.n_tried
        memcpy(ctx.excluded, c.tried, sizeof(c.tried))
        for i in range(n_full):
            ctx.excluded[ctx.n_excluded] = full[i]
            ctx.n_excluded += 1
        ctx.observed_active = -1
        ctx.now_ms = w.now_ms
        ctx.panic = w.panic_until_ms[c.service_slot] > w.now_ms
        algorithm = service.algorithm
        row = pick_with_panic(&ctx)
        if ctx.panic and w.panic_until_ms[c.service_slot] <= w.now_ms:
            w.panic_until_ms[c.service_slot] = w.now_ms + PANIC_RECHECK_MS
        w.rng = ctx.rng
        w.tiebreak = ctx.tiebreak
        capacity = CAPACITY_FULL if n_full else 0
        if not service.active or not backend_is_eligible(snap, c.service_slot, row):
            if row < 0 and service.active:
                capacity = service_capacity(&ctx, c.n_tried)  # why nothing: full, or nothing at all
            row = -1
        else:
            b = &ctx.backends[row]
            slot = b.slot % FLC_MAX_BACKENDS
            max_conns = b.max_conns
            memset(sa, 0, sizeof(sockaddr_in))
            sa.sin_family = AF_INET
            sa.sin_port = htons(b.port)
            sa.sin_addr.s_addr = b.ip
        if not flc_read_validate(snap, seq):
            notice_image(w)  # torn: the agent rewrote this buffer meanwhile
            continue
        if row < 0:
            if capacity == CAPACITY_ROOM:
                continue  # a slot freed since the pick looked: pick again
            return CONNECT_FULL if capacity == CAPACITY_FULL else CONNECT_NONE
        # other algorithms, or a claim contended CLAIM_ATTEMPTS times: serving
        # the client beats an exact least-connections choice
        claim = claim_backend(&ctx, slot, max_conns, algorithm == FLC_ALGO_LEAST_CONN and attempt < CLAIM_ATTEMPTS)
        if claim == CLAIM_RACED:
            continue  # another worker took a connection meanwhile: scan again
        if claim == CLAIM_FULL:
            # another worker took its last slot meanwhile: pick again without it
            if n_full < MAX_FULL:
                full[n_full] = slot
                n_full += 1
            continue
        w.my_active[slot] += 1
        if ctx.panic:
            flc_add_u64(&w.service_states[c.service_slot].panics, 1)
        c.backend_slot = slot
        c.holds_claim = True
        if c.n_tried < MAX_EXCLUDED:
            c.tried[c.n_tried] = slot
            c.n_tried += 1
        return CONNECT_STARTED
    return CONNECT_FULL if n_full else CONNECT_NONE


cdef void abort_conn(Worker *w, int index) noexcept nogil:
    """Close both sides with a reset. A reset or an error on one side is
    an abortive close on the other: a clean end of stream would make a
    truncated transfer look complete, and a peer that is gone leaves
    nothing to finish. Nothing more is read; what was read before the
    error still goes out first (a reset discards a send queue), for at most
    ABORT_FLUSH_MS: see finish_abort."""
    cdef Conn *c = &w.conns[index]
    if not c.aborting:
        c.aborting = True
        c.abort_deadline_ms = w.now_ms + ABORT_FLUSH_MS
        if c.backend.err and not c.backend_spoke and c.holds_claim and c.state == CONN_RELAYING:
            note_failure(w, c)  # accepted, then reset before its first byte: a failed connect
    finish_abort(w, index)


cdef bint sending(Worker *w, Direction *d, Side *dst) noexcept nogil:
    """Bytes of ``d`` still on their way to ``dst``: held by us, or in the
    kernel's send queue. A destination that fails takes no more: what it
    would have got is dropped with it, and a pipe that still holds some is
    closed at once (give_pipe), never handed to another connection."""
    cdef int queued = 0
    if dst.fd < 0:
        return False
    if dst.err:
        # A reset (or another error) came from it: nothing held or queued
        # will be delivered, and the send queue of a reset socket still
        # counts what was written (SIOCOUTQ): waiting on it would hold the
        # pair for ABORT_FLUSH_MS for nothing.
        d.buf_len = 0
        give_pipe(w, d)
        return False
    if (d.buf_len > 0 or d.pipe_len > 0) and not flush_pending(d, dst):
        d.buf_len = 0
        give_pipe(w, d)
        return False
    if d.buf_len > 0 or d.pipe_len > 0:
        return True
    return ioctl(dst.fd, SIOCOUTQ, &queued) == 0 and queued > 0


cdef void finish_abort(Worker *w, int index) noexcept nogil:
    """Reset both sides once what was read has gone out, or at the deadline."""
    cdef Conn *c = &w.conns[index]
    cdef linger abortive
    cdef bint up = sending(w, &c.up, &c.backend)
    cdef bint down = sending(w, &c.down, &c.client)
    if (up or down) and w.now_ms < c.abort_deadline_ms:
        return  # again on the next event of this pair, or tick
    abortive.l_onoff = 1
    abortive.l_linger = 0  # close() then sends RST, not FIN
    if c.client.fd >= 0:
        setsockopt(c.client.fd, SOL_SOCKET, SO_LINGER, &abortive, sizeof(abortive))
    if c.backend.fd >= 0:
        setsockopt(c.backend.fd, SOL_SOCKET, SO_LINGER, &abortive, sizeof(abortive))
    close_conn(w, index)


cdef inline bint source_applies(uint32_t source_ip, uint32_t destination_ip) noexcept nogil:
    """Connects leave from the node's address, except a loopback one
    towards a backend not on loopback (no route leads there from 127/8;
    lbcore.probing.source_applies is the same rule for probes). Addresses
    in network byte order: the first octet is the first byte in memory."""
    if source_ip == 0:
        return False
    return (<uint8_t *>&source_ip)[0] != 127 or (<uint8_t *>&destination_ip)[0] == 127


cdef bint bind_source(int fd, uint32_t ip) noexcept nogil:
    """Connects leave from the node's address (node.address): the path
    its probes test. IP_BIND_ADDRESS_NO_PORT leaves the port to connect(),
    which picks it per destination, so a bind holds no port of its own."""
    cdef sockaddr_in sa
    cdef int one = 1
    setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof(one))
    memset(&sa, 0, sizeof(sa))
    sa.sin_family = AF_INET
    sa.sin_addr.s_addr = ip
    return bind(fd, <sockaddr *>&sa, sizeof(sa)) == 0


cdef int connect_backend(Worker *w, int index) noexcept nogil:
    """Start a nonblocking connect to a backend, trying others (up to the
    image's retries) when one refuses at once. CONNECT_STARTED, or
    CONNECT_FULL (every backend it may take is at its max_conns: it may
    wait), or CONNECT_NONE (no backend left)."""
    cdef Conn *c = &w.conns[index]
    cdef sockaddr_in sa
    cdef int fd, chosen
    cdef bint local
    while c.n_tried <= <int>w.retries:
        chosen = choose_backend(w, c, &sa)
        if chosen != CONNECT_STARTED:
            return chosen
        fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0)
        if fd < 0:
            drop_claim(w, c, False)
            if out_of_resources():
                pause_accepts(w)
            return CONNECT_NONE
        if source_applies(w.source_ip, sa.sin_addr.s_addr) and not bind_source(fd, w.source_ip):
            # the node's own address cannot be used: not the backend's failure
            close(fd)
            drop_claim(w, c, False)
            return CONNECT_NONE
        if connect(fd, <sockaddr *>&sa, sizeof(sa)) == 0 or errno == EINPROGRESS:
            w.next_tag += 1
            c.backend.fd = fd
            c.backend.tag = w.next_tag
            c.backend.readable = c.backend.writable = c.backend.rdhup = c.backend.nodelay = False
            c.backend.err = False
            c.state = CONN_CONNECTING
            c.connect_deadline_ms = w.now_ms + w.connect_timeout_ms
            epoll_add(w, fd, EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET,
                      token(TOKEN_BACKEND, c.backend.tag, index))
            return CONNECT_STARTED
        # refused at once: the backend's failure, unless the node's own side
        # failed (its address, its ports): then not counted against it
        local = errno == EINVAL or errno == EADDRNOTAVAIL or errno == EADDRINUSE or errno == EAFNOSUPPORT
        close(fd)
        drop_claim(w, c, not local)
    return CONNECT_NONE


cdef void connect_failed(Worker *w, int index) noexcept nogil:
    """The backend refused or timed out: count it, try another."""
    cdef Conn *c = &w.conns[index]
    close(c.backend.fd)
    c.backend.fd = -1
    drop_claim(w, c, True)
    notice_image(w)  # the retry picks from the image published last, as a new connection does
    if connect_backend(w, index) != CONNECT_STARTED:
        close_conn(w, index)  # a retry does not wait in the queue: its client has waited a connect already


cdef void connected(Worker *w, int index) noexcept nogil:
    cdef Conn *c = &w.conns[index]
    c.state = CONN_RELAYING
    flc_add_u64(&w.counters[c.backend_slot].total, 1)


cdef bint accept_clients(Worker *w, int slot) noexcept nogil:
    """Accept up to ACCEPT_BATCH connections; True if the batch ran out
    before the queue did (more may be waiting)."""
    cdef sockaddr_in sa
    cdef socklen_t length
    cdef int fd, i, index
    cdef Conn *c
    for i in range(ACCEPT_BATCH):
        if w.listen_fd[slot] < 0:
            return False
        length = sizeof(sa)
        fd = accept4(w.listen_fd[slot], <sockaddr *>&sa, &length, SOCK_NONBLOCK | SOCK_CLOEXEC)
        if fd < 0:
            if out_of_resources():
                pause_accepts(w)
            return False  # EAGAIN, or a connection that died in the queue
        notice_image(w)
        if w.free_head < 0:
            close(fd)  # max_connections reached: refuse rather than queue forever
            continue
        index = w.free_head
        c = &w.conns[index]
        w.free_head = c.next_free
        if index >= w.high_water:
            w.high_water = index + 1
        w.n_open += 1
        w.me.active = w.n_open
        w.me.accepted += 1
        flc_add_u64(&w.service_states[slot].accepted, 1)
        memset(c, 0, sizeof(Conn))
        c.up.pipe_r = c.up.pipe_w = c.down.pipe_r = c.down.pipe_w = -1
        c.backend.fd = -1
        c.client.fd = fd
        w.next_tag += 1
        c.client.tag = w.next_tag
        c.service_slot = <uint32_t>slot
        c.client_hash = flc_hash_address(sa.sin_addr.s_addr)
        c.last_active_ms = w.now_ms
        c.state = CONN_CONNECTING
        epoll_add(w, fd, EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET,
                  token(TOKEN_CLIENT, c.client.tag, index))
        start_conn(w, index)
    return True


cdef void start_conn(Worker *w, int index) noexcept nogil:
    """A new connection: connected to a backend, or queued when every
    backend it may take is full (and behind the connections of its service
    already waiting: first come, first served), or closed."""
    cdef Conn *c = &w.conns[index]
    cdef uint32_t max_queue = 0, timeout_ms = 0
    cdef int started
    if flc_load_i64(&w.service_states[c.service_slot].waiting) > 0 \
            and queue_settings(w, c.service_slot, &max_queue, &timeout_ms) and max_queue > 0:
        started = CONNECT_FULL
    else:
        started = connect_backend(w, index)
    if started == CONNECT_FULL:
        enter_queue(w, index)
    elif started != CONNECT_STARTED:
        close_conn(w, index)


# ---------------------------------------------------------------- the queue

cdef bint queue_settings(Worker *w, uint32_t service_slot, uint32_t *max_queue,
                         uint32_t *timeout_ms) noexcept nogil:
    """The service's max_queue and queue_timeout_ms in the image held; False if torn or gone."""
    cdef flc_image_header *snap = w.snap
    cdef flc_service *service
    cdef uint64_t seq
    cdef int attempt
    if snap == NULL or service_slot >= FLC_MAX_SERVICES:
        return False
    for attempt in range(4):
        seq = flc_read_begin(snap)
        if seq & 1 or service_slot >= snap.n_services:
            return False
        service = &flc_services_of(snap)[service_slot]
        max_queue[0] = service.max_queue if service.active else 0
        timeout_ms[0] = service.queue_timeout_ms
        if flc_read_validate(snap, seq):
            return True
    return False


cdef void enter_queue(Worker *w, int index) noexcept nogil:
    """Queue ``c`` at the tail of its service's FIFO, within the service's
    max_queue node-wide (a fetch-add undone when over, so the bound holds
    whatever the workers do at once), or close it at once: rejected."""
    cdef Conn *c = &w.conns[index]
    cdef uint32_t slot = c.service_slot
    cdef flc_service_state *state = &w.service_states[slot]
    cdef uint32_t max_queue = 0, timeout_ms = 0
    cdef bint admitted = False
    # This worker's share moves before the shared count going up and after
    # it coming down: a worker killed in between leaves the count one low
    # (the agent takes its share out), never one high, which would make
    # every new connection of the service queue behind a ghost.
    if queue_settings(w, slot, &max_queue, &timeout_ms) and max_queue > 0:
        w.my_waiting[slot] += 1
        admitted = flc_add_fetch_i64(&state.waiting, 1) <= <int64_t>max_queue
        if not admitted:
            flc_add_i64(&state.waiting, -1)
            w.my_waiting[slot] -= 1
    if not admitted:
        flc_add_u64(&state.rejected, 1)
        close_conn(w, index)
        return
    flc_add_u64(&state.queued, 1)
    w.n_waiting += 1
    c.waiting = True
    c.state = CONN_WAITING
    c.queue_deadline_ms = w.now_ms + timeout_ms
    c.queue_next = -1
    c.queue_prev = w.queue_tail[slot]
    if c.queue_prev >= 0:
        w.conns[c.queue_prev].queue_next = index
    else:
        w.queue_head[slot] = index
    w.queue_tail[slot] = index
    w.queued_services |= (<uint64_t>1) << slot


cdef void leave_queue(Worker *w, int index) noexcept nogil:
    """Take ``c`` out of its queue and out of the waiting count: the one
    place that does, whether it is served, times out or is closed."""
    cdef Conn *c = &w.conns[index]
    cdef uint32_t slot = c.service_slot
    if not c.waiting:
        return
    if c.queue_prev >= 0:
        w.conns[c.queue_prev].queue_next = c.queue_next
    else:
        w.queue_head[slot] = c.queue_next
    if c.queue_next >= 0:
        w.conns[c.queue_next].queue_prev = c.queue_prev
    else:
        w.queue_tail[slot] = c.queue_prev
    if w.queue_head[slot] < 0:
        w.queued_services &= ~((<uint64_t>1) << slot)
    c.waiting = False
    c.queue_prev = c.queue_next = -1
    flc_add_i64(&w.service_states[slot].waiting, -1)
    w.my_waiting[slot] -= 1
    w.n_waiting -= 1


cdef void queue_timed_out(Worker *w, int index) noexcept nogil:
    flc_add_u64(&w.service_states[w.conns[index].service_slot].queue_timeouts, 1)
    close_conn(w, index)


cdef void serve_queue(Worker *w, uint32_t slot) noexcept nogil:
    """Connect the connections at the head of the service's queue while
    backends have room: FIFO, so one that finds them full keeps its place
    and those behind it wait too."""
    cdef int index, started
    while w.queue_head[slot] >= 0:
        index = w.queue_head[slot]
        if w.now_ms >= w.conns[index].queue_deadline_ms:
            queue_timed_out(w, index)
            continue
        started = connect_backend(w, index)
        if started == CONNECT_FULL:
            return
        if started == CONNECT_STARTED:
            leave_queue(w, index)
        else:
            close_conn(w, index)  # no backend left (its service gone, or none eligible)


cdef void serve_queues(Worker *w) noexcept nogil:
    cdef uint64_t services
    cdef int slot
    # the image published last, as at an accept: a drain the node reported
    # applied must not see a claim from the one before
    notice_image(w)
    services = w.queued_services
    w.queue_kick = False
    w.next_queue_poll_ms = w.now_ms + QUEUE_POLL_MS
    for slot in range(FLC_MAX_SERVICES):
        if services >> slot & 1:
            serve_queue(w, <uint32_t>slot)


cdef void pause_accepts(Worker *w) noexcept nogil:
    """Out of descriptors or memory: stop polling listeners for a while
    instead of spinning on a level-triggered listener that cannot accept."""
    cdef int slot
    cdef epoll_event ev
    if w.accepts_paused:
        return
    w.accepts_paused = True
    w.accepts_resume_ms = w.now_ms + ACCEPT_PAUSE_MS
    w.me.accept_pauses += 1
    release_spares(w)  # give descriptors and memory back while short of them
    for slot in range(FLC_MAX_SERVICES):
        if w.listen_fd[slot] >= 0:
            epoll_ctl(w.epfd, EPOLL_CTL_DEL, w.listen_fd[slot], &ev)


cdef void resume_accepts(Worker *w) noexcept nogil:
    cdef int slot
    w.accepts_paused = False
    for slot in range(FLC_MAX_SERVICES):
        if w.listen_fd[slot] >= 0:
            epoll_add(w, w.listen_fd[slot], EPOLLIN, token(TOKEN_LISTENER, 0, slot))


# ---------------------------------------------------------------- relay

cdef bint flush_pending(Direction *d, Side *dst) noexcept nogil:
    """Write what ``d`` holds to ``dst``. False on a hard error."""
    cdef ssize_t n
    if d.pipe_len > 0:
        n = splice(d.pipe_r, NULL, dst.fd, NULL, d.pipe_len, SPLICE_F_MOVE | SPLICE_F_NONBLOCK)
        if n < 0:
            if would_block():
                dst.writable = False
                return True
            return False
        d.pipe_len -= <uint32_t>n
        d.unflushed += <uint64_t>n
        if d.pipe_len > 0:
            dst.writable = False
    elif d.buf_len > 0:
        n = write(dst.fd, d.buf + d.buf_off, d.buf_len)
        if n < 0:
            if would_block():
                dst.writable = False
                return True
            return False
        d.buf_off += <uint32_t>n
        d.buf_len -= <uint32_t>n
        d.unflushed += <uint64_t>n
        if d.buf_len > 0:
            dst.writable = False
    return True


cdef bint hold_rest(Worker *w, Direction *d, const char *data, uint32_t length) noexcept nogil:
    """Keep bytes the destination did not take until it is writable again."""
    if d.buf == NULL:
        d.buf = take_buffer(w)
        if d.buf == NULL:
            return False
    memcpy(d.buf, data, length)
    d.buf_off = 0
    d.buf_len = length
    return True


cdef void set_nodelay(Side *s) noexcept nogil:
    cdef int one = 1
    setsockopt(s.fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one))
    s.nodelay = True


cdef bint read_some(Worker *w, Direction *d, Side *src, Side *dst) noexcept nogil:
    """One read from ``src``, written through to ``dst`` when possible.
    False on a hard error; sets d.eof at end of stream."""
    cdef ssize_t n, m
    if w.relay_mode == FLC_RELAY_SPLICE:
        d.splicing = True
        if not dst.nodelay:
            set_nodelay(dst)
    if d.splicing and d.pipe_r < 0 and not take_pipe(w, d):
        d.splicing = False  # no pipe to be had: bulk data takes read/write
    if d.splicing:
        n = splice(src.fd, NULL, d.pipe_w, NULL, PIPE_SIZE, SPLICE_F_MOVE | SPLICE_F_NONBLOCK)
    else:
        n = read(src.fd, w.scratch, RW_CHUNK)
    if n == 0:
        d.eof = True
        return True
    if n < 0:
        if would_block():
            src.readable = False
            return True
        return False
    if d.splicing:
        # A short splice proves nothing (the pipe may run out of slots before
        # the socket runs out of bytes): keep reading until EAGAIN.
        d.pipe_len = <uint32_t>n
        if n < SPLICE_LEAVE:
            d.splicing = False
        return True
    if n == RW_CHUNK:
        if w.relay_mode == FLC_RELAY_AUTO:
            d.splicing = True
        if not dst.nodelay:
            # Bulk data ends in a short segment that Nagle would hold until
            # the peer's delayed ACK (tens of ms); small exchanges are one
            # segment each and need no extra system call.
            set_nodelay(dst)
    elif src.rdhup and not src.err:
        # The peer's FIN came before this event and a short read emptied the
        # socket: the next read could only return 0, so skip it. (After a
        # reset it returns the error, which must end the pair as a reset.)
        d.eof = True
        src.readable = False
    else:
        src.readable = False  # short read: drained; the next edge says when more
    m = 0
    if dst.writable:
        m = write(dst.fd, w.scratch, <size_t>n)
        if m < 0:
            if not would_block():
                return False
            m = 0
        d.unflushed += <uint64_t>m
    if m < n:
        dst.writable = False
        return hold_rest(w, d, w.scratch + m, <uint32_t>(n - m))
    return True


cdef int pump(Worker *w, Direction *d, const Direction *other, Side *src, Side *dst) noexcept nogil:
    """Move bytes from ``src`` to ``dst`` until one side would block.
    Returns PUMP_IDLE, PUMP_MORE (stopped at the round bound with work left:
    no edge will announce it, so the caller queues the connection) or
    PUMP_ERROR (the connection is then closed)."""
    cdef int rounds
    for rounds in range(PUMP_ROUNDS):
        if d.pipe_len > 0 or d.buf_len > 0:
            if not dst.writable:
                return PUMP_IDLE
            if not flush_pending(d, dst):
                return PUMP_ERROR
            if d.pipe_len > 0 or d.buf_len > 0:
                return PUMP_IDLE
            if d.buf != NULL:
                give_buffer(w, d.buf)
                d.buf = NULL
            if not d.splicing:
                give_pipe(w, d)
        if d.eof:
            if not d.shut:
                # When the other way is finished too, the caller closes both
                # sockets, and close() sends the FIN: no shutdown needed.
                if not other.shut:
                    shutdown(dst.fd, SHUT_WR)
                d.shut = True
                give_pipe(w, d)
            return PUMP_IDLE
        if not src.readable:
            if d.pipe_len == 0:
                give_pipe(w, d)  # nothing in flight: the pipe goes back to the pool
            return PUMP_IDLE
        if not read_some(w, d, src, dst):
            return PUMP_ERROR
    return PUMP_MORE


cdef void relay(Worker *w, int index) noexcept nogil:
    cdef Conn *c = &w.conns[index]
    cdef int up = pump(w, &c.up, &c.down, &c.client, &c.backend)
    cdef int down = PUMP_ERROR
    if up != PUMP_ERROR:
        down = pump(w, &c.down, &c.up, &c.backend, &c.client)
    if not c.backend_spoke:
        note_backend_spoke(w, c)
    if up == PUMP_ERROR or down == PUMP_ERROR:
        abort_conn(w, index)
    elif c.up.shut and c.down.shut:
        close_conn(w, index)
    elif (up == PUMP_MORE or down == PUMP_MORE) and not c.queued and w.n_backlog < w.max_conns:
        c.queued = True
        w.backlog[w.n_backlog] = index
        w.n_backlog += 1


cdef void run_backlog(Worker *w) noexcept nogil:
    """Give queued connections another turn; they may queue themselves
    again for the next one."""
    cdef int n = w.n_backlog
    cdef int i, index
    cdef int batch[MAX_EVENTS]
    if n > MAX_EVENTS:
        n = MAX_EVENTS
    memcpy(batch, w.backlog, n * sizeof(int))
    memmove(w.backlog, w.backlog + n, (w.n_backlog - n) * sizeof(int))
    w.n_backlog -= n
    for i in range(n):
        index = batch[i]
        w.conns[index].queued = False
        if w.conns[index].state == CONN_RELAYING and not w.conns[index].aborting:
            relay(w, index)


cdef inline void note_events(Side *s, uint32_t events) noexcept nogil:
    if events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR):
        s.readable = True
    if events & (EPOLLOUT | EPOLLHUP | EPOLLERR):
        s.writable = True
    if events & (EPOLLRDHUP | EPOLLHUP | EPOLLERR):
        s.rdhup = True
    if events & EPOLLERR:
        s.err = True


cdef void on_conn_event(Worker *w, uint32_t kind, uint32_t tag, int index,
                        uint32_t events) noexcept nogil:
    cdef Conn *c
    if index >= w.max_conns:
        return
    c = &w.conns[index]
    if c.state == CONN_FREE:
        return
    if kind == TOKEN_CLIENT:
        if c.client.tag != tag:
            return  # stale: that connection is gone and the slot reused
        note_events(&c.client, events)
        # (a waiting client that only half-closed keeps its place: its
        # request waits in the kernel until a backend takes it)
        if (c.state == CONN_CONNECTING or c.state == CONN_WAITING) and events & (EPOLLERR | EPOLLHUP):
            if events & EPOLLERR:
                abort_conn(w, index)  # the client reset: so is the backend being reached
            else:
                close_conn(w, index)
            return
    else:
        if c.backend.tag != tag or c.backend.fd < 0:
            return  # stale: an earlier backend attempt of this connection
        if c.state == CONN_CONNECTING:
            if events & (EPOLLERR | EPOLLHUP):
                connect_failed(w, index)
                return
            if not events & EPOLLOUT:
                return
            connected(w, index)
        note_events(&c.backend, events)
    c.last_active_ms = w.now_ms
    if c.aborting:
        finish_abort(w, index)
        return
    if c.state == CONN_RELAYING:
        relay(w, index)  # the bytes that came before an error are read first; then the error aborts
        if events & EPOLLERR and c.state == CONN_RELAYING and not c.aborting:
            # A reset (or another error) on either side ends the pair now,
            # whether or not a direction is still moving: a side that
            # reached end of stream is never read again, so its error would
            # otherwise wait for the idle timeout.
            abort_conn(w, index)


# ---------------------------------------------------------------- time

cdef void tick(Worker *w) noexcept nogil:
    """Every TICK_MS: timeouts, byte counters, image notice, accept resume;
    the connections of rows closing in the image held are reset."""
    cdef int i
    cdef Conn *c
    cdef uint64_t idle_limit
    w.next_tick_ms = w.now_ms + TICK_MS
    if w.me.listening == 0 and not w.draining:
        w.generation = <uint64_t>-1  # a listener failed to open: try again
    notice_image(w)
    if w.accepts_paused and w.now_ms >= w.accepts_resume_ms and not w.draining:
        resume_accepts(w)
    for i in range(w.high_water):
        c = &w.conns[i]
        if c.state == CONN_FREE:
            continue
        if c.aborting:
            finish_abort(w, i)
        elif w.n_closing and c.holds_claim and slot_closing(w, c.backend_slot):
            abort_conn(w, i)  # its backend's drain timed out: closed abortively, as the operator asked
        elif c.state == CONN_WAITING:
            if w.now_ms >= c.queue_deadline_ms:
                queue_timed_out(w, i)  # (heads time out in serve_queue; this catches a shortened timeout)
        elif c.state == CONN_CONNECTING and c.backend.fd >= 0 and w.now_ms >= c.connect_deadline_ms:
            connect_failed(w, i)
        elif c.state == CONN_RELAYING:
            idle_limit = w.idle_timeout_ms
            if (c.up.shut or c.down.shut) and w.fin_timeout_ms < idle_limit:
                idle_limit = w.fin_timeout_ms  # one direction has ended: half-closed
            if w.now_ms - c.last_active_ms >= idle_limit:
                close_conn(w, i)
            else:
                flush_bytes(w, c)
        else:
            flush_bytes(w, c)


cdef void start_drain(Worker *w) noexcept nogil:
    cdef int slot, batch
    if w.draining:
        return
    # Take what is already queued on our listeners (with SO_REUSEPORT a
    # closed listener resets its queue), then stop accepting.
    for slot in range(FLC_MAX_SERVICES):
        for batch in range(w.max_conns // ACCEPT_BATCH + 1):
            if w.listen_fd[slot] < 0 or not accept_clients(w, slot):
                break
        close_listener(w, slot)
    w.draining = True
    w.drain_deadline_ms = w.now_ms + w.drain_timeout_ms


cdef void on_signal(Worker *w) noexcept nogil:
    cdef signalfd_siginfo info
    while read(w.sigfd, &info, sizeof(info)) == sizeof(info):
        if info.ssi_signo == SIGTERM or info.ssi_signo == SIGINT:
            start_drain(w)
        elif info.ssi_signo == SIGUSR1:
            notice_image(w)  # the agent published: take it up now


# ---------------------------------------------------------------- loop

cdef int event_loop(Worker *w) noexcept nogil:
    cdef epoll_event events[MAX_EVENTS]
    cdef int n, i, timeout
    cdef uint64_t data
    cdef uint32_t kind
    while True:
        w.now_ms = monotonic_ms()
        if w.draining and (w.n_open == 0 or w.now_ms >= w.drain_deadline_ms):
            return 0
        if w.now_ms >= w.next_tick_ms:
            tick(w)
        timeout = <int>(w.next_tick_ms - w.now_ms) if w.next_tick_ms > w.now_ms else 0
        if w.n_waiting > 0 and timeout > QUEUE_POLL_MS:
            timeout = QUEUE_POLL_MS  # slots other workers free are found by looking
        if w.n_backlog > 0:
            timeout = 0
        n = epoll_wait(w.epfd, events, MAX_EVENTS, timeout)
        if n < 0:
            if errno == EINTR:
                continue
            return -1
        w.now_ms = monotonic_ms()
        for i in range(n):
            data = events[i].data.u64
            kind = <uint32_t>(data >> 56)
            if kind == TOKEN_CLIENT or kind == TOKEN_BACKEND:
                on_conn_event(w, kind, <uint32_t>(data >> 24), <int>(data & 0xFFFFFF),
                              events[i].events)
            elif kind == TOKEN_LISTENER:
                if not w.draining and not w.accepts_paused:
                    accept_clients(w, <int>(data & 0xFFFFFF))
            elif kind == TOKEN_SIGNAL:
                on_signal(w)
        if w.n_backlog > 0:
            run_backlog(w)
        if w.n_waiting > 0 and (w.queue_kick or w.now_ms >= w.next_queue_poll_ms):
            serve_queues(w)


cdef int setup(Worker *w, const char *path, int index, int max_conns,
               uint64_t drain_timeout_ms) noexcept nogil:
    cdef int fd, i
    cdef sigset_t mask
    memset(w, 0, sizeof(Worker))
    w.index = index
    w.drain_timeout_ms = drain_timeout_ms
    w.epfd = w.sigfd = -1
    for i in range(FLC_MAX_SERVICES):
        w.listen_fd[i] = -1
    fd = open(path, O_RDWR | O_CLOEXEC)
    if fd < 0:
        return -1
    w.base = mmap(NULL, flc_segment_size(), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
    close(fd)
    if w.base == MAP_FAILED:
        return -2
    w.control = flc_control_of(w.base)
    if w.control.magic != FLC_MAGIC or w.control.layout_version != FLC_LAYOUT_VERSION:
        return -3
    w.counters = flc_counters_of(w.base)
    w.service_states = flc_service_states_of(w.base)
    w.me = &flc_workers_of(w.base)[index]
    w.my_active = flc_worker_active_of(w.base, index)
    w.my_waiting = flc_worker_waiting_of(w.base, index)
    for i in range(FLC_MAX_SERVICES):
        w.queue_head[i] = w.queue_tail[i] = -1
    w.max_conns = max_conns
    w.conns = <Conn *>calloc(max_conns, sizeof(Conn))
    w.backlog = <int *>calloc(max_conns, sizeof(int))
    w.scratch = <char *>calloc(1, RW_CHUNK)
    if w.conns == NULL or w.backlog == NULL or w.scratch == NULL:
        return -4
    for i in range(max_conns):
        w.conns[i].next_free = i + 1 if i + 1 < max_conns else -1
    w.free_head = 0
    w.epfd = epoll_create1(EPOLL_CLOEXEC)
    # Signals arrive as events: a handler cannot run while the loop holds no GIL.
    # A peer that resets while we write must cost an EPIPE, not the process.
    signal(SIGPIPE, SIG_IGN)
    sigemptyset(&mask)
    sigaddset(&mask, SIGTERM)
    sigaddset(&mask, SIGINT)
    sigaddset(&mask, SIGHUP)
    sigaddset(&mask, SIGUSR1)
    pthread_sigmask(SIG_BLOCK, &mask, NULL)
    w.sigfd = signalfd(-1, &mask, SFD_NONBLOCK | SFD_CLOEXEC)
    if w.epfd < 0 or w.sigfd < 0:
        return -5
    epoll_add(w, w.sigfd, EPOLLIN, token(TOKEN_SIGNAL, 0, 0))
    w.rng = flc_seed(<uint64_t>getpid())
    w.me.pid = getpid()
    w.generation = <uint64_t>-1
    w.now_ms = monotonic_ms()
    notice_image(w)
    return 0


cdef void teardown(Worker *w) noexcept nogil:
    cdef int i
    for i in range(w.max_conns):
        close_conn(w, i)
    for i in range(FLC_MAX_SERVICES):
        close_listener(w, i)
    release_spares(w)
    w.me.listening = 0
    w.me.active = 0
    free(w.conns)
    free(w.backlog)
    free(w.scratch)


def run(str segment_path, int index, int max_connections, int drain_timeout_ms,
        int parent_pid):
    """Serve until SIGTERM/SIGINT (then drain) or until the agent dies.
    Returns the process exit status."""
    cdef Worker w
    cdef bytes path = segment_path.encode()
    cdef const char *c_path = path
    cdef int rc
    cdef bint stopped_by_agent
    if not 0 <= index < FLC_MAX_WORKERS:
        raise ValueError(f"worker index {index} out of range")
    # The agent's death must not leave a worker serving on its own.
    prctl(PR_SET_PDEATHSIG, SIGTERM, 0, 0, 0)
    if getppid() != parent_pid:
        return 1
    with nogil:
        rc = setup(&w, c_path, index, max_connections, drain_timeout_ms)
    if rc != 0:
        raise OSError(f"worker {index}: setup failed ({rc}) on {segment_path}")
    # The whole loop runs without the GIL: it touches no Python object, and
    # signals reach it through signalfd, not Python handlers.
    with nogil:
        rc = event_loop(&w)
        stopped_by_agent = w.control.draining != 0  # the agent sets it before it stops us
        teardown(&w)
    if not stopped_by_agent:
        remove_orphaned_segment(segment_path, parent_pid)
    return 0 if rc == 0 else 1


def remove_orphaned_segment(str segment_path, int agent):
    """We were not stopped by the agent: if it died (killed: it removes its
    segment itself otherwise), nobody else will remove the segment. Only
    while the file at that name is still the dead agent's (a node started
    again meanwhile owns a new one); other workers keep their mappings of
    it until they finish draining. The agent's death is awaited briefly:
    our SIGTERM (PR_SET_PDEATHSIG) comes when the thread that started us
    exits, and its other threads may outlive it by a moment."""
    import os
    import time
    from lbcore.segment import Segment
    deadline = time.monotonic() + ORPHAN_WAIT_S
    while not _process_gone(agent):
        if time.monotonic() >= deadline:
            return  # alive: someone else stopped this worker, and the agent replaces it
        time.sleep(0.01)
    if Segment.owner_of(segment_path) == agent:
        try:
            os.unlink(segment_path)
        except FileNotFoundError:
            pass


ORPHAN_WAIT_S = 2.0


def _process_gone(int pid):
    """No such process, or one that has exited (a zombie not yet reaped)."""
    from pathlib import Path  # this module's open() is the system call
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return True
    return state in ("Z", "X")


def descriptors_needed(int max_connections):
    """The descriptors one worker may hold at once with ``max_connections``
    open: two sockets per connection, its pipe pool (two ends each), a
    listener per service, and its own few (epoll, signalfd, the segment,
    standard streams, the interpreter's). The node refuses a setting that
    needs more than the process may open (see lbcore.agent.check_descriptors)."""
    return 2 * max_connections + 2 * MAX_PIPES + FLC_MAX_SERVICES + 32
