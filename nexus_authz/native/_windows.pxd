from nexus_authz.native._figures cimport Figure

cdef object acquire_figures(object self, object counter_ids, object specs, object costs, object now,
                            Figure* figures, unsigned long long* uncharged)
cdef tuple figure_statuses(object specs, Figure* figures, Py_ssize_t n)
cdef object adjust_c(object self, object counter_ids, object specs, const long long* deltas, object now,
                     object charged_at)
