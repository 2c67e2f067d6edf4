"""Exception types for bad input from peers and files.

Everything that arrives from the network or from a file is untrusted. Each
parser raises exactly one of these types for bad bytes; any other exception
escaping a parser is a bug.
"""

from __future__ import annotations

__all__ = ["MalformedDatagram", "MalformedReadout", "MalformedFrame"]


class MalformedDatagram(ValueError):
    """Base class: bytes from a peer (or a file) that cannot be parsed.

    The message says what is wrong and where (a byte offset).
    """


class MalformedReadout(MalformedDatagram):
    """A serialized AstroPix readout is malformed: wrong header, too short, or
    a length field that disagrees with the bytes carried."""


class MalformedFrame(MalformedDatagram):
    """A framed datagram (native or MCL framing) cannot be parsed."""


class _SingleExceptionUnwrapper:
    """Context manager: a lone exception leaves a nursery as itself.

    trio nurseries always wrap what escapes them in an ``ExceptionGroup``. The
    context managers of this package (``open_sender``, ``open_receiver``, ...)
    promise plain exceptions: an error from the caller's own block, or from
    opening a socket, comes out as itself so that ``except OSError`` works.
    Only genuinely concurrent failures (two or more leaf exceptions) stay
    grouped. Nested groups of one are unwrapped all the way down.
    """

    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is None or not isinstance(exc, BaseExceptionGroup):
            return False
        single = exc
        while isinstance(single, BaseExceptionGroup) and len(single.exceptions) == 1:
            single = single.exceptions[0]
        if single is exc or isinstance(single, BaseExceptionGroup):
            return False
        cause = single.__cause__
        suppress = single.__suppress_context__
        context = single.__context__
        try:
            raise single
        finally:
            # Keep what the exception said about its own origin; the group
            # it travelled in is an artefact of the nursery.
            single.__cause__ = cause
            single.__suppress_context__ = suppress
            single.__context__ = context
            del single, exc, cause, context


def unwrap_single():
    """Return a context manager that re-raises a single-exception group as
    that exception (see :class:`_SingleExceptionUnwrapper`)."""
    return _SingleExceptionUnwrapper()
