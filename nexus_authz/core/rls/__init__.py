from nexus_authz.core.rls.matching import *  # noqa: F403  (split into modules in the next commit)
