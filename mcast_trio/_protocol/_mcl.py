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

Bounded work and memory per datagram and per message: see :class:`MclDecoder`.
"""

from __future__ import annotations

import gc as _gc
from collections.abc import Generator, Iterable
from types import GeneratorType
from typing import Any

from .._errors import MalformedFrame
from .._validate import check_bool, check_int
from ._filters import normalize_topics
from ._message import Message, as_payload
from ._reassembly import MAX_FRAGMENTS, FragmentStore, ReassemblyStats

__all__ = [
    "MCL_CHUNK_SIZE",
    "MCL_MAX_DATAGRAM",
    "MCL_BYTES_PER_CONTAINER",
    "MCL_MIN_CONTAINERS",
    "MCL_UNPACK_SLICE",
    "require_msgpack",
    "MclEncoder",
    "MclDecoder",
]

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
#: A message (or datagram) of ``n`` bytes may build at most
#: ``max(MCL_MIN_CONTAINERS, n // MCL_BYTES_PER_CONTAINER)`` containers
#: (arrays, maps and ext objects): one per 8 bytes, and 512 whatever its
#: size. A record of named fields, MCL's messages, takes tens of bytes; an
#: empty list takes 1 byte of msgpack and 72 bytes of Python objects.
MCL_BYTES_PER_CONTAINER = 8
MCL_MIN_CONTAINERS = 512
#: An ext object (``msgpack.ExtType``, built by Python code, about 1 us)
#: counts as this many containers. MCL never sends one.
_EXT_WEIGHT = 8
#: Messages longer than this are unpacked in slices of this size, with
#: :meth:`MclDecoder.feed_paced` handing control back between two slices;
#: the density bound holds for every slice's end: after ``k`` bytes, at
#: most ``max(512, k // 8)`` containers.
MCL_UNPACK_SLICE = 1 << 16
#: An upper bound of the memory an object payload holds (dicts, lists,
#: numbers), in bytes: this much per byte of its msgpack (the costliest
#: scalar, a negative fixint, is 1 byte of msgpack and a 32-byte int object
#: in an 8-byte list slot: 40) plus this much per container built (an empty
#: dict is 1 byte and 80 bytes of memory; a one-entry dict about 200),
#: measured with tracemalloc on CPython 3.11 for the densest shapes the
#: bounds accept: what :attr:`MclDecoder.built_bytes` adds up. A byte string
#: holds its length plus :data:`_BYTES_OBJECT`.
_OBJECT_BYTES_PER_BYTE = 48
_CONTAINER_BYTES = 256
_BYTES_OBJECT = 40

#: First bytes of a msgpack str or bin (fixstr, str8/16/32, bin8/16/32):
#: such a payload builds one bytes object, a copy, whatever its size.
_BYTES_STARTS = frozenset(range(0xA0, 0xC0)) | {0xC4, 0xC5, 0xC6, 0xD9, 0xDA, 0xDB}


class _TooDense(Exception):
    """The input asks for more containers than its size allows."""


def _container_limit(n: int) -> int:
    return max(MCL_MIN_CONTAINERS, n // MCL_BYTES_PER_CONTAINER)


def _too_dense(what: str, limit: int, n: int, total: int | None = None) -> _TooDense:
    where = f"{n} bytes" if total is None else f"its first {n} of {total} bytes"
    return _TooDense(
        f"offset 0: {what} builds more than {limit} arrays, maps and ext objects in "
        f"{where}; allowed: one per {MCL_BYTES_PER_CONTAINER} bytes, or {MCL_MIN_CONTAINERS}"
    )


class _Budget:
    """The containers one unpacking may build: msgpack's hooks count each
    array, map and ext object as it is built (an ext object, built in Python
    as a named tuple, as several) and the first one over ``limit`` stops the
    unpacking with :class:`_TooDense` (naming the ``seen`` bytes the limit
    was derived from, of ``total`` when only a part was fed yet)."""

    __slots__ = ("what", "limit", "seen", "total", "built", "_ext_type")

    def __init__(self, msgpack: Any, what: str, limit: int, seen: int, total: int | None = None) -> None:
        self.what, self.limit, self.seen, self.total = what, limit, seen, total
        self.built = 0
        self._ext_type = msgpack.ExtType

    def count(self, obj):
        self.built += 1
        if self.built > self.limit:
            raise _too_dense(self.what, self.limit, self.seen, self.total)
        return obj

    def ext(self, code, payload):
        self.built += _EXT_WEIGHT - 1
        self.count(None)
        return self._ext_type(code, payload)


def _unpack_bounded(msgpack: Any, data: bytes | bytearray | memoryview,
                    what: str = "datagram") -> tuple[Any, int]:
    """Unpack ``data`` (exactly one msgpack object) building no more than
    its ``n`` bytes could legitimately hold; return the object and the
    number of containers built (ext objects weighted).

    * An element, a map entry's key and value, a string's byte take at least
      1 byte each, so no array of more than ``n`` elements, no map of more
      than ``n // 2`` entries, no string, bin or ext longer than ``n``
      (msgpack's ``max_*_len`` limits, set explicitly so that the bound does
      not depend on the version's defaults). A datagram that declares more
      elements than it has bytes is refused at the header instead of
      building everything that follows
      (``test_mcl_declared_length_beyond_the_datagram_is_refused_without_building``).
    * Containers (arrays, maps, ext objects) are what costs: an empty list
      is 1 byte of msgpack and 72 bytes of memory, tracked by the garbage
      collector. At most ``max(512, n // 8)`` of them are built (counted by
      msgpack's hooks as they are made; the first one beyond the bound
      stops the unpacking; an ext object, built by Python code, counts as
      8): a datagram of 65,000 empty lists (an "array bomb") is refused
      after 8,125, in about a millisecond.
    * A msgpack timestamp (ext type -1) comes out as an int, nanoseconds
      since the epoch (msgpack's ``timestamp=2``: built in C, no Python
      ``Timestamp`` object per 6 bytes).
    * Map keys must be byte strings (msgpack's ``strict_map_key``; MCL's
      messages are Python 2 dicts with str keys): the hash of an int key is
      the int modulo ``2**61 - 1``, so a map of timestamps ``k * (2**61 -
      1)`` ns would cost a quadratic number of key comparisons (a "hash
      flood": 4,000 keys, 200 ms); bytes hashes are randomized per
      process. A map with another key is refused at that key.
    * For inputs of 4 KiB or more the cyclic garbage collector is paused
      while the objects are built: tens of thousands of containers otherwise
      trigger a collection every 700 of them, each older-generation one
      walking the whole heap.

    Raises:
        _TooDense: too many containers (its message says the bound).
        Exception: whatever msgpack raises for bad bytes (and for a map key
            that is not a byte string).
    """
    n = len(data)
    budget = _Budget(msgpack, what, _container_limit(n), n)
    enabled = n >= _GC_PAUSE_MIN and _gc.isenabled()
    if enabled:
        _gc.disable()
    try:
        obj = msgpack.unpackb(data, raw=True, use_list=True, strict_map_key=True, timestamp=2,
                              max_str_len=n, max_bin_len=n, max_array_len=n, max_map_len=n // 2,
                              max_ext_len=n, list_hook=budget.count, object_hook=budget.count,
                              ext_hook=budget.ext)
    finally:
        if enabled:
            _gc.enable()
    return obj, budget.built


def _unpack_sliced(msgpack: Any, data: bytes) -> Generator[None, Any, Any]:
    """Unpack ``data`` (exactly one msgpack object, longer than
    :data:`MCL_UNPACK_SLICE`) in slices of that size, yielding between two
    slices; return the object and the number of containers built.

    msgpack's streaming ``Unpacker`` keeps its parse state between two
    ``feed`` calls, so each slice costs what its own bytes build (at most
    about 3 ms for 64 KiB of the densest content allowed), and the whole
    costs what one ``unpackb`` would. The limits are those of
    :func:`_unpack_bounded`, with the container bound checked against the
    bytes fed so far: ``max(512, k // 8)`` after ``k`` bytes, so a bomb is
    stopped in its first slice, not after building an eighth of a 32 MB
    message. The garbage collector is paused within a slice, never across a
    yield.

    Raises:
        _TooDense: too many containers.
        ValueError: the bytes hold less or more than one object.
        Exception: whatever msgpack raises for bad bytes.
    """
    n = len(data)
    fed = 0
    budget = _Budget(msgpack, "message", MCL_MIN_CONTAINERS, 0, total=n)
    unpacker = msgpack.Unpacker(
        raw=True, use_list=True, strict_map_key=True, timestamp=2, max_buffer_size=n, max_str_len=n,
        max_bin_len=n, max_array_len=n, max_map_len=n // 2, max_ext_len=n,
        list_hook=budget.count, object_hook=budget.count, ext_hook=budget.ext)
    view = memoryview(data)
    out_of_data = msgpack.OutOfData
    while True:
        end = min(fed + MCL_UNPACK_SLICE, n)
        unpacker.feed(view[fed:end])
        fed = end
        budget.seen, budget.limit = fed, _container_limit(fed)
        enabled = _gc.isenabled()
        if enabled:
            _gc.disable()
        try:
            obj = unpacker.unpack()
        except out_of_data:
            if fed == n:
                raise ValueError(f"the {n} bytes end inside a msgpack object") from None
            obj = unpacker  # not done
        finally:
            if enabled:
                _gc.enable()
        if obj is not unpacker:
            if fed != n or unpacker.tell() != n:
                raise ValueError(f"extra bytes after the msgpack object, at offset {unpacker.tell()}")
            return obj, budget.built
        yield


def _run(steps: Generator[None, Any, Any]) -> Any:
    """Run a generator to completion; return its return value."""
    try:
        while True:
            next(steps)
    except StopIteration as stop:
        return stop.value


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
    raw family carries no encoding). Map keys must be byte strings (MCL's
    records are Python 2 dicts with str keys): a map with another key (an
    int, a float, nil, a timestamp) is malformed, as ints and floats hash
    predictably and a map of colliding keys costs quadratic time.

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

    Bounded work and memory per datagram and per message:

    * a datagram longer than 65000 bytes is refused before it is unpacked
      (MCL never sends one, and its listener reads at most 65000 bytes, so
      it could not read one either);
    * unpacking ``n`` bytes may not build more than they could
      legitimately hold (msgpack's ``max_*_len`` limits set from ``n``: no
      array of more elements, no map of more entries than half, no string
      longer than the bytes);
    * nor more than ``max(512, n // 8)`` containers (arrays, maps, ext
      objects; an ext object, built by Python code, counts as 8; a msgpack
      timestamp comes out as an int of nanoseconds since the epoch, built
      in C), counted as they are built: an "array bomb" (65,000 empty
      lists in one datagram, 32 million in a reassembled message) is
      refused after at most 8,125 of them, as :exc:`MalformedFrame` (a
      datagram) or, for a reassembled message, :exc:`MalformedFrame` raised
      by the datagram that completes it; never delivered;
    * a reassembled message longer than 64 KiB whose payload is not a byte
      string is unpacked in 64 KiB slices: :meth:`feed_paced` returns a
      generator that yields between two slices (the receive pipeline lets
      other tasks run there), and the density bound holds after every
      slice, so a bomb is stopped in its first slice;
    * the garbage collector is paused while the objects of 4 KiB or more of
      input are built (within a slice, never across a yield).

    What MCL's own messages are (records of named fields, lists of them,
    byte strings, numbers) is never refused; only shapes denser than one
    container per 8 bytes are, which :class:`MclEncoder` can produce (e.g.
    ``[[]] * 1000``) but no MCL message type does.

    Args:
        topics: Accept only these topics (str or bytes, exact match); None
            accepts every topic (including nil).
        max_messages, max_bytes, timeout: Reassembly bounds, as for
            :class:`Reassembler` (overheads and each incomplete message's
            topic included in ``max_bytes``).

    Attributes:
        filtered: Datagrams dropped because of their topic.
        built_bytes: An upper bound of the memory, in bytes, of the topics
            and payloads of every message returned so far (a byte string:
            its length and 40; any other object: 48 bytes per byte of its
            msgpack and 256 per container built, which the densest shapes
            the bounds accept stay under, measured): a receiver charges it
            to its queue's byte bound (``max_queue_bytes``).

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
        self._msgpack = require_msgpack()
        self._topics = normalize_topics("topics", topics)
        self._store = FragmentStore(max_messages, max_bytes, timeout, recent=0)
        self.filtered = 0
        self.built_bytes = 0

    @property
    def stats(self) -> ReassemblyStats:
        return self._store.stats()

    def expire(self, now: float) -> int:
        """Drop incomplete messages whose timeout has passed; return how many."""
        return self._store.expire(now)

    def feed(self, datagram: bytes | bytearray | memoryview, address: Any, now: float) -> Message | None:
        """Decode one datagram.

        A large reassembled message is unpacked here in one go (its slices
        without pause); :meth:`feed_paced` lets the caller run between
        them.

        Returns:
            The complete :class:`Message` (its payload the unpacked object),
            or None (chunk of an incomplete message, filtered topic, or a
            dropped chunk).

        Raises:
            MalformedFrame: The datagram is not an MCL frame (not a msgpack
                array ``[topic, payload]`` or ``[topic, i, n, chunk]`` with
                bytes/nil topic, bytes chunk and ``1 <= i <= n``), is longer
                than 65000 bytes, or holds more than its size allows; or it
                completes a message that holds more containers than its
                size allows.
        """
        result = self.feed_paced(datagram, address, now)
        if type(result) is GeneratorType:
            return _run(result)
        return result

    def feed_paced(
        self, datagram: bytes | bytearray | memoryview, address: Any, now: float
    ) -> Message | None | Generator[None, Any, Message | None]:
        """As :meth:`feed`, but a reassembled message that is unpacked in
        slices comes back as a generator: iterate it (it yields between two
        slices, where the caller may let other work run) and its return
        value (``StopIteration.value``, or ``yield from``) is what
        :meth:`feed` returns. It raises what :meth:`feed` raises.
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
            frame, built = _unpack_bounded(self._msgpack, datagram)
        except _TooDense as exc:
            raise MalformedFrame(str(exc)) from None
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
            return self._message(topic, frame[1], n, built, address)
        _, index, count, chunk = frame
        if type(index) is not int or type(count) is not int or not 1 <= index <= count:
            raise MalformedFrame(f"chunk index {index!r} / count {count!r}: expected 1 <= i <= n")
        if type(chunk) is not bytes:
            raise MalformedFrame(f"chunk is {type(chunk).__name__}, expected str/bin")
        if topics is not None and topic not in topics:
            self.filtered += 1
            return None
        joined = self._store.add((address, topic, count), index - 1, count, -1, -1, topic, chunk, now, True)
        if joined is None:
            return None
        if len(joined) > MCL_UNPACK_SLICE and joined[0] not in _BYTES_STARTS:
            return self._finish(topic, joined, address, _unpack_sliced(self._msgpack, joined))
        try:
            payload, built = _unpack_bounded(self._msgpack, joined, "message")
        except _TooDense as exc:
            self._store.counts.completed -= 1
            raise MalformedFrame(str(exc)) from None
        except Exception:
            self._refused()
            return None
        return self._message(topic, payload, len(joined), built, address)

    def _finish(self, topic: Any, joined: bytes, address: Any,
                steps: Generator[None, Any, Any]) -> Generator[None, Any, Message | None]:
        try:
            payload, built = yield from steps
        except _TooDense as exc:
            self._store.counts.completed -= 1
            raise MalformedFrame(str(exc)) from None
        except Exception:
            self._refused()
            return None
        return self._message(topic, payload, len(joined), built, address)

    def _refused(self) -> None:
        # Reassembled bytes that do not unpack to exactly one object.
        counts = self._store.counts
        counts.completed -= 1
        counts.inconsistent += 1

    def _message(self, topic: Any, payload: Any, size: int, containers: int, address: Any) -> Message:
        # An upper bound of what the message holds (see built_bytes).
        self.built_bytes += ((len(payload) + _BYTES_OBJECT if type(payload) is bytes
                              else _OBJECT_BYTES_PER_BYTE * size + _CONTAINER_BYTES * containers)
                             + (len(topic) + _BYTES_OBJECT if topic is not None else 0))
        return Message(topic, payload, address)
