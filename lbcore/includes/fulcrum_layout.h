/*
 * The shared-memory layout of one data-plane node, declared once.
 *
 * Readers: the Cython workers (cdef extern), the node agent and `lbproxy
 * stats` (through cffi, which parses the part between the LAYOUT markers),
 * and lbcore/layout.py, whose numpy dtypes a test checks against these sizes
 * and offsets.
 *
 * One segment per node, /dev/shm/fulcrum-<node id>:
 *
 *   flc_control                         generation, owner, drain flag
 *   flc_counter[FLC_MAX_BACKENDS]       per backend slot, shared by workers
 *   flc_service_state[FLC_MAX_SERVICES] per service slot (WRR cursor, ejection lock, queue)
 *   flc_worker_state[FLC_MAX_WORKERS]   per worker
 *   int32 worker_active[FLC_MAX_WORKERS][FLC_MAX_BACKENDS]
 *   int32 worker_waiting[FLC_MAX_WORKERS][FLC_MAX_SERVICES]
 *   flc_image buffer 0, buffer 1        double buffer, seqlock each
 *
 * An image buffer is a header, the service table, the backend table and a
 * pool of uint32 entries holding WRR schedules and Maglev lookup tables (each
 * entry an index into the backend table). The agent writes the buffer that is
 * not current, then stores the new generation; the current buffer is
 * generation & 1. Each buffer carries its own sequence number, odd while it is
 * being written, so a worker that read a buffer while the agent rewrote it
 * notices and reads again: no worker ever acts on a torn image.
 *
 * Passive ejection lives in the counters: workers count a slot's failures in
 * a row and set its ejected_until_ms (atomics); one worker at a time per
 * service decides an ejection, under the service's eject_lock, a try-lock (a
 * worker that finds it taken skips; the next failure tries again). The agent
 * frees the lock of a worker that died holding it, and writes local_down.
 *
 * A backend's lifecycle on the node: a row with max_conns > 0 takes no
 * pick while its node-wide active count is at the limit, and a claim that
 * overshoots is undone, so the limit is exact across workers. A new
 * connection that finds every backend of its service full waits in its
 * worker's queue; the service state counts the waiting node-wide (bounded
 * by the service's max_queue: a fetch-add undone when over). A worker's
 * share of each service's waiting (worker_waiting) lets the agent take the
 * share of a worker that died out of the count, as worker_active does for
 * active. Slow start: the agent stamps a counter's ramp_start_ms when the
 * backend becomes eligible, and picks decline the row with probability
 * 1 - f (f the ramp's share of its weight) until its window is over. A
 * row in drain (draining) is in the image but not eligible; closing: every
 * worker resets its connections to it.
 *
 * Addresses are IPv4, network byte order; ports are host byte order.
 * Counters are keyed by a backend slot that the agent keeps stable for a
 * backend across snapshot versions.
 */
#ifndef FULCRUM_LAYOUT_H
#define FULCRUM_LAYOUT_H
#include <stdint.h>

/* LAYOUT BEGIN */
#define FLC_MAGIC 1129076038
#define FLC_LAYOUT_VERSION 5
#define FLC_MAX_SERVICES 64
#define FLC_MAX_BACKENDS 16384
#define FLC_MAX_WORKERS 64
#define FLC_TABLE_POOL 4194304
#define FLC_MAGLEV_SIZE 65537
#define FLC_NAME_LEN 48

#define FLC_ALGO_WRR 0
#define FLC_ALGO_LEAST_CONN 1
#define FLC_ALGO_P2C 2
#define FLC_ALGO_MAGLEV 3

#define FLC_RELAY_AUTO 0        /* read/write, splice once a read fills the buffer */
#define FLC_RELAY_SPLICE 1      /* always splice */
#define FLC_RELAY_COPY 2        /* always read/write */

#define FLC_DRAIN_ACTIVE 0      /* flc_backend.drain */
#define FLC_DRAIN_DRAINING 1    /* no new connections; open ones continue */
#define FLC_DRAIN_CLOSING 2     /* its drain timed out: its connections are reset */

typedef struct {
    uint32_t magic;
    uint32_t layout_version;
    uint64_t generation;        /* current buffer = generation & 1 */
    int32_t owner_pid;          /* the node agent */
    uint32_t draining;          /* set on SIGTERM: stop accepting */
    uint8_t node_id[FLC_NAME_LEN];
    uint8_t pad[56];
} flc_control;

typedef struct {
    int64_t active;             /* open connections to this backend */
    uint64_t total;             /* connections established */
    uint64_t failed;            /* connects refused or timed out */
    uint64_t bytes_to_backend;
    uint64_t bytes_to_client;
    /* Passive ejection (node-local): workers count connect failures in a
     * row and eject the backend from their picks for a backed-off time. */
    uint32_t consecutive_failures;  /* refused, timed out or reset before its first byte, in a row */
    uint32_t ejections;         /* ejections in a row: the back-off exponent */
    uint64_t ejected_until_ms;  /* CLOCK_MONOTONIC ms; no pick before then */
    uint32_t local_down;        /* 1: the node's own probe verdict holds it down (the agent writes it) */
    /* Slow start: low 32 bits of CLOCK_MONOTONIC ms when this node first saw
     * the backend eligible (a computed 0 is stored as 1); 0: not ramping.
     * The agent writes it, and clears it once the ramp is over. */
    uint32_t ramp_start_ms;
} flc_counter;

