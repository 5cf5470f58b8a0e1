from lbcore.balance.pick cimport PickContext

cdef int pick(PickContext *ctx) noexcept nogil
