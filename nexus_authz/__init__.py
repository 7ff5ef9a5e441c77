"""nexus-authz."""
