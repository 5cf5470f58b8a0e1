/* The node agent's write of an image (lbcore.image.publish_image):
 * one call per version, so the agent pays no Python cost per field or per
 * array; and the checksum read_image verifies. Workers never write
 * images and do not include this (their system calls are declared in
 * system.pxd; the agent's one clock read is here, with the write it stamps). */
#ifndef FULCRUM_PUBLISH_H
#define FULCRUM_PUBLISH_H

#include <stddef.h>
#include <string.h>
#include <time.h>
#include "fulcrum_atomic.h"

/* CRC-32C (Castagnoli, reflected 0x82F63B78): the x86 crc32 instruction
 * computes it 8 bytes at a time, four times faster than zlib's crc32 on an
 * image of a thousand backends; elsewhere, bit by bit (same values). */
static inline uint32_t flc_crc32c_portable(uint32_t crc, const uint8_t *p, size_t n)
{
    int bit;
    while (n--) {
        crc ^= *p++;
        for (bit = 0; bit < 8; bit++)
            crc = (crc >> 1) ^ (0x82F63B78u & (0u - (crc & 1u)));
    }
    return crc;
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
__attribute__((target("sse4.2")))
static uint32_t flc_crc32c_sse42(uint32_t crc, const uint8_t *p, size_t n)
{
    uint64_t wide = crc, word;
    for (; n >= 8; p += 8, n -= 8) {
        memcpy(&word, p, 8);
        wide = __builtin_ia32_crc32di(wide, word);
    }
    crc = (uint32_t)wide;
    while (n--)
        crc = __builtin_ia32_crc32qi(crc, *p++);
    return crc;
}

static inline uint32_t flc_crc32c(uint32_t crc, const void *data, size_t n)
{
    if (__builtin_cpu_supports("sse4.2"))
        return flc_crc32c_sse42(crc, (const uint8_t *)data, n);
    return flc_crc32c_portable(crc, (const uint8_t *)data, n);
}
#else
static inline uint32_t flc_crc32c(uint32_t crc, const void *data, size_t n)
{
    return flc_crc32c_portable(crc, (const uint8_t *)data, n);
}
#endif

/* CRC-32C of the used tables, in the order services, backends, table: what
 * the header's checksum holds. */
static inline uint32_t flc_image_checksum(const flc_service *services, uint32_t n_services,
                                             const flc_backend *backends, uint32_t n_backends,
                                             const uint32_t *table, uint32_t table_used)
{
    uint32_t crc = 0xFFFFFFFFu;
    crc = flc_crc32c(crc, services, n_services * sizeof(flc_service));
    crc = flc_crc32c(crc, backends, n_backends * sizeof(flc_backend));
    crc = flc_crc32c(crc, table, table_used * sizeof(uint32_t));
    return ~crc;
}

/* The clock of Python's time.monotonic_ns() on Linux. */
static inline uint64_t flc_monotonic_ns(void)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (uint64_t)now.tv_sec * 1000000000u + (uint64_t)now.tv_nsec;
}

/* Write the image into the buffer of `generation` (the one that is not
 * current) under its seqlock, then make it current. `fields` carries the
 * header's values (its magic, seq and checksum are set here). The caller
 * has checked the counts against the layout's limits. Returns the checksum. */
static inline uint32_t flc_publish_image(void *base, uint64_t generation,
                                            const flc_image_header *fields,
                                            const flc_service *services,
                                            const flc_backend *backends,
                                            const uint32_t *table)
{
    flc_image_header *h = flc_buffer_of(base, generation);
    uint32_t checksum = flc_image_checksum(services, fields->n_services, backends,
                                              fields->n_backends, table, fields->table_used);
    flc_write_begin(h);
    h->magic = FLC_MAGIC;
    h->layout_version = FLC_LAYOUT_VERSION;
    h->snapshot_version = fields->snapshot_version;
    h->checksum = checksum;
    h->n_services = fields->n_services;
    h->n_backends = fields->n_backends;
    h->table_used = fields->table_used;
    h->connect_timeout_ms = fields->connect_timeout_ms;
    h->idle_timeout_ms = fields->idle_timeout_ms;
    h->retries = fields->retries;
    h->relay_mode = fields->relay_mode;
    h->fin_timeout_ms = fields->fin_timeout_ms;
    h->source_ip = fields->source_ip;
    memcpy(flc_services_of(h), services, fields->n_services * sizeof(flc_service));
    memcpy(flc_backends_of(h), backends, fields->n_backends * sizeof(flc_backend));
    memcpy(flc_table_of(h), table, fields->table_used * sizeof(uint32_t));
    h->published_ns = flc_monotonic_ns();
    flc_write_end(h);
    flc_publish_generation(flc_control_of(base), generation);
    return checksum;
}

#endif
