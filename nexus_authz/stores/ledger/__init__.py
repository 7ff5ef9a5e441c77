from nexus_authz.stores.ledger.sqlite import *  # noqa: F403  (split into modules in the next commit)
