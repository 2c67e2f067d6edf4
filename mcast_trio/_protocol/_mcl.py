"""MCL framing: byte-compatible with the UDP layer of MCL.

MCL is ``acfr/mcl`` (its ``mcl/network/udp.py``): a message is any msgpack-serialisable object
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

Bounded work per datagram: see :class:`MclDecoder`.
"""

from __future__ import annotations

import gc as _gc
from collections.abc import Callable, Iterable
from typing import Any

from .._errors import MalformedFrame
from .._validate import check_bool, check_int
from ._filters import normalize_topics
from ._message import Message, as_payload
from ._reassembly import MAX_FRAGMENTS, FragmentStore, ReassemblyStats

__all__ = ["MCL_CHUNK_SIZE", "MCL_MAX_DATAGRAM", "require_msgpack", "MclEncoder", "MclDecoder"]

#: MCL's fragmentation threshold and chunk size (``MTU`` in mcl/network/udp.py).
MCL_CHUNK_SIZE = 60000
#: MCL's ``MTU_MAX``: its listener's ``recvfrom`` size, so the largest
#: datagram an MCL listener reads whole.
MCL_MAX_DATAGRAM = 65000
#: Largest chunk size whose chunk datagrams ``[nil, i, n, chunk]`` stay within
#: 65000 bytes: fixarray (1) + nil (1) + uint16 i (3) + uint16 n (3) + str16
#: or bin16 header (3).
_MCL_MAX_CHUNK = MCL_MAX_DATAGRAM - 11

_msgpack_module: Any = None


def require_msgpack() -> Any:
    """Return the ``msgpack`` module, imported on first use.

    Raises:
        ImportError: msgpack is not installed; the message names the extra
            (``pip install mcast_trio[mcl]``).
    """
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
        msgpack = require_msgpack()
        self._topic = self._check_topic(topic)
        self._chunk_size = check_int("chunk_size", chunk_size, 64, _MCL_MAX_CHUNK)
        check_bool("use_bin_type", use_bin_type)
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
                payload = bytes(as_payload(payload))  # bytes-like: a byte string
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
        if count > MAX_FRAGMENTS:
            raise ValueError(
                f"payload packs to {size} bytes; with chunk_size={chunk} MCL framing "
                f"allows at most {MAX_FRAGMENTS} chunks"
            )
        out = [pack((t, i + 1, count, data[i * chunk:(i + 1) * chunk])) for i in range(count)]
        longest = max(map(len, out))
        if longest > MCL_MAX_DATAGRAM:
            raise ValueError(
                f"topic={_short_repr(t)}: a chunk datagram would be {longest} bytes, more than the "
                f"{MCL_MAX_DATAGRAM} an MCL listener reads; use a shorter topic or a "
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
        msgpack = require_msgpack()
        self._unpackb = msgpack.unpackb
        self._topics = normalize_topics("topics", topics)
        self._store = FragmentStore(max_messages, max_bytes, timeout, recent=0)
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
        if n > MCL_MAX_DATAGRAM:
            raise MalformedFrame(
                f"offset {MCL_MAX_DATAGRAM}: datagram is {n} bytes; MCL sends and reads "
                f"at most {MCL_MAX_DATAGRAM}"
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
            store.counts.completed -= 1
            store.counts.inconsistent += 1
            return None
        return Message(topic, payload, address)
