"""Developer tools that ship with the package (stub generation); nothing here runs in the server."""
