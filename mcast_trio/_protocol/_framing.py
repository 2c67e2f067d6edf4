"""Sans-I/O framing of messages into datagrams: raw, native and MCL.

Nothing in this module touches a socket, a clock or trio (h11 style): an
encoder turns a message into the list of datagrams to send, a decoder is fed
one received datagram at a time (with the sender's address and the current
time, which the caller reads from its own clock) and returns a complete
:class:`Message` or None. Every decoder raises :class:`MalformedFrame` -- and
nothing else -- for bytes it cannot parse; inconsistencies that only show
across several datagrams (a fragment that disagrees with the message it
claims to belong to) are counted, not raised.

Three framings:

``raw``
    The datagram *is* the payload: one serialized AstroPix readout per
    datagram (astropix-analysis, Lowe's ``multicast``). No topic, no
    fragmentation: :func:`encode_raw`, :func:`decode_raw`, :class:`RawEncoder`,
    :class:`RawDecoder`.

``native``
    A small versioned header in front of every datagram, so that a receiver
    can filter by topic and account for losses from the header alone, and so
    that messages larger than one datagram are fragmented and reassembled
    safely: :class:`NativeEncoder`, :func:`parse_header`, :class:`Reassembler`,
    :class:`NativeDecoder`. Header layout (little-endian, 30 bytes + topic)::

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

``mcl``
    Byte-compatible with the UDP layer of MCL (``acfr/mcl``,
    ``mcl/network/udp.py``): a message is any msgpack-serialisable object
    (bytes, dict, list, number...), sent as the msgpack array
    ``[topic, payload]``; when that is larger than the chunk size (60000
    bytes), the payload is msgpack-packed *again* and the packed bytes are
    cut into chunks sent as ``[topic, i, n, chunk]`` with 1-based ``i`` and
    ``n = len(packed) // chunk_size + 1`` (so an exact multiple ends with an
    empty chunk, as MCL does). MCL ran on Python 2 with msgpack's default
    ``use_bin_type=False``: topic and payload are written with the msgpack
    *raw/str* family (fixstr, str16, str32; never str8 nor bin), and a missing
    topic is ``nil``. The decoder reads with ``raw=True`` and so accepts the
    str and the bin family alike, and delivers the unpacked object (byte
    strings as bytes). Datagrams stay within the 65000 bytes MCL's listener
    reads. Needs the optional ``msgpack`` package
    (``pip install mcast_trio[mcl]``): :class:`MclEncoder`, :class:`MclDecoder`.

Receivers filter messages with :func:`make_filter` (topics and/or a payload
predicate or regular expression, as in Lowe's ``multicast``).
"""

from __future__ import annotations

import gc as _gc
import re
import secrets
import struct
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple
from zlib import crc32 as _crc32

from .._errors import MalformedFrame
from ._tracking import RESTART, SenderTable

__all__ = [
    "MAX_UDP_PAYLOAD",
    "MAX_DATAGRAM_IPV4",
    "MAX_DATAGRAM_IPV6",
    "MIN_DATAGRAM",
    "NATIVE_MAGIC",
    "NATIVE_VERSION",
    "NATIVE_HEADER_SIZE",
    "MCL_CHUNK_SIZE",
    "Message",
    "encode_raw",
    "decode_raw",
    "RawEncoder",
    "RawDecoder",
    "FrameHeader",
    "parse_header",
    "NativeEncoder",
    "ReassemblyStats",
    "Reassembler",
    "NativeDecoder",
    "MclEncoder",
    "MclDecoder",
    "make_filter",
]

#: Largest UDP payload over IPv4 (65535 - 8 - 20).
MAX_UDP_PAYLOAD = 65507
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
_MAX_FRAGMENTS = 0xFFFF
_MAX_TOTAL = 0xFFFFFFFF
_MAX_TOPIC = 255

#: MCL's fragmentation threshold and chunk size (``MTU`` in mcl/network/udp.py).
MCL_CHUNK_SIZE = 60000
#: MCL's ``MTU_MAX``: its listener's ``recvfrom`` size, so the largest
#: datagram an MCL listener reads whole.
_MCL_MAX_DATAGRAM = 65000
#: Largest chunk size whose chunk datagrams ``[nil, i, n, chunk]`` stay within
#: 65000 bytes: fixarray (1) + nil (1) + uint16 i (3) + uint16 n (3) + str16
#: or bin16 header (3).
_MCL_MAX_CHUNK = _MCL_MAX_DATAGRAM - 11


def _check_int(name: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}={value!r} must be an int; allowed: {low}..{high}")
    if not low <= value <= high:
        raise ValueError(f"{name}={value!r} is out of range; allowed: {low}..{high}")
    return value


def _check_number(name: str, value: object, low: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}={value!r} must be a number; allowed: > {low}")
    if not value > low or value != value or value == float("inf"):
        raise ValueError(f"{name}={value!r} is out of range; allowed: finite and > {low}")
    return float(value)


def _as_topic(name: str, topic: object, max_len: int | None = _MAX_TOPIC) -> bytes:
    if isinstance(topic, str):
        topic = topic.encode("utf-8")
    elif isinstance(topic, (bytes, bytearray, memoryview)):
        topic = bytes(topic)
    else:
        raise TypeError(f"{name}={topic!r} must be str or bytes")
    if max_len is not None and len(topic) > max_len:
        raise ValueError(
            f"{name}={topic!r} is {len(topic)} bytes long; allowed: at most {max_len} bytes"
        )
    return topic


