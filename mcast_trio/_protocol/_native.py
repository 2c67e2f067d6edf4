"""Native framing: a small versioned header in front of every datagram.

The header lets a receiver filter by topic and account for losses from the
header alone, and lets messages larger than one datagram be fragmented and
reassembled safely. Header layout (little-endian, 30 bytes + topic)::

    offset  size  field        meaning
    ------  ----  -----------  ---------------------------------------------
         0     4  magic        b"MCTR"
         4     1  version      1
         5     1  flags        0; no flag is defined in version 1, and
                               receivers ignore the byte
         6     1  topic_len    T, 0..255
         7     1  reserved     0; receivers ignore it
         8     8  sender_id    u64, random per sender (per encoder)
        16     4  sequence     u32, per message, wraps 2**32-1 -> 0; every
                               fragment of a message carries the same one
        20     4  total_size   u32, size of the whole message payload
        24     2  frag_index   u16, 0-based, < frag_count
        26     2  frag_count   u16, >= 1
        28     2  chunk_size   u16, size of every fragment but the last
                               (== total_size when frag_count == 1)
        30     T  topic        bytes (conventionally UTF-8)
      30+T     -  fragment     the payload bytes of this fragment

A message of ``total_size`` bytes is cut into ``frag_count`` fragments of
``chunk_size = max_datagram - 30 - T`` bytes, the last one shorter or
equal and never empty (unless the whole message is empty, which is one
empty fragment). Each datagram is checked on its own: with ``count > 1``,
``(count - 1) * chunk_size < total_size <= count * chunk_size``, and every
fragment must carry exactly its size (``chunk_size``, or the remainder
for the last one), so any truncation of a datagram is detected from that
datagram alone. The magic's first byte (0x4D, ``"M"``) can never
start a msgpack array (0x90-0x9F, 0xDC, 0xDD), so a native frame is never
mistaken for an MCL one, nor for an AstroPix readout (0xFE 0xDC 0xBA).

:class:`NativeEncoder` frames (and fragments) messages, :func:`parse_header`
reads and checks one datagram's header, :class:`NativeDecoder` filters by
topic and reassembles (with :class:`~mcast_trio.Reassembler`).
"""

from __future__ import annotations

import secrets
import struct
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

from .._errors import MalformedFrame
from .._validate import check_int
from ._filters import normalize_topics
from ._message import MAX_UDP_PAYLOAD, Message, as_payload, as_topic
from ._reassembly import MAX_FRAGMENTS, Reassembler, ReassemblyStats

__all__ = [
    "MAX_DATAGRAM_IPV4",
    "MAX_DATAGRAM_IPV6",
    "MIN_DATAGRAM",
    "NATIVE_MAGIC",
    "NATIVE_VERSION",
    "NATIVE_HEADER_SIZE",
    "FrameHeader",
    "parse_header",
    "NativeEncoder",
    "NativeDecoder",
]

#: Largest datagram that fits an Ethernet MTU of 1500 over IPv4 / IPv6.
MAX_DATAGRAM_IPV4 = 1472
MAX_DATAGRAM_IPV6 = 1452
#: Smallest ``max_datagram`` accepted by :class:`NativeEncoder`: room for the
#: header, the longest topic (255 bytes) and 227 payload bytes.
MIN_DATAGRAM = 512

NATIVE_MAGIC = b"MCTR"
NATIVE_VERSION = 1
_HEADER = struct.Struct("<4sBBBxQIIHHH")
NATIVE_HEADER_SIZE = _HEADER.size  # 30
_MAX_TOTAL = 0xFFFFFFFF


class FrameHeader(NamedTuple):
    """The parsed header of one native datagram (see the module docstring).

    Attributes:
        version: Format version (1).
        flags: The flags byte (ignored in version 1).
        topic: The topic bytes.
        sender_id: The sender's random 64-bit id.
        sequence: The message's 32-bit sequence number.
        index: This fragment's 0-based index.
        count: Number of fragments of the message (>= 1).
        total_size: Size of the whole message payload.
        payload_offset: Where this fragment's bytes start in the datagram.
        chunk_size: Size of every fragment of the message but the last.
    """

    version: int
    flags: int
    topic: bytes
    sender_id: int
    sequence: int
    index: int
    count: int
    total_size: int
    payload_offset: int
    chunk_size: int

    @property
    def fragment_size(self) -> int:
        """The size this fragment must have."""
        if self.index < self.count - 1:
            return self.chunk_size
        return self.total_size - (self.count - 1) * self.chunk_size


