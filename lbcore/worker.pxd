# The worker's state: one Worker per process, a fixed pool of Conn.
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int32_t, int64_t
from lbcore.balance.context cimport MAX_EXCLUDED
from lbcore.includes.layout cimport (
    flc_control, flc_counter, flc_service_state, flc_worker_state, flc_image_header,
    FLC_MAX_SERVICES,
)

cdef enum:
    RW_CHUNK = 16384          # read/write path: one read of at most this
    PIPE_SIZE = 1048576       # splice path: a pipe's capacity (F_SETPIPE_SZ), moved per call
    SPLICE_LEAVE = 4096       # a splice read smaller than this returns to read/write
    MAX_EVENTS = 256
    ACCEPT_BATCH = 32         # accepts per listener event, so relays are not starved
    TICK_MS = 100             # timeouts, counter flush and image notice when idle
    ACCEPT_PAUSE_MS = 100     # after EMFILE / ENFILE: retry accepting after this
    MAX_PIPES = 512           # pipes per worker; beyond, bulk data uses read/write
    MAX_SPARE_BUFFERS = 256   # pending-data buffers kept for reuse
    PUMP_ROUNDS = 16          # reads per direction per turn: others get theirs
    CLAIM_ATTEMPTS = 8        # least_conn compare-and-swap tries before a plain claim
    MAX_BACKOFF = 64          # ejections in a row counted at most (the back-off is capped long before)
    ABORT_FLUSH_MS = 2000     # an aborted pair's last bytes: sent before the reset, for at most this
    PANIC_RECHECK_MS = 10     # a service found in panic is picked in panic this long before a new look
    QUEUE_POLL_MS = 5         # while connections wait: a look for slots other workers freed, at least this often
    CLOSING_WORDS = 256       # FLC_MAX_BACKENDS / 64: a bit per backend slot

cdef enum PumpResult:
    PUMP_IDLE = 0
    PUMP_MORE = 1
    PUMP_ERROR = 2

cdef enum ConnState:
    CONN_FREE = 0
    CONN_CONNECTING = 1
    CONN_RELAYING = 2
    CONN_WAITING = 3          # accepted, every backend of its service full: in its queue, no backend yet

cdef enum Connect:
    CONNECT_NONE = 0          # no backend left to try: the client is closed
    CONNECT_STARTED = 1
    CONNECT_FULL = 2          # every backend it may take is at its max_conns: it may wait

cdef enum TokenKind:
    TOKEN_LISTENER = 1
    TOKEN_CLIENT = 2
    TOKEN_BACKEND = 3
    TOKEN_SIGNAL = 4


cdef struct Side:
    int fd
    uint32_t tag              # in the epoll token: events of a closed fd are stale
    bint readable             # edge-triggered: ready until read says otherwise
    bint writable
    bint rdhup                # peer sent FIN: read until 0 even after a short read
    bint err                  # an error (a reset) is pending: read until it, never infer a FIN
    bint nodelay              # TCP_NODELAY set (once bulk data flows towards it)


cdef struct Direction:
    char *buf                 # bytes read but not yet written (rare: held only then)
    uint32_t buf_off
    uint32_t buf_len
    int pipe_r                # spliced bytes in flight; -1 when no pipe is held
    int pipe_w
    uint32_t pipe_len
    bint splicing             # the last read filled RW_CHUNK: bulk, use splice
    bint eof                  # the source returned 0
    bint shut                 # SHUT_WR sent to the destination
    uint64_t unflushed        # bytes not yet added to the shared counters


cdef struct Conn:
    ConnState state
    Side client
    Side backend
    Direction up              # client -> backend
    Direction down            # backend -> client
    uint32_t service_slot
    uint32_t backend_slot
    bint holds_claim          # counted in the backend's active count
    bint backend_spoke        # a byte or a clean FIN came from the backend: its connect did not fail
    uint32_t client_hash
    uint32_t tried[MAX_EXCLUDED]
    int n_tried
    uint64_t connect_deadline_ms
    uint64_t last_active_ms
    int next_free
    bint queued               # in the backlog: more to move, no edge will come
    bint aborting             # reset on its way: what was read goes out first (abort_conn)
    uint64_t abort_deadline_ms
    bint waiting              # in its service's queue (counted in the service's waiting)
    int queue_prev            # the queue's neighbours (connection indices, -1 at the ends)
    int queue_next
    uint64_t queue_deadline_ms


cdef struct Worker:
    int index
    int epfd
    int sigfd
    void *base
    flc_control *control
    flc_counter *counters
    flc_service_state *service_states
    flc_worker_state *me
    int32_t *my_active        # this worker's share of each slot's active count
    flc_image_header *snap
    uint64_t generation
    uint32_t connect_timeout_ms
    uint32_t idle_timeout_ms
    uint32_t fin_timeout_ms
    uint32_t retries
    uint32_t relay_mode
    uint32_t source_ip        # backend connects bind to it (network order); 0: the system's choice
    int listen_fd[FLC_MAX_SERVICES]
    uint32_t listen_ip[FLC_MAX_SERVICES]
    uint16_t listen_port[FLC_MAX_SERVICES]
    Conn *conns
    int high_water            # connection slots in [high_water, max) were never used
    int *backlog              # connections a bounded pump left with work
    int n_backlog
    int max_conns
    int free_head
    int n_open
    char *scratch
    int pipes[2 * MAX_PIPES]  # spare pipes: pairs (read end, write end)
    int n_spare_pipes
    int n_pipes               # pipes that exist, spare or held
    char *spare_buffers[MAX_SPARE_BUFFERS]
    int n_spare_buffers
    uint32_t next_tag
    uint64_t now_ms
    uint64_t next_tick_ms
    bint draining
    uint64_t drain_deadline_ms
    uint64_t drain_timeout_ms
    bint accepts_paused
    uint64_t accepts_resume_ms
    uint64_t rng
    uint64_t tiebreak
    uint64_t panic_until_ms[FLC_MAX_SERVICES]  # per service: in panic until then (no scan per connection)
    int32_t *my_waiting       # this worker's share of each service's waiting count
    int queue_head[FLC_MAX_SERVICES]  # per service: FIFO of waiting connections (-1: empty)
    int queue_tail[FLC_MAX_SERVICES]
    uint64_t queued_services  # bit s: service slot s has connections waiting here
    int n_waiting
    bint queue_kick           # a claim was dropped here: try the queues' heads now
    uint64_t next_queue_poll_ms
    uint64_t closing[CLOSING_WORDS]  # bit per slot: its row is closing in the image held (reset its connections)
    int n_closing             # slots marked in ``closing``
