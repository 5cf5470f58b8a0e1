# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Maglev consistent hashing on the client address.

``build_table`` fills a lookup table of prime size (65537) from each eligible
backend's permutation, derived from the backend's id (not its position), so a
backend keeps its keys when others come and go; weights give a backend
proportionally more turns. The agent builds the table; a worker's pick is one
table read, plus a short probe when a retry excludes the first choice.
"""
import hashlib

from libc.stdint cimport uint32_t, uint64_t, int64_t
from lbcore.balance.context cimport PickContext, is_excluded, scan_for_any, table_in_pool

cdef enum:
    PROBES = 64   # bound on the probe after a failed connect excludes rows

cdef uint32_t EMPTY = 0xFFFFFFFF


cdef int pick(PickContext *ctx) noexcept nogil:
    cdef uint32_t offset = ctx.service.maglev_offset
    cdef uint32_t length = ctx.service.maglev_len
    cdef uint32_t position, row
    cdef int i
    if not table_in_pool(offset, length):
        return -1
    position = ctx.client_hash % length
    for i in range(PROBES):
        row = ctx.table[offset + position]
        if not is_excluded(ctx, row):
            return <int>row
        position = (position + 1) % length
    return scan_for_any(ctx, ctx.client_hash)


def permutation_seeds(ids, uint32_t size):
    """(offset, skip) per backend id: the permutation is a function of the id."""
    import numpy as np  # here, not at import: workers load this module too
    digests = b"".join([hashlib.blake2b(i.encode(), digest_size=16).digest() for i in ids])
    halves = np.frombuffer(digests, dtype="<u8").reshape(-1, 2)
    offsets = (halves[:, 0] % size).astype(np.uint32)
    skips = (halves[:, 1] % (size - 1) + 1).astype(np.uint32)
    return offsets, skips


def build_table(ids, weights, rows, uint32_t size=65537):
    """The Maglev lookup table: ``size`` entries, each one of ``rows``.

    ``ids``, ``weights`` and ``rows`` describe the eligible backends (weight >
    0); ``size`` must be prime. Returns a uint32 array of rows.
    """
    import numpy as np
    cdef Py_ssize_t n = len(ids)
    if n == 0:
        return np.empty(0, dtype=np.uint32)
    offsets_arr, skips_arr = permutation_seeds(ids, size)
    cdef uint32_t[::1] offsets = offsets_arr
    cdef uint32_t[::1] skips = skips_arr
    cdef int64_t[::1] weight = np.asarray(weights, dtype=np.int64)
    cdef uint32_t[::1] row_of = np.asarray(rows, dtype=np.uint32)
    cdef int64_t max_weight = max(int(w) for w in weights)
    table_arr = np.full(size, EMPTY, dtype=np.uint32)
    cdef uint32_t[::1] table = table_arr
    cdef uint64_t[::1] next_index = np.zeros(n, dtype=np.uint64)
    cdef int64_t[::1] credit = np.zeros(n, dtype=np.int64)
    cdef uint64_t filled = 0
    cdef uint64_t position
    cdef Py_ssize_t i
    with nogil:
        while filled < size:
            for i in range(n):
                # A backend takes one turn per max_weight of credit: the
                # heaviest takes one every round, lighter ones proportionally.
                credit[i] += weight[i]
                if credit[i] < max_weight:
                    continue
                credit[i] -= max_weight
                position = (offsets[i] + next_index[i] * skips[i]) % size
                while table[position] != EMPTY:
                    next_index[i] += 1
                    position = (offsets[i] + next_index[i] * skips[i]) % size
                table[position] = row_of[i]
                next_index[i] += 1
                filled += 1
                if filled == size:
                    break
    return table_arr