_unpack_header = _HEADER.unpack_from
_pack_header = _HEADER.pack


def parse_header(datagram: bytes | bytearray | memoryview) -> FrameHeader:
    """Parse and check the native header of ``datagram``.

    The fragment bytes are ``datagram[header.payload_offset:]``. Only the
    header is read, so a receiver can drop unwanted topics before touching
    the payload.

    Raises:
        MalformedFrame: The datagram is not a well-formed native frame; the
            message says what is wrong and at which byte offset.
    """
    n = len(datagram)
    if n >= 4 and datagram[:4] != NATIVE_MAGIC:
        raise MalformedFrame(
            f"offset 0: bad magic {bytes(datagram[:4])!r}, expected {NATIVE_MAGIC!r}"
        )
    if n < NATIVE_HEADER_SIZE:
        raise MalformedFrame(
            f"offset {n}: datagram is {n} bytes, shorter than the "
            f"{NATIVE_HEADER_SIZE}-byte native header"
        )
    _, version, flags, tlen, sender_id, seq, total, index, count, chunk = _unpack_header(datagram)
    if version != NATIVE_VERSION:
        raise MalformedFrame(
            f"offset 4: unknown version {version}; this decoder reads version {NATIVE_VERSION}"
        )
    if count == 0:
        raise MalformedFrame("offset 26: fragment count is 0")
    if index >= count:
        raise MalformedFrame(f"offset 24: fragment index {index} >= fragment count {count}")
    if count == 1:
        if chunk != total:
            raise MalformedFrame(
                f"offset 28: chunk size {chunk} differs from total size {total} "
                f"in a single-fragment message"
            )
        expected = total
    else:
        if not (count - 1) * chunk < total <= count * chunk:
            raise MalformedFrame(
                f"offset 20: total size {total} is inconsistent with {count} "
                f"fragments of {chunk} bytes"
            )
        expected = chunk if index < count - 1 else total - (count - 1) * chunk
    offset = NATIVE_HEADER_SIZE + tlen
    if n < offset:
        raise MalformedFrame(
            f"offset {n}: datagram ends inside the {tlen}-byte topic (needs {offset} bytes)"
        )
    if n - offset != expected:
        raise MalformedFrame(
            f"offset {min(n, offset + expected)}: fragment {index} of {count} carries "
            f"{n - offset} bytes, the header says {expected}"
        )
    topic = bytes(datagram[NATIVE_HEADER_SIZE:offset]) if tlen else b""
    return FrameHeader(version, flags, topic, sender_id, seq, index, count, total, offset, chunk)


# --------------------------------------------------------------------------
# native: encoder


