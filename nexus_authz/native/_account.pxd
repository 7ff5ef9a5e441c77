ctypedef object (*model_of_t)(const unsigned char* s, Py_ssize_t n)

cdef int account_c(object engine, str request_id, long long prompt, long long cached, long long completion,
                   long long reasoning, object response_model, model_of_t model_of,
                   const unsigned char* body, Py_ssize_t body_n) except -1
