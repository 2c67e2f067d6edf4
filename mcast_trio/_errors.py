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