def _as_payload(payload: object) -> bytes | memoryview:
    """Return ``payload`` as bytes or as a flat byte memoryview (no copy)."""
    if type(payload) is bytes:
        return payload
    if isinstance(payload, str):
        raise TypeError("payload must be bytes-like, not str")
    try:
        view = memoryview(payload)  # type: ignore[arg-type]
        return view if view.format == "B" and view.ndim == 1 else view.cast("B")
    except TypeError:
        raise TypeError(
            f"payload must be a contiguous bytes-like object, not {type(payload).__name__}"
        ) from None


def _normalize_topics(name: str, topics: object) -> frozenset[bytes] | None:
    """``None`` -> None; a single str/bytes -> {it}; an iterable -> the set."""
    if topics is None:
        return None
    if isinstance(topics, (str, bytes, bytearray, memoryview)):
        return frozenset([_as_topic(name, topics, None)])
    if not isinstance(topics, Iterable):
        raise TypeError(
            f"{name}={topics!r} must be None, a str/bytes topic or an iterable of them"
        )
    result = frozenset(_as_topic(f"{name} item", t, None) for t in topics)
    if not result:
        raise ValueError(f"{name}={topics!r} is empty; pass None to accept every topic")
    return result


class Message(NamedTuple):
    """A complete message as decoded from one or more datagrams.

    Attributes:
        topic: The topic (bytes), or None for raw framing and MCL messages
            sent without a topic.
        payload: The message bytes; in MCL framing, the unpacked msgpack
            object (bytes for a byte string, else a dict, list, int, ...).
        address: The sender's address as given to the decoder.
        sender_id: Native framing: the sender's random 64-bit id; else None.
        sequence: Native framing: the message's sequence number; else None.
    """

    topic: bytes | None
    payload: Any
    address: Any = None
    sender_id: int | None = None
    sequence: int | None = None


# --------------------------------------------------------------------------
# raw


def encode_raw(payload: bytes | bytearray | memoryview) -> list[bytes]:
    """Return ``[payload]``: in raw framing the payload is the datagram.

    Raises:
        TypeError: ``payload`` is not bytes-like.
        ValueError: ``payload`` is larger than 65507 bytes (no fragmentation
            in raw framing).
    """
    payload = _as_payload(payload)
    if len(payload) > MAX_UDP_PAYLOAD:
        raise ValueError(
            f"payload is {len(payload)} bytes; raw framing allows at most "
            f"{MAX_UDP_PAYLOAD} (use native or MCL framing to fragment)"
        )
    return [bytes(payload)]


def decode_raw(datagram: bytes | bytearray | memoryview) -> bytes:
    """Return the payload of a raw datagram (the datagram itself, as bytes)."""
    return bytes(datagram)


class RawEncoder:
    """Raw framing with the encoder interface of the other framings."""

    __slots__ = ()

    def encode(self, payload: bytes | bytearray | memoryview, topic: object = None) -> list[bytes]:
        """Return ``[payload]``.

        Raises:
            ValueError: A ``topic`` was given (raw datagrams carry none), or
                the payload exceeds 65507 bytes.
        """
        if topic is not None:
            raise ValueError(f"topic={topic!r}: raw framing carries no topic; allowed: None")
        return encode_raw(payload)


class RawDecoder:
    """Raw framing with the decoder interface of the other framings."""

    __slots__ = ()

    def feed(self, datagram: bytes | bytearray | memoryview, address: Any, now: float) -> Message:
        """Return ``Message(None, bytes(datagram), address)``; never None."""
        return Message(None, bytes(datagram), address)

    def expire(self, now: float) -> int:
        return 0


