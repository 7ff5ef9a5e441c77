# One window's figures of an admission, as the compiled lane reads them without a WindowStatus:
# _windows.acquire_figures writes them, _headers.figure_block formats them (declarations only).

cdef struct Figure:
    long long remaining
    long long limit
    double reset_after
    double retry_after
    bint allowed
