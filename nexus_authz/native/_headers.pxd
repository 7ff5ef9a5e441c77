from nexus_authz.native._figures cimport Figure

cdef enum:
    BLOCK_BYTES = 16384  # the most figure_block writes

cdef Py_ssize_t figure_block(tuple plan, Figure* figures, Py_ssize_t n, char* out) except -2
