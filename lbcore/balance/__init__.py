"""Backend selection: one module per algorithm behind one cdef interface.

Each algorithm module exports ``cdef int pick(PickContext *ctx) noexcept
nogil`` (see ``pick.pxd``), returning a row of the snapshot's backend table or
-1. Tables the picks read (WRR schedule, Maglev lookup table) are built by the
node agent (``lbcore.image``), never by workers.
"""

ALGORITHMS = {"wrr": 0, "least_conn": 1, "p2c": 2, "maglev": 3}
