# The shared-memory layout and its atomic accessors, from the one C header.
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int32_t, int64_t


cdef extern from "fulcrum_atomic.h" nogil:
    enum:
        FLC_MAGIC
        FLC_LAYOUT_VERSION
        FLC_MAX_SERVICES
        FLC_MAX_BACKENDS
        FLC_MAX_WORKERS
        FLC_TABLE_POOL
        FLC_MAGLEV_SIZE
        FLC_NAME_LEN
        FLC_ALGO_WRR
        FLC_ALGO_LEAST_CONN
        FLC_ALGO_P2C
        FLC_ALGO_MAGLEV
        FLC_RELAY_AUTO
        FLC_RELAY_SPLICE
        FLC_RELAY_COPY
        FLC_DRAIN_ACTIVE
        FLC_DRAIN_DRAINING
        FLC_DRAIN_CLOSING

    ctypedef struct flc_control:
        uint32_t magic
        uint32_t layout_version
        uint64_t generation
        int32_t owner_pid
        uint32_t draining

    ctypedef struct flc_counter:
        int64_t active
        uint64_t total
        uint64_t failed
        uint64_t bytes_to_backend
        uint64_t bytes_to_client
        uint32_t consecutive_failures
        uint32_t ejections
        uint64_t ejected_until_ms
        uint32_t local_down
        uint32_t ramp_start_ms

    ctypedef struct flc_service_state:
        uint64_t rr_cursor
        uint64_t accepted
        uint64_t panics
        uint32_t eject_lock
        int64_t waiting
        uint64_t queued
        uint64_t queue_timeouts
        uint64_t rejected

    ctypedef struct flc_worker_state:
        int32_t pid
        uint32_t listening
        uint64_t generation
        uint64_t accepted
        int64_t active
        uint64_t accept_pauses

    ctypedef struct flc_image_header:
        uint32_t magic
        uint32_t layout_version
        uint64_t seq
        uint64_t snapshot_version
        uint32_t checksum
        uint32_t n_services
        uint32_t n_backends
        uint32_t table_used
        uint32_t connect_timeout_ms
        uint32_t idle_timeout_ms
        uint32_t retries
        uint32_t relay_mode
        uint32_t fin_timeout_ms
        uint32_t source_ip

    ctypedef struct flc_service:
        uint8_t name[48]
        uint32_t listen_ip
        uint16_t listen_port
        uint8_t algorithm
        uint8_t active
        uint32_t backend_first
        uint32_t backend_count
        uint32_t schedule_offset
        uint32_t schedule_len
        uint32_t maglev_offset
        uint32_t maglev_len
        uint32_t eligible_count
        uint32_t consecutive_failures
        uint32_t base_ejection_ms
        uint32_t max_ejection_ms
        uint32_t max_ejection_percent
        uint32_t slow_start_ms
        uint32_t slow_start_min_permille
        uint32_t max_queue
        double slow_start_exponent
        uint32_t queue_timeout_ms
        uint32_t closing_count

    ctypedef struct flc_backend:
        uint8_t id[48]
        uint32_t ip
        uint16_t port
        uint16_t weight
        uint32_t slot
        uint32_t service_slot
        uint8_t eligible
        uint8_t drain
        uint32_t max_conns

    uint64_t flc_load_acquire_u64(const uint64_t *p)
    int64_t flc_load_i64(const int64_t *p)
    uint64_t flc_load_u64(const uint64_t *p)
    void flc_store_u64(uint64_t *p, uint64_t v)
    uint32_t flc_load_u32(const uint32_t *p)
    void flc_store_u32(uint32_t *p, uint32_t v)
    uint32_t flc_add_fetch_u32(uint32_t *p, uint32_t v)
    bint flc_cas_u32(uint32_t *p, uint32_t expected, uint32_t desired)
    void flc_store_release_u32(uint32_t *p, uint32_t v)
    void flc_add_i64(int64_t *p, int64_t v)
    int64_t flc_add_fetch_i64(int64_t *p, int64_t v)
    void flc_add_u64(uint64_t *p, uint64_t v)
    uint64_t flc_fetch_inc_u64(uint64_t *p)
    bint flc_cas_i64(int64_t *p, int64_t expected, int64_t desired)
    uint64_t flc_read_begin(const flc_image_header *h)
    bint flc_read_validate(const flc_image_header *h, uint64_t seq)

    flc_control *flc_control_of(void *base)
    flc_counter *flc_counters_of(void *base)
    flc_service_state *flc_service_states_of(void *base)
    flc_worker_state *flc_workers_of(void *base)
    int32_t *flc_worker_active_of(void *base, uint32_t worker)
    int32_t *flc_worker_waiting_of(void *base, uint32_t worker)
    flc_image_header *flc_buffer_of(void *base, uint64_t generation)
    flc_service *flc_services_of(flc_image_header *h)
    flc_backend *flc_backends_of(flc_image_header *h)
    uint32_t *flc_table_of(flc_image_header *h)
    uint64_t flc_segment_size()


cdef extern from "fulcrum_hash.h" nogil:
    uint32_t flc_hash_address(uint32_t ip)
    uint64_t flc_next_random(uint64_t *state)
    uint64_t flc_seed(uint64_t pid)
