"""Bounded, expiring reassembly of fragmented messages.

:class:`Reassembler` reassembles native messages from their fragments
(keyed by address, sender id and sequence number, recognising a sender
that starts over); :class:`FragmentStore` is the bounded buffer of
incomplete messages it shares with the MCL decoder, whose chunks carry no
message id. :func:`check_reassembly_limits` is the one check of the bounds
both take (and a receiver takes under its own names).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from zlib import crc32 as _crc32

from .._counters import counters_for
from .._validate import check_int, check_number
from ._tracking import RESTART, SenderTable

if TYPE_CHECKING:
    from ._native import FrameHeader

__all__ = [
    "MAX_FRAGMENTS",
    "FRAGMENT_OVERHEAD",
    "MESSAGE_OVERHEAD",
    "ReassemblyStats",
    "check_reassembly_limits",
    "FragmentStore",
    "Reassembler",
]

#: Most fragments of one message (the native header's count is a u16; MCL
#: chunk counts are held to the same bound).
MAX_FRAGMENTS = 0xFFFF
#: Bounds of ``max_messages`` and ``max_bytes``.
_MAX_PENDING = 1 << 20
_MAX_BYTES = 1 << 40


def check_reassembly_limits(
    timeout: object,
    max_messages: object,
    max_bytes: object,
    *,
    names: tuple[str, str, str] = ("timeout", "max_messages", "max_bytes"),
) -> tuple[float, int, int]:
    """Check the reassembly bounds; return ``(timeout, max_messages, max_bytes)``.

    ``timeout``: seconds an incomplete message is kept, finite and > 0;
    ``max_messages``: incomplete messages held at once, ``1 .. 2**20``;
    ``max_bytes``: bytes held at once, overheads included, ``1 .. 2**40``.
    ``names`` are the argument names the messages use (a receiver passes its
    own: ``("reassembly_timeout", "max_pending_messages",
    "max_reassembly_bytes")``).

    Raises:
        TypeError: A bound is not a number (``timeout``) or not an integer.
        ValueError: A bound is out of range.
    """
    timeout_name, messages_name, bytes_name = names
    max_messages = check_int(messages_name, max_messages, 1, _MAX_PENDING)
    max_bytes = check_int(bytes_name, max_bytes, 1, _MAX_BYTES)
    timeout = check_number(timeout_name, timeout, 0.0, low_open=True)
    return timeout, max_messages, max_bytes


@dataclass(frozen=True, slots=True)
class ReassemblyStats:
    """Counters of a :class:`Reassembler` (or of an MCL decoder's reassembly).

    Attributes:
        completed: Multi-fragment messages reassembled and returned
            (single-fragment messages bypass the reassembler and are not
            counted).
        expired: Incomplete messages dropped after ``timeout``.
        evicted: Incomplete messages dropped to respect ``max_messages`` or
            ``max_bytes`` (the oldest of the source address holding the
            most, so that a flooding source evicts its own).
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
        bytes_buffered: Bytes currently held: fragment bytes, the fixed
            overheads and the topics of the incomplete messages.
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


_ReassemblyCounters = counters_for(ReassemblyStats)


#: What holding one fragment costs beyond its bytes (the bytes object's
#: header, its slot in the message's fragment table, the index), and what one
#: incomplete message costs beyond its fragments (its record, its table, its
#: key with the sender's address, its topic, its place in the age order), in
#: bytes, measured with tracemalloc on CPython 3.11 and rounded up. Counting
#: them in ``bytes_buffered`` makes ``max_bytes`` a bound on the memory held,
#: also for tiny fragments (1-byte fragments cost ~100 times their bytes).
FRAGMENT_OVERHEAD = 160
MESSAGE_OVERHEAD = 1024
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


class _Owner:
    """The incomplete messages of one source address, oldest first, and the
    bytes they are charged."""

    __slots__ = ("keys", "nbytes")

    def __init__(self) -> None:
        self.keys: dict[Hashable, None] = {}
        self.nbytes = 0


class FragmentStore:
    """Bounded, expiring buffer of incomplete messages (shared by the native
    and the MCL reassembly). Keys are tuples whose first items identify the
    sender (``sender_len`` of them); insertion order is age order.
    ``bytes_buffered`` counts fragment bytes plus the per-fragment and
    per-message overheads and each incomplete message's topic, so
    ``max_bytes`` bounds the memory held.

    The bounds are shared by every source, fairly: the first item of a key
    is the source address, and a new message or fragment that needs room
    evicts the oldest incomplete message of the source holding the most
    (messages for ``max_messages``, bytes for ``max_bytes``; among equals,
    the source seen first). A source that floods incomplete messages thus
    evicts its own, not those of a source holding fewer. The limit: a
    hostile host that spreads its messages over many source ports holds as
    many shares as ports."""

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
        self.timeout, self.max_messages, self.max_bytes = check_reassembly_limits(
            timeout, max_messages, max_bytes)
        self.pending: OrderedDict[Hashable, _Pending] = OrderedDict()
        # What each source address (the key's first item) holds.
        self._owners: dict[Hashable, _Owner] = {}
        # Recently completed messages, oldest first, to recognise late
        # duplicate fragments: key -> (count, total, CRC-32 of each of the
        # first _FINGERPRINTED fragments). A fragment whose bytes differ is
        # not a duplicate but a new message reusing the key (its sender
        # started over), even when its sequence number does not say so.
        self._recent: OrderedDict[Hashable, tuple[int, int, tuple[int, ...]]] = OrderedDict()
        self._recent_max = recent
        # The counters (``pending`` is not kept there: it is len(pending)).
        self.counts = _ReassemblyCounters()

    def stats(self) -> ReassemblyStats:
        return self.counts.snapshot(pending=len(self.pending))

    def expire(self, now: float) -> int:
        pending = self.pending
        dropped = 0
        while pending:
            key, entry = next(iter(pending.items()))
            if entry.deadline > now:
                break
            self._drop(key)
            dropped += 1
        self.counts.expired += dropped
        return dropped

    def _drop(self, key: Hashable) -> _Pending:
        entry = self.pending.pop(key)
        self.counts.bytes_buffered -= entry.nbytes
        owners = self._owners
        owner = owners[key[0]]
        del owner.keys[key]
        owner.nbytes -= entry.nbytes
        if not owner.keys:
            del owners[key[0]]
        return entry

    def _charge(self, key: Hashable, entry: _Pending, size: int) -> None:
        entry.nbytes += size
        self.counts.bytes_buffered += size
        self._owners[key[0]].nbytes += size

    def _evict(self, by_bytes: bool) -> None:
        """Evict the oldest incomplete message of the source holding the
        most bytes (``by_bytes``) or messages."""
        owners = self._owners
        if by_bytes:
            victim = max(owners.values(), key=lambda owner: owner.nbytes)
        else:
            victim = max(owners.values(), key=lambda owner: len(owner.keys))
        self._drop(next(iter(victim.keys)))
        self.counts.evicted += 1

    def forget_sender(self, sender: tuple) -> None:
        """The sender whose keys start with ``sender`` started over: drop its
        incomplete messages (counted as superseded) and forget its completed
        ones, whose keys its new messages reuse."""
        sender_len = len(sender)
        stale = [key for key in self.pending if key[:sender_len] == sender]
        for key in stale:
            self._drop(key)
        self.counts.superseded += len(stale)
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
        # What one incomplete message holds besides its fragments: its
        # bookkeeping and its topic (held once, in the record and the key;
        # an MCL topic may be 60 kB).
        message_cost = MESSAGE_OVERHEAD + (len(topic) if type(topic) is bytes else 0)
        # What the whole message would hold at once (for MCL, whose size is
        # unknown, at least its fragments' overheads).
        need = max(total, 0) + count * FRAGMENT_OVERHEAD + message_cost
        if count > MAX_FRAGMENTS or need > max_bytes:
            self.counts.oversized += 1
            return None
        entry = pending.get(key)
        if entry is not None:
            if entry.count != count or entry.total != total or entry.chunk != chunk or entry.topic != topic:
                self.counts.inconsistent += 1
                return None
            held = entry.parts.get(index)
            if held is not None:
                if held == fragment:
                    self.counts.duplicate_fragments += 1
                    return None
                if self.sender_len:
                    # Another message under this key: its sender started over.
                    self.restarted(key)
                    entry = None
                elif not ordered:
                    self.counts.inconsistent += 1
                    return None
            if entry is not None and ordered and index <= entry.top:
                self._drop(key)
                self.counts.superseded += 1
                entry = None
        elif key in self._recent:
            done_count, done_total, crcs = self._recent[key]
            if (done_count == count and done_total == total
                    and (index >= len(crcs) or _crc32(fragment) == crcs[index])):
                self.counts.duplicate_fragments += 1
                return None
            # Not a copy: a new message under this key, its sender started over.
            if self.sender_len:
                self.restarted(key)
            else:
                del self._recent[key]
        size = len(fragment) + FRAGMENT_OVERHEAD
        if entry is None:
            size += message_cost
        if size > max_bytes:
            self.counts.oversized += 1
            return None
        if entry is None:
            if len(pending) >= self.max_messages:
                self._evict(by_bytes=False)
        while self.counts.bytes_buffered + size > max_bytes:
            self._evict(by_bytes=True)
            if entry is not None and key not in pending:
                # The message this fragment belongs to was evicted: it is
                # gone, and this fragment alone could never complete it.
                return None
        if entry is None:
            entry = pending[key] = _Pending(now + self.timeout, count, total, chunk, topic)
            owner = self._owners.get(key[0])
            if owner is None:
                owner = self._owners[key[0]] = _Owner()
            owner.keys[key] = None
        entry.parts[index] = fragment
        self._charge(key, entry, size)
        if index > entry.top:
            entry.top = index
        if len(entry.parts) < count:
            return None
        self._drop(key)
        self.counts.completed += 1
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
    bytes, plus its topic), so ``max_bytes`` bounds the memory the buffers
    hold even when fragments are tiny. Besides, the keys of the last ``max_messages``
    completed messages are kept (to recognise late duplicate fragments).

    Args:
        max_messages: Most incomplete messages held at once (the oldest of
            the source address holding the most is evicted, see
            :class:`FragmentStore`). Allowed: ``1 .. 2**20``.
        max_bytes: Most bytes held at once, overheads included (likewise
            evicted; a message that could not fit is dropped as
            oversized). Allowed: ``1 .. 2**40``.
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
        self._store = FragmentStore(max_messages, max_bytes, timeout, recent=max_messages, sender_len=2)
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
        return self._store.counts.bytes_buffered

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
            store.counts.inconsistent += 1
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
