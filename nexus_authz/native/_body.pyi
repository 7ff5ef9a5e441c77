# Types of the compiled module (_body.pyx).
from nexus_authz.core.body import RequestFacts

def request_facts(
    body: bytes, *, estimate_prompt: bool = True, precise: bool = True, truncated: bool = False
) -> RequestFacts: ...
