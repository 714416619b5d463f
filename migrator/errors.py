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


class PeerReportedError(TransportError):
    """The peer sent ERROR: its reason is in the message ("PEER reported: REASON") and, alone,
    in `reason`."""

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.reason = message if reason is None else reason


class PeerClosed(TransportError):
    """The peer closed the connection at a frame boundary."""


class StoppedError(TransportError):
    """Blocking stream I/O gave up because its caller's stop fired (we stop), not because of
    the peer."""


class CommitRefusedError(MigratorError):
    """The receiver answered the COMMIT with an error: its manifest does not say complete."""


class ProtocolError(TransportError):
    """A peer sent bytes that break the wire protocol (bad frame, bad field, out-of-range page)."""


class TruncatedFrameError(ProtocolError):
    """The peer went away in the middle of a frame (the message says which part, how much came)."""


class AuthError(TransportError):
    """The peer could not prove it holds the pre-shared key (or we could not)."""


def first_error(group: BaseExceptionGroup) -> BaseException:
    """The most telling error in a (nested) exception group, for reporting one line: a reason the
    peer reported beats our own MigratorError, which beats anything else (a bug: keep it)."""
    leaves: list[BaseException] = []

    def walk(e: BaseException) -> None:
        if isinstance(e, BaseExceptionGroup):
            for x in e.exceptions:
                walk(x)
        else:
            leaves.append(e)
    walk(group)
    for wanted in (lambda e: isinstance(e, PeerReportedError),
                   lambda e: isinstance(e, MigratorError),
                   lambda e: True):
        for e in leaves:
            if wanted(e):
                return e
    return group
