"""The framings, as a table: what each one is and what it can carry.

A framing says how messages become datagrams. Nothing in the framing
modules touches a socket, a clock or trio (h11 style): an encoder turns a
message into the list of datagrams to send, a decoder is fed one received
datagram at a time (with the sender's address and the current time, which
the caller reads from its own clock) and returns a complete
:class:`~mcast_trio.Message` or None. Every decoder raises
:class:`~mcast_trio.MalformedFrame` -- and nothing else -- for bytes it
cannot parse; inconsistencies that only show across several datagrams (a
fragment that disagrees with the message it claims to belong to) are
counted, not raised.

``raw`` (:mod:`._raw`)
    The datagram *is* the message: one serialized AstroPix readout per
    datagram (astropix-analysis, Lowe's ``multicast``).
``native`` (:mod:`._native`)
    A small versioned header in front of every datagram: topic, sender id,
    sequence number, fragmentation.
``mcl`` (:mod:`._mcl`)
    Byte-compatible with MCL's UDP layer: any msgpack object, chunked.
``auto``
    A sender's default: serialized AstroPix readouts go raw, other messages
    native. For a receiver, its default: raw with a readout class, native
    otherwise (:meth:`Framing.resolve`).

The sender, the receiver and the documentation ask a :class:`Framing` what
it can do (``framing.fragments``, ``framing.topics``...) instead of
comparing names; :func:`lookup_framing` turns a ``framing=`` argument into
its record.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
import dataclasses
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from .._validate import check_choice
from ._mcl import MclDecoder, MclEncoder
from ._native import NativeDecoder, NativeEncoder

__all__ = ["Framing", "FRAMINGS", "lookup_framing"]


@dataclass(frozen=True)
class Framing:
    """One framing: how to build its encoder and decoder, and what it carries.

    Attributes:
        name: The ``framing=`` value.
        description: One line, for documentation and error messages.
        encoder: The encoder class (``encode(payload, topic=None) ->
            list[bytes]``), or None where the datagram is the message.
        decoder: The decoder class (``feed(datagram, address, now) ->
            Message | None``, ``expire(now)``, ``stats``), or None where the
            datagram is the message.
        fragments: A message may span several datagrams (larger ones are
            fragmented, not refused).
        topics: Messages carry a topic (receivers can filter on it).
        objects: A message may be any msgpack object, not only bytes.
        sequenced: Every message carries the sender's id and a per-sender
            sequence number, so a receiver can account for losses.
        reassembly: The decoder takes the reassembly bounds (``timeout``,
            ``max_messages``, ``max_bytes``).
        msgpack: Needs the optional ``msgpack`` package.
        raw_readouts: Serialized AstroPix readouts are sent as raw
            datagrams (one readout per datagram).
    """

    name: str
    description: str
    encoder: Callable[..., Any] | None
    decoder: Callable[..., Any] | None
    fragments: bool
    topics: bool
    objects: bool
    sequenced: bool
    reassembly: bool
    msgpack: bool
    raw_readouts: bool

    def resolve(self, *, readouts: bool) -> Framing:
        """The framing a *receiver* uses: ``auto`` is ``raw`` when it reads
        readouts (it has a readout class), else ``native``; any other
        framing is itself."""
        if self is not _AUTO:
            return self
        return FRAMINGS["raw"] if readouts else FRAMINGS["native"]


_RAW = Framing(
    name="raw",
    description="one message per datagram, the datagram itself (serialized AstroPix readouts)",
    encoder=None,
    decoder=None,
    fragments=False,
    topics=False,
    objects=False,
    sequenced=False,
    reassembly=False,
    msgpack=False,
    raw_readouts=True,
)
_NATIVE = Framing(
    name="native",
    description="a header with topic, sender id and sequence number; large messages fragmented",
    encoder=NativeEncoder,
    decoder=NativeDecoder,
    fragments=True,
    topics=True,
    objects=False,
    sequenced=True,
    reassembly=True,
    msgpack=False,
    raw_readouts=False,
)
_MCL = Framing(
    name="mcl",
    description="MCL's UDP framing: any msgpack object with a topic, large ones chunked",
    encoder=MclEncoder,
    decoder=MclDecoder,
    fragments=True,
    topics=True,
    objects=True,
    sequenced=False,
    reassembly=True,
    msgpack=True,
    raw_readouts=False,
)
# A sender's auto: native framing, except that serialized readouts go raw.
_AUTO = dataclasses.replace(
    _NATIVE,
    name="auto",
    description="serialized AstroPix readouts raw, other messages native",
    raw_readouts=True,
)

#: Every framing by name.
FRAMINGS: Mapping[str, Framing] = MappingProxyType(
    {framing.name: framing for framing in (_RAW, _NATIVE, _MCL, _AUTO)}
)


def lookup_framing(value: object, *, name: str = "framing",
                   allowed: Iterable[str] | None = None) -> Framing:
    """Return the :class:`Framing` called ``value``.

    Args:
        value: The argument's value.
        name: The argument's name, for the message.
        allowed: The framings the caller accepts, in the order the message
            lists them (default: all of :data:`FRAMINGS`).

    Raises:
        ValueError: ``value`` is not one of ``allowed``: ``"framing='x' is
            not a framing; allowed: 'raw', 'native', 'mcl'"``.
    """
    check_choice(name, value, FRAMINGS if allowed is None else allowed, what="a framing")
    return FRAMINGS[value]  # type: ignore[index]
