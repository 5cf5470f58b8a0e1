/*
 * Atomic access to the shared segment, declared once for the workers
 * (Cython, cdef extern) and the agent (cffi). Every function that writes
 * shared state says who may call it.
 */
#ifndef FULCRUM_ATOMIC_H
#define FULCRUM_ATOMIC_H
#include <stdint.h>
#include "fulcrum_layout.h"

static inline uint64_t flc_load_acquire_u64(const uint64_t *p)
{
    return __atomic_load_n(p, __ATOMIC_ACQUIRE);
}

static inline int64_t flc_load_i64(const int64_t *p)
{
    return __atomic_load_n(p, __ATOMIC_RELAXED);
}

static inline uint64_t flc_load_u64(const uint64_t *p)
{
    return __atomic_load_n(p, __ATOMIC_RELAXED);
}

static inline void flc_add_i64(int64_t *p, int64_t v)
{
    __atomic_fetch_add(p, v, __ATOMIC_RELAXED);
}

/* Returns the value after the addition: a bound (max_conns, max_queue)
 * is checked on what this very addition made, then undone when over. */
static inline int64_t flc_add_fetch_i64(int64_t *p, int64_t v)
{
    return __atomic_add_fetch(p, v, __ATOMIC_RELAXED);
}

static inline void flc_add_u64(uint64_t *p, uint64_t v)
{
    __atomic_fetch_add(p, v, __ATOMIC_RELAXED);
}

static inline uint64_t flc_fetch_inc_u64(uint64_t *p)
{
    return __atomic_fetch_add(p, 1, __ATOMIC_RELAXED);
}

static inline void flc_store_u64(uint64_t *p, uint64_t v)
{
    __atomic_store_n(p, v, __ATOMIC_RELAXED);
}

static inline uint32_t flc_load_u32(const uint32_t *p)
{
    return __atomic_load_n(p, __ATOMIC_RELAXED);
}

static inline void flc_store_u32(uint32_t *p, uint32_t v)
{
    __atomic_store_n(p, v, __ATOMIC_RELAXED);
}

/* Returns the value after the addition. */
static inline uint32_t flc_add_fetch_u32(uint32_t *p, uint32_t v)
{
    return __atomic_add_fetch(p, v, __ATOMIC_RELAXED);
}

/* The ejection lock of a service (flc_service_state.eject_lock): taken by a
 * worker with expected 0, given back with a release store of 0; the agent
 * frees a dead worker's with expected = its index + 1. */
static inline int flc_cas_u32(uint32_t *p, uint32_t expected, uint32_t desired)
{
    return __atomic_compare_exchange_n(p, &expected, desired, 0,
                                       __ATOMIC_ACQ_REL, __ATOMIC_RELAXED);
}

static inline void flc_store_release_u32(uint32_t *p, uint32_t v)
{
    __atomic_store_n(p, v, __ATOMIC_RELEASE);
}

/* Least-connections claims a backend only if no other worker changed its
 * count since the scan: the chosen count is then still the minimum. */
static inline int flc_cas_i64(int64_t *p, int64_t expected, int64_t desired)
{
    return __atomic_compare_exchange_n(p, &expected, desired, 0,
                                       __ATOMIC_ACQ_REL, __ATOMIC_RELAXED);
}

/* Seqlock, writer side: the node agent only, one publisher at a time. */
static inline void flc_write_begin(flc_image_header *h)
{
    __atomic_store_n(&h->seq, h->seq + 1, __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_RELEASE);
}

static inline void flc_write_end(flc_image_header *h)
{
    __atomic_store_n(&h->seq, h->seq + 1, __ATOMIC_RELEASE);
}

static inline void flc_publish_generation(flc_control *c, uint64_t generation)
{
    __atomic_store_n(&c->generation, generation, __ATOMIC_RELEASE);
}

/* Seqlock, reader side: begin returns an even sequence to validate against;
 * validate is true when nothing was written in between. */
static inline uint64_t flc_read_begin(const flc_image_header *h)
{
    return __atomic_load_n(&h->seq, __ATOMIC_ACQUIRE);
}

static inline int flc_read_validate(const flc_image_header *h, uint64_t seq)
{
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    return (seq & 1) == 0 && __atomic_load_n(&h->seq, __ATOMIC_RELAXED) == seq;
}

/* Segment addressing, so that no caller repeats the offset arithmetic. */
static inline flc_control *flc_control_of(void *base)
{
    return (flc_control *)base;
}

static inline flc_counter *flc_counters_of(void *base)
{
    return (flc_counter *)((char *)base + FLC_OFF_COUNTERS);
}

static inline flc_service_state *flc_service_states_of(void *base)
{
    return (flc_service_state *)((char *)base + FLC_OFF_SERVICE_STATE);
}

static inline flc_worker_state *flc_workers_of(void *base)
{
    return (flc_worker_state *)((char *)base + FLC_OFF_WORKERS);
}

static inline int32_t *flc_worker_active_of(void *base, uint32_t worker)
{
    return (int32_t *)((char *)base + FLC_OFF_WORKER_ACTIVE)
           + (uint64_t)worker * FLC_MAX_BACKENDS;
}

static inline int32_t *flc_worker_waiting_of(void *base, uint32_t worker)
{
    return (int32_t *)((char *)base + FLC_OFF_WORKER_WAITING)
           + (uint64_t)worker * FLC_MAX_SERVICES;
}

static inline flc_image_header *flc_buffer_of(void *base, uint64_t generation)
{
    return (flc_image_header *)((char *)base + FLC_OFF_BUFFERS
                                   + (generation & 1) * FLC_BUFFER_SIZE);
}

static inline flc_service *flc_services_of(flc_image_header *h)
{
    return (flc_service *)((char *)h + FLC_BUF_OFF_SERVICES);
}

static inline flc_backend *flc_backends_of(flc_image_header *h)
{
    return (flc_backend *)((char *)h + FLC_BUF_OFF_BACKENDS);
}

static inline uint32_t *flc_table_of(flc_image_header *h)
{
    return (uint32_t *)((char *)h + FLC_BUF_OFF_TABLE);
}

static inline uint64_t flc_segment_size(void) { return FLC_SEGMENT_SIZE; }
static inline uint64_t flc_off_buffers(void) { return FLC_OFF_BUFFERS; }
static inline uint64_t flc_buffer_size(void) { return FLC_BUFFER_SIZE; }
static inline uint64_t flc_off_worker_active(void) { return FLC_OFF_WORKER_ACTIVE; }
static inline uint64_t flc_off_worker_waiting(void) { return FLC_OFF_WORKER_WAITING; }
#endif
