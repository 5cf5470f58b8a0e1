from lbcore.balance.context cimport PickContext

cdef int pick(PickContext *ctx) noexcept nogil
cdef int pick_ramping(PickContext *ctx) noexcept nogil
