"""Errors a user can cause or meet: each carries a message that names the problem.

The CLI prints these as one line (no traceback); anything else is a bug and keeps its traceback.
"""


class MigratorError(Exception):
    """Base of every error the engine reports to a user."""


class UnsupportedError(MigratorError):
    """The kernel (or the target) lacks a mechanism the request needs."""


class TargetGoneError(MigratorError):
    """The process being tracked or migrated exited."""


class RegionError(MigratorError):
    """A region selection matched nothing, or a tracked mapping changed shape."""


class UsageError(MigratorError):
    """A bad value on the command line or in a file (size, rate, address range, ...)."""


class TransportError(MigratorError):
    """The migration stream failed: peer gone, refused, or reported an error."""


class ProtocolError(TransportError):
    """A peer sent bytes that break the wire protocol (bad frame, bad field, out-of-range page)."""


class AuthError(TransportError):
    """The peer could not prove it holds the pre-shared key (or we could not)."""