# --------------------------------------------------------------------------
# native: header


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
        self._sender_id = _check_int("sender_id", sender_id, 0, 2**64 - 1)
        self._topic = _as_topic("topic", topic)
        self._max_datagram = _check_int("max_datagram", max_datagram, MIN_DATAGRAM, MAX_UDP_PAYLOAD)
        self._sequence = _check_int("first_sequence", first_sequence, 0, _MAX_TOTAL)

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
        t = self._topic if topic is None else _as_topic("topic", topic)
        return min(_MAX_TOTAL, _MAX_FRAGMENTS * (self._max_datagram - NATIVE_HEADER_SIZE - len(t)))

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
        t = self._topic if topic is None else _as_topic("topic", topic)
        payload = _as_payload(payload)
        size = len(payload)
        seq = self._sequence
        chunk = self._max_datagram - NATIVE_HEADER_SIZE - len(t)
        if size <= chunk:
            # Fast path: one datagram, one join.
            out = [b"".join((_pack_header(NATIVE_MAGIC, NATIVE_VERSION, 0, len(t),
                                          self._sender_id, seq, size, 0, 1, size), t, payload))]
        else:
            count = -(-size // chunk)
            if count > _MAX_FRAGMENTS or size > _MAX_TOTAL:
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


# --------------------------------------------------------------------------
# reassembly


@dataclass(frozen=True, slots=True)
class ReassemblyStats:
    """Counters of a :class:`Reassembler` (or of an MCL decoder's reassembly).

    Attributes:
        completed: Multi-fragment messages reassembled and returned
            (single-fragment messages bypass the reassembler and are not
            counted).
        expired: Incomplete messages dropped after ``timeout``.
        evicted: Incomplete messages dropped to respect ``max_messages`` or
            ``max_bytes`` (oldest first).
        superseded: MCL only: incomplete messages dropped because a chunk of a
            newer message with the same key arrived (MCL chunks carry no
            message id).
        oversized: Fragments dropped because their message could never fit:
            larger than ``max_bytes`` or more than 65535 fragments.
        duplicate_fragments: Copies of a fragment already held (or of a
            message just completed), ignored.
        inconsistent: Fragments that disagree with the pending message they
            claim to belong to (count, size, topic or bytes), ignored; and
            MCL messages whose reassembled bytes do not unpack.
        bytes_buffered: Fragment bytes currently held.
        pending: Incomplete messages currently held.
    """

    completed: int = 0
    expired: int = 0
    evicted: int = 0
    superseded: int = 0
    oversized: int = 0
    duplicate_fragments: int = 0
    inconsistent: int = 0
    bytes_buffered: int = 0
    pending: int = 0


#: What holding one fragment costs beyond its bytes (the bytes object's
#: header, its slot in the message's fragment table, the index), and what one
#: incomplete message costs beyond its fragments (its record, its table, its
#: key with the sender's address, its topic, its place in the age order), in
#: bytes, measured with tracemalloc on CPython 3.11 and rounded up. Counting
#: them in ``bytes_buffered`` makes ``max_bytes`` a bound on the memory held,
#: also for tiny fragments (1-byte fragments cost ~100 times their bytes).
_FRAGMENT_OVERHEAD = 160
_MESSAGE_OVERHEAD = 1024
#: Fragments of a completed message whose CRC-32 is kept to tell a late copy
#: from a new message that reuses the message's key.
_FINGERPRINTED = 16
#: Senders whose restarts a :class:`Reassembler` recognises at once.
_RESTART_SENDERS = 1024


class _Pending:
    __slots__ = ("deadline", "count", "total", "chunk", "topic", "parts", "nbytes", "top")

    def __init__(self, deadline: float, count: int, total: int, chunk: int, topic: Any) -> None:
        self.deadline = deadline
        self.count = count
        self.total = total
        self.chunk = chunk
        self.topic = topic
        self.parts: dict[int, bytes] = {}
        self.nbytes = 0  # bytes charged to bytes_buffered, overheads included
        self.top = -1  # highest index received


class _FragmentStore:
    """Bounded, expiring buffer of incomplete messages (shared by the native
    and the MCL reassembly). Keys are tuples whose first items identify the
    sender (``sender_len`` of them); insertion order is age order.
    ``bytes_buffered`` counts fragment bytes plus the per-fragment and
    per-message overheads, so ``max_bytes`` bounds the memory held."""

    def __init__(
        self, max_messages: int, max_bytes: int, timeout: float, recent: int, sender_len: int = 0
    ) -> None:
        # With sender_len, a fragment that is not a copy of the one held (or
        # recently completed) under its key proves that the sender (the
        # first sender_len items of the key) started over.
        self.sender_len = sender_len
        # Called with the key of that fragment when it proves a restart (the
        # owner decides what a restart means); by default the sender's
        # messages are forgotten.
        self.restarted: Callable[[tuple], None] = lambda key: self.forget_sender(key[:sender_len])
        self.max_messages = _check_int("max_messages", max_messages, 1, 1 << 20)
        self.max_bytes = _check_int("max_bytes", max_bytes, 1, 1 << 40)
        self.timeout = _check_number("timeout", timeout, 0.0)
        self.pending: OrderedDict[Hashable, _Pending] = OrderedDict()
        self.bytes_buffered = 0
        # Recently completed messages, oldest first, to recognise late
        # duplicate fragments: key -> (count, total, CRC-32 of each of the
        # first _FINGERPRINTED fragments). A fragment whose bytes differ is
        # not a duplicate but a new message reusing the key (its sender
        # started over), even when its sequence number does not say so.
        self._recent: OrderedDict[Hashable, tuple[int, int, tuple[int, ...]]] = OrderedDict()
        self._recent_max = recent
        self.completed = 0
        self.expired = 0
        self.evicted = 0
        self.superseded = 0
        self.oversized = 0
        self.duplicate_fragments = 0
        self.inconsistent = 0

    def stats(self) -> ReassemblyStats:
        return ReassemblyStats(
            completed=self.completed,
            expired=self.expired,
            evicted=self.evicted,
            superseded=self.superseded,
            oversized=self.oversized,
            duplicate_fragments=self.duplicate_fragments,
            inconsistent=self.inconsistent,
            bytes_buffered=self.bytes_buffered,
            pending=len(self.pending),
        )

    def expire(self, now: float) -> int:
        pending = self.pending
        dropped = 0
        while pending:
            key, entry = next(iter(pending.items()))
            if entry.deadline > now:
                break
            del pending[key]
            self.bytes_buffered -= entry.nbytes
            dropped += 1
        self.expired += dropped
        return dropped

    def _drop(self, key: Hashable) -> None:
        entry = self.pending.pop(key)
        self.bytes_buffered -= entry.nbytes

    def _evict_oldest(self) -> None:
        key = next(iter(self.pending))
        self._drop(key)
        self.evicted += 1

    def forget_sender(self, sender: tuple) -> None:
        """The sender whose keys start with ``sender`` started over: drop its
        incomplete messages (counted as superseded) and forget its completed
        ones, whose keys its new messages reuse."""
        sender_len = len(sender)
        stale = [key for key in self.pending if key[:sender_len] == sender]
        for key in stale:
            self._drop(key)
        self.superseded += len(stale)
        recent = self._recent
        for key in [key for key in recent if key[:sender_len] == sender]:
            del recent[key]

    def add(
        self,
        key: Hashable,
        index: int,
        count: int,
        total: int,
        chunk: int,
        topic: Any,
        fragment: bytes,
        now: float,
        ordered: bool,
    ) -> bytes | None:
        """Store one fragment; return the joined message when complete.

        ``total``/``chunk`` of -1 mean unknown (MCL). With ``ordered`` (MCL),
        a fragment whose index is not above the highest one held starts a new
        message (the held one is superseded) unless it repeats a held fragment
        byte for byte.
        """
        pending = self.pending
        if pending and next(iter(pending.values())).deadline <= now:
            self.expire(now)
        max_bytes = self.max_bytes
        # What the whole message would hold at once (for MCL, whose size is
        # unknown, at least its fragments' overheads).
        need = max(total, 0) + count * _FRAGMENT_OVERHEAD + _MESSAGE_OVERHEAD
        if count > _MAX_FRAGMENTS or need > max_bytes:
            self.oversized += 1
            return None
        entry = pending.get(key)
        if entry is not None:
            if entry.count != count or entry.total != total or entry.chunk != chunk or entry.topic != topic:
                self.inconsistent += 1
                return None
            held = entry.parts.get(index)
            if held is not None:
                if held == fragment:
                    self.duplicate_fragments += 1
                    return None
                if self.sender_len:
                    # Another message under this key: its sender started over.
                    self.restarted(key)
                    entry = None
                elif not ordered:
                    self.inconsistent += 1
                    return None
            if entry is not None and ordered and index <= entry.top:
                self._drop(key)
                self.superseded += 1
                entry = None
        elif key in self._recent:
            done_count, done_total, crcs = self._recent[key]
            if (done_count == count and done_total == total
                    and (index >= len(crcs) or _crc32(fragment) == crcs[index])):
                self.duplicate_fragments += 1
                return None
            # Not a copy: a new message under this key, its sender started over.
            if self.sender_len:
                self.restarted(key)
            else:
                del self._recent[key]
        size = len(fragment) + _FRAGMENT_OVERHEAD
        if entry is None:
            size += _MESSAGE_OVERHEAD
        if size > max_bytes:
            self.oversized += 1
            return None
        if entry is None:
            if len(pending) >= self.max_messages:
                self._evict_oldest()
        while self.bytes_buffered + size > max_bytes:
            self._evict_oldest()
            if entry is not None and key not in pending:
                # The message this fragment belongs to was the oldest: it is
                # gone, and this fragment alone could never complete it.
                return None
        if entry is None:
            entry = pending[key] = _Pending(now + self.timeout, count, total, chunk, topic)
        entry.parts[index] = fragment
        entry.nbytes += size
        self.bytes_buffered += size
        if index > entry.top:
            entry.top = index
        if len(entry.parts) < count:
            return None
        del pending[key]
        self.bytes_buffered -= entry.nbytes
        self.completed += 1
        parts = entry.parts
        if self._recent_max:
            recent = self._recent
            recent[key] = (count, total, tuple(_crc32(parts[i]) for i in range(min(count, _FINGERPRINTED))))
            if len(recent) > self._recent_max:
                recent.popitem(last=False)
        return b"".join([parts[i] for i in range(count)])


class Reassembler:
    """Reassemble native messages from their fragments, in bounded memory and time.

    Sans-I/O: the caller passes the current time (any monotonic clock, e.g.
    ``trio.current_time()``) and the sender's address with every fragment.
    Fragments are keyed by ``(address, sender_id, sequence)``, so a lost
    fragment never lets two messages merge, and two senders that happen to
    use the same ``sender_id`` (from different addresses) are kept apart.
    Single-fragment messages bypass the buffers entirely.

    A sender that starts over with the same ``sender_id`` and address (a DAQ
    with a fixed id that restarts, its sequence numbers going back to 0) is
    reassembled again, not taken for a stream of duplicates:

    * a restart is recognised as :class:`~mcast_trio.SequenceTracker`
      recognises one, from the sequence numbers of all the sender's
      messages, single-fragment ones included (a sequence number ``1024`` or more below the highest
      one, before the first one seen, or more than ``2**20`` above it): the
      sender's incomplete messages are dropped (counted as ``superseded``)
      and the record of its completed ones is forgotten (restart detection
      remembers up to 1024 senders, least recently seen forgotten first);
    * a fragment whose key belongs to a recently completed message is a
      duplicate only if it is a copy (same count and size, same CRC-32 as
      the fragment it repeats, checked for the first 16 fragments); a
      fragment whose bytes differ from the fragment held at its index is no
      copy either. Either proves that the sender started over, with the same
      consequences. This catches a restart after a short run, whose
      sequence numbers the tracker cannot tell from duplicates.

    Either way, ``on_restart(address, sender_id)`` is called (if given),
    before the fragment that proved the restart is stored, so that a
    receiver resets its own loss accounting for that sender (its
    :class:`~mcast_trio.SequenceTracker` would otherwise count the new run's
    messages as duplicates of the old one's).

    The limit: only what differs can be told apart. A restarted sender that
    sends again, within the last ``max_messages`` completed messages, the
    very same bytes under the same sequence numbers is indistinguishable
    from a network duplicate of the first run: those messages are dropped
    as ``duplicate_fragments`` and no restart is seen. Single-fragment
    messages bypass the buffers (and are never taken for duplicates), so
    their bytes are not compared: a restart is seen from them only by the
    sequence-number rule above.

    Memory: ``bytes_buffered`` counts the fragment bytes held plus a fixed
    overhead per fragment (160 bytes) and per incomplete message (1024
    bytes), so ``max_bytes`` bounds the memory the buffers hold even when
    fragments are tiny. Besides, the keys of the last ``max_messages``
    completed messages are kept (to recognise late duplicate fragments).

    Args:
        max_messages: Most incomplete messages held at once (oldest evicted).
            Allowed: ``1 .. 2**20``.
        max_bytes: Most bytes held at once, overheads included (oldest
            incomplete messages evicted; a message that could not fit is
            dropped as oversized). Allowed: ``1 .. 2**40``.
        timeout: Seconds after its first fragment an incomplete message is
            dropped. Allowed: finite and > 0.
        on_restart: None, or a callable ``(address, sender_id)`` called
            when that sender is found to have started over.

    Raises:
        TypeError, ValueError: An argument has the wrong type or is out of
            range; the message names it.
    """

    def __init__(
        self,
        max_messages: int = 256,
        max_bytes: int = 32 << 20,
        timeout: float = 2.0,
        on_restart: Callable[[Any, int], None] | None = None,
    ) -> None:
        if on_restart is not None and not callable(on_restart):
            raise TypeError(f"on_restart={on_restart!r} must be None or a callable (address, sender_id)")
        self._store = _FragmentStore(max_messages, max_bytes, timeout, recent=max_messages, sender_len=2)
        self._store.restarted = self._restarted
        self._on_restart = on_restart
        # Restart detection: the tracker's own rule, one tracker per sender.
        self._senders: SenderTable = SenderTable(_RESTART_SENDERS)
        # The sender seen last and its tracker. Every use of the table goes
        # through _tracker(), so the one cached is the table's most recently
        # used: it is evicted only after another sender has replaced it here.
        self._last_sender: Any = None
        self._last_tracker: Any = None

    def _tracker(self, sender: tuple):
        if sender != self._last_sender:
            self._last_tracker = self._senders.tracker(sender)
            self._last_sender = sender
        return self._last_tracker

    def _restarted(self, key: tuple, counted: bool = False) -> None:
        """The sender of ``key`` (address, sender_id, sequence) started over.

        ``counted``: its tracker found it (and already starts the new run at
        this sequence number); else the bytes did, and the tracker is told.
        """
        sender = key[:2]
        self._store.forget_sender(sender)
        if not counted:
            tracker = self._tracker(sender)
            tracker.restart()
            tracker.observe(key[2])
        if self._on_restart is not None:
            self._on_restart(*sender)

    @property
    def stats(self) -> ReassemblyStats:
        """A snapshot of the counters."""
        return self._store.stats()

    @property
    def bytes_buffered(self) -> int:
        """Bytes held now, per-fragment and per-message overheads included."""
        return self._store.bytes_buffered

    def expire(self, now: float) -> int:
        """Drop incomplete messages whose timeout has passed; return how many."""
        return self._store.expire(now)

    def feed(
        self,
        header: FrameHeader,
        fragment: bytes | bytearray | memoryview,
        now: float,
        address: Hashable = None,
    ) -> bytes | None:
        """Add one fragment (``datagram[header.payload_offset:]``).

        Args:
            header: The fragment's parsed header (:func:`parse_header`).
            fragment: The fragment's bytes.
            now: The current time, in seconds of the caller's clock.
            address: The sender's address (any hashable, e.g. ``(host,
                port)``); fragments from different addresses never mix.

        Returns:
            The complete message payload when this fragment completes it
            (immediately for a single-fragment message), else None.
        """
        store = self._store
        if header.count == 1:
            if store.pending and next(iter(store.pending.values())).deadline <= now:
                store.expire(now)
            # No buffer, but the sequence number counts: a restart seen here
            # drops the old run's incomplete messages before a new message
            # reuses their keys, and is reported once, not again at the
            # sender's next fragmented message.
            sender = (address, header.sender_id)
            if self._tracker(sender).observe(header.sequence) == RESTART:
                self._restarted((*sender, header.sequence), counted=True)
            return bytes(fragment)
        if len(fragment) != header.fragment_size:
            store.inconsistent += 1
            return None
        key = (address, header.sender_id, header.sequence)
        if key not in store.pending:
            # The first fragment seen of a message: did its sender start over?
            if self._tracker(key[:2]).observe(header.sequence) == RESTART:
                self._restarted(key, counted=True)
        return store.add(
            key,
            header.index,
            header.count,
            header.total_size,
            header.chunk_size,
            header.topic,
            bytes(fragment),
            now,
            False,
        )


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
        self._topics = _normalize_topics("topics", topics)
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


# --------------------------------------------------------------------------
# MCL

_msgpack_module: Any = None


def _msgpack() -> Any:
    global _msgpack_module
    if _msgpack_module is None:
        try:
            import msgpack
        except ImportError as exc:
            raise ImportError(
                "MCL framing needs the optional 'msgpack' package: "
                "pip install mcast_trio[mcl]"
            ) from exc
        _msgpack_module = msgpack
    return _msgpack_module


_MCL_ARRAY_STARTS = frozenset((0x92, 0x94, 0xDC, 0xDD))
_PACK_ERRORS = (TypeError, ValueError, OverflowError)


#: Below this size a datagram cannot build enough containers for the garbage
#: collector's pause to pay off (a collection of the youngest generation
#: every 700 new containers is cheap; the costly ones come after thousands).
_GC_PAUSE_MIN = 4096


def _unpack_bounded(unpackb: Callable[..., Any], data: bytes | bytearray | memoryview) -> Any:
    """Unpack ``data`` (exactly one msgpack object) building no more than
    its ``n`` bytes could legitimately hold: an element, a map entry's key
    and value, a string's byte take at least 1 byte each, so no array of more
    than ``n`` elements, no map of more than ``n // 2`` entries, no string,
    bin or ext longer than ``n`` (msgpack's ``max_*_len`` limits). These are
    the limits msgpack's ``unpackb`` derives by itself (its docstring, 1.x:
    "*max_xxx_len* options are configured automatically from
    ``len(packed)``"; ``max_map_len`` is half of it); they are set
    explicitly so that the bound does not depend on the version's defaults.
    They matter: a datagram that declares more elements than it has bytes
    is refused at the header instead of building everything that follows
    (``test_mcl_declared_length_beyond_the_datagram_is_refused_without_building``).

    For larger inputs the cyclic garbage collector is paused while the
    objects are built: tens of thousands of containers otherwise trigger a
    collection every 700 of them, each older-generation one walking the
    whole heap (measured: up to 250 ms for one 65 KB datagram in a process
    holding 2 million objects, against 13 ms at most with the pause).
    """
    n = len(data)
    if n < _GC_PAUSE_MIN:
        return unpackb(data, raw=True, use_list=True, strict_map_key=False, max_str_len=n,
                       max_bin_len=n, max_array_len=n, max_map_len=n // 2, max_ext_len=n)
    enabled = _gc.isenabled()
    if enabled:
        _gc.disable()
    try:
        return unpackb(data, raw=True, use_list=True, strict_map_key=False, max_str_len=n,
                       max_bin_len=n, max_array_len=n, max_map_len=n // 2, max_ext_len=n)
    finally:
        if enabled:
            _gc.enable()


class MclEncoder:
    """Frame messages the way MCL's UDP ``RawBroadcaster`` does.

    A message is any msgpack-serialisable object, as MCL's
    ``RawBroadcaster.publish`` takes (its ``MessageBroadcaster`` publishes
    dicts): bytes-like objects are sent as byte strings, anything else
    (dict, list, tuple, int, float, str, bool, None, nested) as msgpack
    packs it. A small message goes as one datagram ``[topic, payload]``; a
    larger one is packed *after* the ``[topic, payload]`` attempt and the
    packed bytes are cut into chunks ``[topic, i, n, chunk]``, as MCL does.

    Args:
        topic: Default topic: None (msgpack nil, MCL's default), str or bytes.
        chunk_size: Fragmentation threshold and chunk size (MCL's ``MTU``,
            60000 by default). Allowed: ``64 .. 64989``: MCL's listener reads
            at most 65000 bytes per datagram (``recvfrom(MTU_MAX)``), and a
            chunk datagram adds up to 11 bytes to its chunk (with a nil
            topic), so the largest ``chunk_size`` still gives datagrams an
            MCL listener reads whole. A topic adds its length;
            :meth:`encode` refuses a message whose datagrams would exceed
            65000 bytes.
        use_bin_type: False (default) writes topic and byte strings with the
            msgpack raw/str family, byte for byte as MCL on Python 2; True
            writes bytes as bin (as a Python 3 msgpack>=1.0 port would).

    Raises:
        ImportError: msgpack is not installed (``pip install mcast_trio[mcl]``).
        TypeError, ValueError: An argument has the wrong type or is out of
            range; the message names it.
    """

    def __init__(
        self,
        topic: str | bytes | None = None,
        *,
        chunk_size: int = MCL_CHUNK_SIZE,
        use_bin_type: bool = False,
    ) -> None:
        msgpack = _msgpack()
        self._topic = self._check_topic(topic)
        self._chunk_size = _check_int("chunk_size", chunk_size, 64, _MCL_MAX_CHUNK)
        if not isinstance(use_bin_type, bool):
            raise TypeError(f"use_bin_type={use_bin_type!r} must be a bool")
        self._packb = msgpack.Packer(use_bin_type=use_bin_type, autoreset=True).pack

    @staticmethod
    def _check_topic(topic: object) -> str | bytes | None:
        if topic is None or isinstance(topic, str):
            return topic
        if isinstance(topic, (bytes, bytearray, memoryview)):
            return bytes(topic)
        raise TypeError(f"topic={topic!r} must be None, str or bytes")

    @property
    def chunk_size(self) -> int:
        return self._chunk_size

    def encode(self, payload: Any, topic: str | bytes | None = None) -> list[bytes]:
        """Frame one message; return its datagrams.

        Args:
            payload: The message: a bytes-like object (sent as a byte string)
                or any msgpack-serialisable object.
            topic: Overrides the default topic for this message.

        Raises:
            TypeError: Bad ``topic`` type, or ``payload`` is not
                msgpack-serialisable (the message names it and says why).
            ValueError: The message needs more than 65535 chunks, or a
                datagram would exceed the 65000 bytes an MCL listener reads
                (a very long topic).
        """
        t = self._topic if topic is None else self._check_topic(topic)
        if type(payload) is not bytes and not isinstance(payload, str):
            try:
                payload = bytes(_as_payload(payload))  # bytes-like: a byte string
            except TypeError:
                pass  # any other object: msgpack packs it (or says why not)
        pack = self._packb
        try:
            packet = pack((t, payload))
        except _PACK_ERRORS as exc:
            raise TypeError(
                f"payload={_short_repr(payload)} is not msgpack-serialisable: {exc}"
            ) from exc
        chunk = self._chunk_size
        if len(packet) <= chunk:
            return [packet]
        data = pack(payload)
        size = len(data)
        count = size // chunk + 1  # as MCL: an exact multiple ends with an empty chunk
        if count > _MAX_FRAGMENTS:
            raise ValueError(
                f"payload packs to {size} bytes; with chunk_size={chunk} MCL framing "
                f"allows at most {_MAX_FRAGMENTS} chunks"
            )
        out = [pack((t, i + 1, count, data[i * chunk:(i + 1) * chunk])) for i in range(count)]
        longest = max(map(len, out))
        if longest > _MCL_MAX_DATAGRAM:
            raise ValueError(
                f"topic={_short_repr(t)}: a chunk datagram would be {longest} bytes, more than the "
                f"{_MCL_MAX_DATAGRAM} an MCL listener reads; use a shorter topic or a "
                f"smaller chunk_size (now {chunk})"
            )
        return out


def _short_repr(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


class MclDecoder:
    """Decode MCL datagrams, reassembling chunked messages.

    The payload is delivered as msgpack unpacks it, as an MCL listener hands
    it over: a byte string (MCL's Python 2 ``str``, or bin) as ``bytes``,
    and any other object (dict, list, int, float, nil, ...) as the
    corresponding Python object; strings inside it are ``bytes`` too (the
    raw family carries no encoding). Map keys may be any hashable value.

    MCL chunks carry no message id. Chunks are keyed by ``(address, topic,
    n)`` (MCL itself uses ``(host, n, topic)``), and since a sender emits the
    chunks of a message in order, a chunk whose index is not above the
    highest index held for its key starts a new message: the incomplete one
    is dropped and counted in ``superseded`` (an exact byte-for-byte repeat
    of a held chunk is a duplicate instead). A reassembled message must
    unpack to exactly one msgpack object, else it is counted
    ``inconsistent``. The residual risk inherent to MCL's format: if the
    tail of one message and the head of the next (same sender, topic and
    chunk count) are both lost, and the chunk sizes agree, the two could
    merge; pass the full ``(host, port)`` as ``address`` to keep separate
    senders apart.

    Bounded work per datagram: a datagram longer than 65000 bytes is
    refused before it is unpacked (MCL never sends one, and its listener
    reads at most 65000 bytes, so it could not read one either); unpacking
    may not build more than the bytes could legitimately hold (msgpack's
    ``max_*_len`` limits set from the size of the bytes: no array of more
    elements, no map of more entries than half, no string longer than the
    bytes); and the garbage collector is paused while the objects of inputs
    of 4 KiB or more are built.
    None of this refuses anything MCL (or :class:`MclEncoder`) produces.

    Args:
        topics: Accept only these topics (str or bytes, exact match); None
            accepts every topic (including nil).
        max_messages, max_bytes, timeout: Reassembly bounds, as for
            :class:`Reassembler` (overheads included in ``max_bytes``).

    Attributes:
        filtered: Datagrams dropped because of their topic.

    Raises:
        ImportError: msgpack is not installed (``pip install mcast_trio[mcl]``).
    """

    def __init__(
        self,
        topics: Iterable[str | bytes] | str | bytes | None = None,
        *,
        max_messages: int = 256,
        max_bytes: int = 32 << 20,
        timeout: float = 2.0,
    ) -> None:
        msgpack = _msgpack()
        self._unpackb = msgpack.unpackb
        self._topics = _normalize_topics("topics", topics)
        self._store = _FragmentStore(max_messages, max_bytes, timeout, recent=0)
        self.filtered = 0

    @property
    def stats(self) -> ReassemblyStats:
        return self._store.stats()

    def expire(self, now: float) -> int:
        """Drop incomplete messages whose timeout has passed; return how many."""
        return self._store.expire(now)

    def feed(self, datagram: bytes | bytearray | memoryview, address: Any, now: float) -> Message | None:
        """Decode one datagram.

        Returns:
            The complete :class:`Message` (its payload the unpacked object),
            or None (chunk of an incomplete message, filtered topic, or a
            dropped chunk).

        Raises:
            MalformedFrame: The datagram is not an MCL frame (not a msgpack
                array ``[topic, payload]`` or ``[topic, i, n, chunk]`` with
                bytes/nil topic, bytes chunk and ``1 <= i <= n``), is longer
                than 65000 bytes, or holds more than its size allows.
        """
        n = len(datagram)
        if not n or datagram[0] not in _MCL_ARRAY_STARTS:
            first = f"0x{datagram[0]:02x}" if n else "end of datagram"
            raise MalformedFrame(
                f"offset 0: {first} does not start a msgpack array of 2 or 4 items"
            )
        if n > _MCL_MAX_DATAGRAM:
            raise MalformedFrame(
                f"offset {_MCL_MAX_DATAGRAM}: datagram is {n} bytes; MCL sends and reads "
                f"at most {_MCL_MAX_DATAGRAM}"
            )
        try:
            frame = _unpack_bounded(self._unpackb, datagram)
        except Exception as exc:  # msgpack raises several types for bad bytes
            raise MalformedFrame(f"offset 0: datagram is not valid msgpack ({exc})") from None
        if type(frame) is not list or len(frame) not in (2, 4):
            raise MalformedFrame(
                f"offset 0: expected a msgpack array of 2 or 4 items, got "
                f"{len(frame) if type(frame) is list else type(frame).__name__}"
            )
        topic = frame[0]
        if topic is not None and type(topic) is not bytes:
            raise MalformedFrame(f"offset 1: topic is {type(topic).__name__}, expected str/bin or nil")
        topics = self._topics
        if len(frame) == 2:
            if topics is not None and topic not in topics:
                self.filtered += 1
                return None
            return Message(topic, frame[1], address)
        _, index, count, chunk = frame
        if type(index) is not int or type(count) is not int or not 1 <= index <= count:
            raise MalformedFrame(f"chunk index {index!r} / count {count!r}: expected 1 <= i <= n")
        if type(chunk) is not bytes:
            raise MalformedFrame(f"chunk is {type(chunk).__name__}, expected str/bin")
        if topics is not None and topic not in topics:
            self.filtered += 1
            return None
        store = self._store
        joined = store.add((address, topic, count), index - 1, count, -1, -1, topic, chunk, now, True)
        if joined is None:
            return None
        try:
            payload = _unpack_bounded(self._unpackb, joined)
        except Exception:
            store.completed -= 1
            store.inconsistent += 1
            return None
        return Message(topic, payload, address)


# --------------------------------------------------------------------------
# filters


def make_filter(
    topics: Iterable[str | bytes] | str | bytes | None = None,
    filter: Callable[[bytes, Any], bool] | str | bytes | re.Pattern[Any] | None = None,
) -> Callable[[bytes | None, bytes, Any], bool]:
    """Build a predicate ``(topic, payload, address) -> bool`` for receivers.

    Args:
        topics: Accept only messages whose topic is one of these (str,
            encoded as UTF-8, or bytes; exact match). A single str/bytes is
            one topic. Messages without a topic (raw framing, MCL nil) never
            match. None: no topic condition.
        filter: Either a callable ``(payload, address) -> bool``, or a regular
            expression (str, bytes or compiled) searched (``re.search``) in
            the payload; a str pattern is encoded as UTF-8, and never matches
            a payload that is not bytes (an MCL dict, list, number...). None:
            no payload condition.

    Returns:
        A predicate that is True when every given condition holds.

    Raises:
        TypeError: ``topics`` or ``filter`` has an unsupported type.
        ValueError: ``topics`` is empty or ``filter`` is not a valid regular
            expression.
    """
    topic_set = _normalize_topics("topics", topics)
    search: Callable[[bytes, Any], bool] | None
    if filter is None:
        search = None
    elif isinstance(filter, (str, bytes, re.Pattern)):
        if isinstance(filter, re.Pattern):
            pattern, flags = filter.pattern, filter.flags
        else:
            pattern, flags = filter, 0
        if isinstance(pattern, str):
            pattern = pattern.encode("utf-8")
            flags &= ~re.UNICODE
        try:
            regex = re.compile(pattern, flags)
        except re.error as exc:
            raise ValueError(f"filter={filter!r} is not a valid regular expression: {exc}") from None
        regex_search = regex.search

        def search(payload: Any, address: Any) -> bool:
            # MCL payloads may be any object: a pattern matches byte strings only.
            return type(payload) is bytes and regex_search(payload) is not None

    elif callable(filter):
        search = filter
    else:
        raise TypeError(
            f"filter={filter!r} must be None, a callable (payload, address) -> bool, "
            f"or a regular expression (str, bytes or re.Pattern)"
        )

    if topic_set is None and search is None:
        return lambda topic, payload, address: True
    if search is None:
        return lambda topic, payload, address: topic in topic_set
    if topic_set is None:
        return lambda topic, payload, address: bool(search(payload, address))
    return lambda topic, payload, address: topic in topic_set and bool(search(payload, address))