typedef struct {
    uint64_t rr_cursor;         /* shared by all workers: exact WRR shares */
    uint64_t accepted;
    uint64_t panics;            /* connections routed in panic: all left were ejected or down */
    uint32_t eject_lock;        /* 0 free, else the holding worker's index + 1 */
    uint32_t pad;
    int64_t waiting;            /* connections queued now, all workers (bounded by max_queue) */
    uint64_t queued;            /* connections that entered the queue */
    uint64_t queue_timeouts;    /* closed after waiting queue_timeout_ms */
    uint64_t rejected;          /* closed at once: every backend full and the queue full (or none) */
} flc_service_state;

typedef struct {
    int32_t pid;
    uint32_t listening;         /* 1 once every listener is open */
    uint64_t generation;        /* last generation this worker noticed */
    uint64_t accepted;
    int64_t active;
    uint64_t accept_pauses;     /* EMFILE / ENFILE / ENOBUFS */
    uint64_t pad[3];
} flc_worker_state;

typedef struct {
    uint32_t magic;
    uint32_t layout_version;
    uint64_t seq;               /* odd while the agent writes this buffer */
    uint64_t snapshot_version;
    uint32_t checksum;          /* CRC-32C of the used part of the tables */
    uint32_t n_services;        /* service slots in use: [0, n_services) */
    uint32_t n_backends;        /* backend rows in use: [0, n_backends) */
    uint32_t table_used;
    uint32_t connect_timeout_ms;
    uint32_t idle_timeout_ms;
    uint32_t retries;           /* further backends tried after a failed connect */
    uint32_t relay_mode;        /* FLC_RELAY_*: how bytes are moved */
    uint32_t fin_timeout_ms;    /* a pair with one direction ended, silent this long, closes */
    uint32_t source_ip;         /* backend connects leave from this address; 0: the system's choice */
    uint64_t published_ns;      /* CLOCK_MONOTONIC when the agent published it */
} flc_image_header;

typedef struct {
    uint8_t name[FLC_NAME_LEN];
    uint32_t listen_ip;
    uint16_t listen_port;
    uint8_t algorithm;
    uint8_t active;             /* 0: slot unused, its listener is closed */
    uint32_t backend_first;     /* rows [first, first + count) of backends */
    uint32_t backend_count;
    uint32_t schedule_offset;   /* WRR schedule in the pool, eligible only */
    uint32_t schedule_len;
    uint32_t maglev_offset;     /* Maglev table in the pool, or len 0 */
    uint32_t maglev_len;
    uint32_t eligible_count;
    uint32_t consecutive_failures;  /* outlier: failures in a row that eject (0: never) */
    uint32_t base_ejection_ms;  /* the first ejection's length, doubled on each repeat */
    uint32_t max_ejection_ms;   /* the longest ejection */
    uint32_t max_ejection_percent;  /* of the service's rows, counted after the new ejection */
    uint32_t slow_start_ms;     /* a backend's ramp after it becomes eligible (0: none) */
    uint32_t slow_start_min_permille;  /* the ramp's least share of the weight, x 1000 */
    uint32_t max_queue;         /* connections waiting at most, node-wide (0: none wait) */
    double slow_start_exponent; /* 1 / aggression */
    uint32_t queue_timeout_ms;  /* a connection waits this long at most */
    uint32_t closing_count;     /* rows with drain FLC_DRAIN_CLOSING */
} flc_service;

typedef struct {
    uint8_t id[FLC_NAME_LEN];
    uint32_t ip;
    uint16_t port;
    uint16_t weight;
    uint32_t slot;              /* counter slot, stable across versions */
    uint32_t service_slot;
    uint8_t eligible;           /* up, active (drain FLC_DRAIN_ACTIVE) and weight > 0 */
    uint8_t drain;              /* FLC_DRAIN_*: a draining or closing row is never eligible */
    uint8_t pad[2];
    uint32_t max_conns;         /* open connections at most, node-wide (0: no limit) */
} flc_backend;
/* LAYOUT END */

#define FLC_OFF_COUNTERS ((uint64_t)sizeof(flc_control))
#define FLC_OFF_SERVICE_STATE \
    (FLC_OFF_COUNTERS + (uint64_t)FLC_MAX_BACKENDS * sizeof(flc_counter))
#define FLC_OFF_WORKERS \
    (FLC_OFF_SERVICE_STATE + (uint64_t)FLC_MAX_SERVICES * sizeof(flc_service_state))
#define FLC_OFF_WORKER_ACTIVE \
    (FLC_OFF_WORKERS + (uint64_t)FLC_MAX_WORKERS * sizeof(flc_worker_state))
#define FLC_OFF_WORKER_WAITING \
    (FLC_OFF_WORKER_ACTIVE + (uint64_t)FLC_MAX_WORKERS * FLC_MAX_BACKENDS * 4u)
#define FLC_OFF_BUFFERS \
    (FLC_OFF_WORKER_WAITING + (uint64_t)FLC_MAX_WORKERS * FLC_MAX_SERVICES * 4u)

#define FLC_BUF_OFF_SERVICES ((uint64_t)sizeof(flc_image_header))
#define FLC_BUF_OFF_BACKENDS \
    (FLC_BUF_OFF_SERVICES + (uint64_t)FLC_MAX_SERVICES * sizeof(flc_service))
#define FLC_BUF_OFF_TABLE \
    (FLC_BUF_OFF_BACKENDS + (uint64_t)FLC_MAX_BACKENDS * sizeof(flc_backend))
#define FLC_BUFFER_SIZE (FLC_BUF_OFF_TABLE + (uint64_t)FLC_TABLE_POOL * 4u)
#define FLC_SEGMENT_SIZE (FLC_OFF_BUFFERS + 2u * FLC_BUFFER_SIZE)

#endif
