cdef object facts_of(object body, bint estimate_prompt, bint precise, bint truncated)