class NativeEncoder:
    """Frame messages with the native header, fragmenting large ones.

    Args:
        sender_id: This sender's 64-bit id; default: random
            (``secrets.randbits(64)``). Allowed: ``0 .. 2**64 - 1``.
        topic: Default topic (str, encoded as UTF-8, or bytes), at most 255
            bytes.
        max_datagram: Largest datagram to emit, header included. Default
            1472 (:data:`MAX_DATAGRAM_IPV4`; use :data:`MAX_DATAGRAM_IPV6`,
            1452, over IPv6). Allowed: ``512 .. 65507``.
        first_sequence: Sequence number of the first message. Allowed:
            ``0 .. 2**32 - 1``.

    Raises:
        TypeError, ValueError: An argument has the wrong type or is out of
            range; the message names it.
    """

    __slots__ = ("_sender_id", "_topic", "_max_datagram", "_sequence")

    def __init__(
        self,
        sender_id: int | None = None,
        topic: str | bytes = b"",
        max_datagram: int = MAX_DATAGRAM_IPV4,
        *,
        first_sequence: int = 0,
    ) -> None:
        if sender_id is None:
            sender_id = secrets.randbits(64)
        self._sender_id = check_int("sender_id", sender_id, 0, 2**64 - 1)
        self._topic = as_topic("topic", topic)
        self._max_datagram = check_int("max_datagram", max_datagram, MIN_DATAGRAM, MAX_UDP_PAYLOAD)
        self._sequence = check_int("first_sequence", first_sequence, 0, _MAX_TOTAL)

    @property
    def sender_id(self) -> int:
        return self._sender_id

    @property
    def topic(self) -> bytes:
        return self._topic

    @property
    def max_datagram(self) -> int:
        return self._max_datagram

    @property
    def sequence(self) -> int:
        """The sequence number the next message will carry."""
        return self._sequence

    def max_message_size(self, topic: str | bytes | None = None) -> int:
        """Largest payload :meth:`encode` accepts with ``topic``."""
        t = self._topic if topic is None else as_topic("topic", topic)
        return min(_MAX_TOTAL, MAX_FRAGMENTS * (self._max_datagram - NATIVE_HEADER_SIZE - len(t)))

    def encode(
        self, payload: bytes | bytearray | memoryview, topic: str | bytes | None = None
    ) -> list[bytes]:
        """Frame one message; return its datagrams (all with one sequence number).

        Args:
            payload: The message bytes (may be empty).
            topic: Overrides the default topic for this message.

        Raises:
            TypeError, ValueError: Bad ``topic`` or ``payload`` type, or the
                payload needs more than 65535 fragments (or 2**32 - 1 bytes).
        """
        t = self._topic if topic is None else as_topic("topic", topic)
        payload = as_payload(payload)
        size = len(payload)
        seq = self._sequence
        chunk = self._max_datagram - NATIVE_HEADER_SIZE - len(t)
        if size <= chunk:
            # Fast path: one datagram, one join.
            out = [b"".join((_pack_header(NATIVE_MAGIC, NATIVE_VERSION, 0, len(t),
                                          self._sender_id, seq, size, 0, 1, size), t, payload))]
        else:
            count = -(-size // chunk)
            if count > MAX_FRAGMENTS or size > _MAX_TOTAL:
                raise ValueError(
                    f"payload is {size} bytes; with max_datagram={self._max_datagram} and a "
                    f"{len(t)}-byte topic at most {self.max_message_size(t)} bytes fit"
                )
            view = memoryview(payload)
            out = []
            for index in range(count):
                header = _pack_header(NATIVE_MAGIC, NATIVE_VERSION, 0, len(t),
                                      self._sender_id, seq, size, index, count, chunk)
                out.append(b"".join((header, t, view[index * chunk:(index + 1) * chunk])))
        self._sequence = (seq + 1) & _MAX_TOTAL
        return out


class NativeDecoder:
    """Decode native datagrams: parse, filter by topic, reassemble.

    Args:
        topics: Accept only these topics (str or bytes, exact match),
            decided from the header alone; None accepts every topic.
        max_messages, max_bytes, timeout, on_restart: As for the
            :class:`Reassembler` (which also says what restarts it can
            recognise, and the limit: a restarted sender replaying
            byte-identical messages within the last ``max_messages``
            completed ones is indistinguishable from duplicates).

    Attributes:
        filtered: Datagrams dropped because of their topic.
    """

    def __init__(
        self,
        topics: Iterable[str | bytes] | str | bytes | None = None,
        *,
        max_messages: int = 256,
        max_bytes: int = 32 << 20,
        timeout: float = 2.0,
        on_restart: Callable[[Any, int], None] | None = None,
    ) -> None:
        self._topics = normalize_topics("topics", topics)
        self.reassembler = Reassembler(max_messages, max_bytes, timeout, on_restart)
        self.filtered = 0

    @property
    def stats(self) -> ReassemblyStats:
        return self.reassembler.stats

    def expire(self, now: float) -> int:
        return self.reassembler.expire(now)

    def feed(self, datagram: bytes | bytearray | memoryview, address: Any, now: float) -> Message | None:
        """Decode one datagram.

        Returns:
            The complete :class:`Message`, or None (fragment of an incomplete
            message, filtered topic, or a dropped fragment).

        Raises:
            MalformedFrame: The datagram is not a well-formed native frame.
        """
        header = parse_header(datagram)
        topics = self._topics
        if topics is not None and header.topic not in topics:
            self.filtered += 1
            return None
        payload = self.reassembler.feed(header, datagram[header.payload_offset:], now, address)
        if payload is None:
            return None
        return Message(header.topic, payload, address, header.sender_id, header.sequence)
