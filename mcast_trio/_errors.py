"""Exception types for bad input from peers and files.

Everything that arrives from the network or from a file is untrusted. Each
parser raises exactly one of these types for bad bytes; any other exception
escaping a parser is a bug.
"""

from __future__ import annotations

import trio

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
    Only genuinely concurrent failures (two or more exceptions) stay grouped;
    ``trio.Cancelled`` leaves (tasks cancelled with an outer scope) are no
    second exception, nor is a ``trio.EndOfChannel`` next to another error
    (a consumer that was waiting on the channel of the task that failed).

    Only the wrappers a nursery added are removed: what the caller's block
    raised is passed on exactly as raised, an ``ExceptionGroup`` of the
    caller's own included. The context manager's code marks it by setting
    :attr:`body` to the exception leaving its ``yield``.
    """

    __slots__ = ("body",)

    def __init__(self) -> None:
        #: The exception the caller's block raised, if any: never unwrapped.
        self.body: BaseException | None = None

    def __enter__(self) -> "_SingleExceptionUnwrapper":
        return self

    def _as_body(self, group: BaseExceptionGroup) -> BaseException | None:
        """``body`` if ``group`` is the caller's group as the nursery passes
        it on, else None. trio re-derives a group it passes through (to
        strip ``Cancelled``), so the object differs but its message and its
        exceptions (the same objects) do not; if only ``Cancelled`` was
        stripped, the derived group is what is left of the caller's."""
        body = self.body
        if group is body:
            return body
        if not isinstance(body, BaseExceptionGroup) or type(group) is not type(body) \
                or group.message != body.message:
            return None
        mine = [id(e) for e in body.exceptions]
        theirs = [id(e) for e in group.exceptions]
        if theirs == mine:
            return body
        return group if set(theirs) <= set(mine) else None

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is None or exc is self.body or not isinstance(exc, BaseExceptionGroup):
            return False
        # ``Cancelled`` is no failure: an outer scope was cancelled while
        # the exception left (e.g. raised in a ``finally`` of a block inside
        # ``move_on_after``), so the nursery's other tasks, cancelled with
        # it, add ``Cancelled`` leaves. They do not make a second exception;
        # once the single one left, the cancellation is delivered again at
        # the next checkpoint of the cancelled scope.
        _cancelled, single = exc.split(trio.Cancelled)
        if single is None:
            return False
        # ``EndOfChannel`` next to another error is its consequence: the
        # task that failed closed its channel on the way out, so a consumer
        # waiting on it got the end of the stream. Alone, it stays.
        _ended, others = single.split(trio.EndOfChannel)
        if others is not None:
            single = others
        while isinstance(single, BaseExceptionGroup):
            body = self._as_body(single)
            if body is not None:
                single = body
                break
            if len(single.exceptions) != 1:
                break
            single = single.exceptions[0]
        if single is exc or (isinstance(single, BaseExceptionGroup) and self._as_body(single) is None):
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


def unwrap_single() -> _SingleExceptionUnwrapper:
    """Return a context manager that re-raises a nursery's single-exception
    group as that exception (see :class:`_SingleExceptionUnwrapper`); set
    its ``body`` to the exception of the caller's block, to pass it on as
    raised."""
    return _SingleExceptionUnwrapper()
