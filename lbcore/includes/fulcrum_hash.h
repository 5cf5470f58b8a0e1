/* Small mixing functions of the data path, kept in C for exact unsigned
 * arithmetic. The Python side (lbcore.balance.probe) exposes the same. */
#ifndef FULCRUM_HASH_H
#define FULCRUM_HASH_H
#include <stdint.h>

/* murmur3 finalizer: spreads neighbouring client addresses over Maglev. */
static inline uint32_t flc_hash_address(uint32_t ip)
{
    ip ^= ip >> 16;
    ip *= 0x85ebca6bu;
    ip ^= ip >> 13;
    ip *= 0xc2b2ae35u;
    ip ^= ip >> 16;
    return ip;
}

/* xorshift64*: per-worker randomness for power of two choices. */
static inline uint64_t flc_next_random(uint64_t *state)
{
    uint64_t x = *state;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *state = x;
    return x * 2685821657736338717ull;
}

static inline uint64_t flc_seed(uint64_t pid)
{
    return (pid * 0x9E3779B97F4A7C15ull) | 1u;
}
#endif
