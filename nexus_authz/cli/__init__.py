"""The `nexus-authz` command line (entry point `nexus_authz.cli:main`; `python -m nexus_authz.cli`).

Modules: `commands` (the parser and the local commands: serve, check-config, keys, envoy-config, demo),
`remote` (commands that ask a running server through the policy API), `explain` (`nexus-authz explain`,
through the policy API too), `usage` (`nexus-authz usage` from the SQLite ledger file).
"""

from nexus_authz.cli.commands import main

__all__ = ["main"]
