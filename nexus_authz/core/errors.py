"""Typed, expected errors of nexus-authz.

Expected failures (bad configuration, bad input a client sent) are values of these types; anything else is
a bug and is allowed to surface as one. Each error carries an HTTP status hint so adapters can map it
without a table of their own.
"""

from __future__ import annotations


class NexusError(Exception):
    """Base of every expected error. `status` is the HTTP status an adapter should use."""

    status: int = 500


class ConfigError(NexusError):
    """A configuration or key file is invalid.

    The message always names the file and the field (`keys.yaml: keys[3].expires_at: not a timestamp`)
    so an operator can fix it without reading code.
    """

    status = 500

    def __init__(self, message: str, *, source: str | None = None, field: str | None = None) -> None:
        self.source = source
        self.field = field
        self.detail = message
        where = ": ".join(part for part in (source, field) if part)
        super().__init__(f"{where}: {message}" if where else message)


class BadRequest(NexusError):
    """The client's request cannot be interpreted (e.g. a body that is not the JSON it claims to be)."""

    status = 400


# The strict body reading's refusal of a body that is not UTF-8 (JSON bodies in core.body, a multipart
# model field in core.multipart).
NOT_UTF8 = "The request body must be JSON encoded as UTF-8 (no byte-order mark)."
