# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Smooth weighted round robin with an O(1) pick.

The agent precomputes the schedule (``lbcore.snapshot.wrr_schedule``): each
eligible backend appears ``weight`` times, interleaved smoothly. Workers share
one cursor per service in shared memory, so the shares are exact across all
workers of a node, not only per worker.
"""
from libc.stdint cimport uint32_t, uint64_t
from lbcore.includes.layout cimport flc_fetch_inc_u64
from lbcore.balance.pick cimport PickContext, is_excluded, table_in_pool


cdef int pick(PickContext *ctx) noexcept nogil:
    cdef uint32_t offset = ctx.service.schedule_offset
    cdef uint32_t length = ctx.service.schedule_len
    cdef uint32_t tries, row
    cdef uint64_t cursor
    if not table_in_pool(offset, length):
        return -1
    # A retry skips the rows already tried; a schedule of length L holds every
    # eligible row, so L steps are enough to find any that is left.
    for tries in range(length):
        cursor = flc_fetch_inc_u64(&ctx.service_state.rr_cursor)
        row = ctx.table[offset + <uint32_t>(cursor % length)]
        if not is_excluded(ctx, row):
            return <int>row
    return -1
