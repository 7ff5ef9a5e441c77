"""`python -m nexus_authz.cli`: the same as the `nexus-authz` command."""

import sys

from nexus_authz.cli.commands import main

sys.exit(main())
