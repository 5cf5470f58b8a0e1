from lbcore.balance.context cimport PickContext

cdef int pick(PickContext *ctx) noexcept nogil
