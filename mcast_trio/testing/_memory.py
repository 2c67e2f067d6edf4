"""An in-memory multicast network with deterministic fault injection.

:class:`MemoryNetwork` implements the network seam of ``mcast_trio._io._net``: the
real :func:`~mcast_trio.open_sender` and :func:`~mcast_trio.open_receiver` run
over it unchanged (install it with :func:`~mcast_trio.testing.use_network` or
pass ``network=``). Datagrams never touch a socket; every receiver that joined
a group and port gets its own copy, subject to the :class:`LinkRules` of the
link from that sender to that receiver.

Faults come from one seeded ``random.Random`` per link (derived from the
network's seed, the group and port, the sender's and the receiver's numbers),
so a failing test reproduces exactly. Every decision is counted in the link's
:class:`FaultCounts`, so tests can assert that what a receiver reports equals
what was injected.

Delays use trio's clock (``trio.current_time()``), so they work with
``MockClock`` and pytest-trio's ``autojump_clock``: a receiver waiting for a
delayed datagram sleeps until it is due.
"""

from __future__ import annotations

import hashlib
import heapq
import math
import random
from dataclasses import dataclass, fields, replace
from typing import Any

import trio

from .. import _validate

__all__ = ["LinkRules", "FaultCounts", "MemoryNetwork", "MemoryReceiver", "MemorySender"]


def _check_rule(name: str, value: Any, high: float | None, allowed: str) -> float:
    # LinkRules refuses a non-number with ValueError, not TypeError (as it
    # always has; tests/test_harness.py asserts it).
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name}={value!r} is out of range; allowed: {allowed}")
    return _validate.check_number(name, value, 0.0, high, allowed=allowed)


@dataclass(frozen=True)
class LinkRules:
    """What a link does to datagrams, each decided per datagram and receiver.

    Args:
        loss: probability that the datagram is dropped.
        duplicate: probability that it is delivered twice (back to back).
        reorder: probability that it is held back and delivered right after
            the next datagram on the link (so it arrives exactly one place
            late); a held datagram is released after ``reorder_timeout`` if
            nothing follows (and then not counted as reordered). Only one
            datagram is held at a time, and a duplicated one is never held.
        delay: fixed one-way delay, seconds (trio clock).
        jitter: extra delay drawn uniformly in ``[0, jitter)`` seconds; note
            that jitter larger than the spacing of datagrams reorders them
            too (those are not counted as ``reordered``).
        truncate: probability that the datagram is cut to a random shorter
            length (at least 0 bytes, at most one byte short).
        corrupt: probability that one random byte is flipped (XOR with a
            random non-zero value).
        reorder_timeout: see ``reorder``.

    Raises:
        ValueError: an argument is out of range; the message names it.
    """

    loss: float = 0.0
    duplicate: float = 0.0
    reorder: float = 0.0
    delay: float = 0.0
    jitter: float = 0.0
    truncate: float = 0.0
    corrupt: float = 0.0
    reorder_timeout: float = 0.1

    def __post_init__(self) -> None:
        for name in ("loss", "duplicate", "reorder", "truncate", "corrupt"):
            _check_rule(name, getattr(self, name), 1.0, "a probability in 0.0..1.0")
        for name in ("delay", "jitter", "reorder_timeout"):
            _check_rule(name, getattr(self, name), None, "a finite number >= 0")

    @property
    def perfect(self) -> bool:
        return not (self.loss or self.duplicate or self.reorder or self.delay or self.jitter
                    or self.truncate or self.corrupt)


@dataclass
class FaultCounts:
    """What a link (or the whole network) did, datagram by datagram.

    ``sent`` counts datagrams offered to the link; ``delivered`` copies that
    reached the receiver's queue (duplicates included); ``overflowed`` copies
    the receiver's bounded queue refused (like a kernel drop).
    """

    sent: int = 0
    delivered: int = 0
    lost: int = 0
    duplicated: int = 0
    reordered: int = 0
    truncated: int = 0
    corrupted: int = 0
    overflowed: int = 0

    def __iadd__(self, other: FaultCounts) -> FaultCounts:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        return self

    def snapshot(self) -> FaultCounts:
        return replace(self)


class FaultLink:
    """The fault state of one link: rules, random generator, counts and the
    datagram held back for reordering. Sans-I/O: :meth:`process` says what
    to deliver and when; the caller delivers."""

    __slots__ = ("rules", "rng", "counts", "held")

    def __init__(self, rules: LinkRules, seed: bytes) -> None:
        self.rules = rules
        self.rng = random.Random(int.from_bytes(hashlib.sha256(seed).digest()[:8], "big"))
        self.counts = FaultCounts()
        self.held: tuple[bytes, float] | None = None

    def expire(self, now: float) -> list[tuple[float, bytes]]:
        """Release the held datagram if its timeout passed: nothing overtook
        it, so it arrives in order and does not count as reordered."""
        if self.held is not None and self.held[1] <= now:
            held = self.held[0]
            self.held = None
            self.counts.reordered -= 1
            return [(now, held)]
        return []

    def process(self, data: bytes, now: float) -> list[tuple[float, bytes]]:
        """Apply the rules to one datagram; return ``(due_time, bytes)`` pairs
        to deliver, in order."""
        rules = self.rules
        rng = self.rng
        counts = self.counts
        counts.sent += 1
        out = self.expire(now)
        if rules.perfect:
            out.append((now, data))
            return self._release(out, now)
        if rules.loss and rng.random() < rules.loss:
            counts.lost += 1
            return out
        if rules.truncate and data and rng.random() < rules.truncate:
            data = data[: rng.randrange(len(data))]
            counts.truncated += 1
        if rules.corrupt and data and rng.random() < rules.corrupt:
            flipped = bytearray(data)
            flipped[rng.randrange(len(data))] ^= rng.randrange(1, 256)
            data = bytes(flipped)
            counts.corrupted += 1
        at = now + rules.delay + (rng.random() * rules.jitter if rules.jitter else 0.0)
        copies = 1
        if rules.duplicate and rng.random() < rules.duplicate:
            copies = 2
            counts.duplicated += 1
        if copies == 1 and rules.reorder and self.held is None and rng.random() < rules.reorder:
            # Hold it back until the next datagram has gone. (A duplicated
            # datagram is never also reordered: its late copy would be a
            # duplicate, not a reordering, at the receiver.)
            counts.reordered += 1
            self.held = (data, now + rules.reorder_timeout)
            return out
        out.extend((at, data) for _ in range(copies))
        return self._release(out, at)

    def _release(self, out: list[tuple[float, bytes]], at: float) -> list[tuple[float, bytes]]:
        if self.held is not None:
            out.append((at, self.held[0]))
            self.held = None
        return out


class MemoryReceiver:
    """A receiver endpoint of :class:`MemoryNetwork` (the socket stand-in)."""

    def __init__(self, network: MemoryNetwork, spec, rcvbuf: int | None, number: int) -> None:
        self.network = network
        self.spec = spec
        self.number = number
        self.granted_rcvbuf = int(rcvbuf) if rcvbuf else 212992
        self._queue: list[tuple[float, int, bytes, tuple]] = []
        self._queued_bytes = 0
        self._seq = 0
        self._wakeup = trio.Event()
        self._closed = False
        self.drops = 0
        self.links: dict[Any, FaultLink] = {}

    # -- what the network calls --------------------------------------------

    def _enqueue(self, at: float, data: bytes, source: tuple, link: FaultLink) -> None:
        if self._queued_bytes + len(data) > self.granted_rcvbuf:
            self.drops += 1
            link.counts.overflowed += 1
            return
        self._seq += 1
        heapq.heappush(self._queue, (at, self._seq, data, source))
        self._queued_bytes += len(data)
        link.counts.delivered += 1
        self._wakeup.set()

    # -- the endpoint interface ------------------------------------------------

    def _release_expired(self, now: float) -> float:
        """Release held datagrams whose timeout passed; return the earliest
        deadline of those still held."""
        earliest = math.inf
        for key, link in self.links.items():
            for at, data in link.expire(now):
                self._enqueue(at, data, key, link)
            if link.held is not None:
                earliest = min(earliest, link.held[1])
        return earliest

    def receive_batch(self, batch) -> int:
        if self._closed:
            raise trio.ClosedResourceError("this memory receiver is closed")
        now = trio.current_time()
        self._release_expired(now)
        queue = self._queue
        n = 0
        while queue and n < batch.capacity and queue[0][0] <= now:
            _, _, data, source = heapq.heappop(queue)
            self._queued_bytes -= len(data)
            batch.store(n, data, source)
            n += 1
        batch.count = n
        return n

    def kernel_drops(self, batch=None) -> int:
        return self.drops

    async def wait_readable(self) -> None:
        while True:
            if self._closed:
                raise trio.ClosedResourceError("this memory receiver is closed")
            held_deadline = self._release_expired(trio.current_time())
            deadline = self._queue[0][0] if self._queue else math.inf
            if deadline <= trio.current_time():
                await trio.lowlevel.checkpoint()
                return
            if self._wakeup.is_set():
                self._wakeup = trio.Event()
            with trio.move_on_at(min(deadline, held_deadline)):
                await self._wakeup.wait()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.network._leave(self)
            self._wakeup.set()

    @property
    def faults(self) -> FaultCounts:
        """Counts summed over every link into this receiver."""
        total = FaultCounts()
        for link in self.links.values():
            total += link.counts
        return total

    def __repr__(self) -> str:
        return f"<MemoryReceiver #{self.number} {self.spec.group} port {self.spec.port}>"


class MemorySender:
    """A sender endpoint of :class:`MemoryNetwork`.

    :meth:`pause` makes it behave like a socket whose send buffer is full:
    nothing leaves (``send_batch`` returns 0, ``send_one`` raises
    ``BlockingIOError``) and
    ``wait_writable`` waits until :meth:`resume`. Tests use it to make a
    sender queue.
    """

    def __init__(self, network: MemoryNetwork, spec, source: tuple, number: int) -> None:
        self.network = network
        self.spec = spec
        self.source = source
        self.number = number
        self._closed = False
        self._writable: trio.Event | None = None  # an unset Event while paused

    @property
    def paused(self) -> bool:
        """Whether :meth:`pause` holds the datagrams back."""
        return self._writable is not None

    def pause(self) -> None:
        """Behave as if the send buffer were full until :meth:`resume`."""
        if self._writable is None:
            self._writable = trio.Event()

    def resume(self) -> None:
        """End :meth:`pause`: sending works again, waiters wake up."""
        writable, self._writable = self._writable, None
        if writable is not None:
            writable.set()

    def send_batch(self, datagrams) -> int:
        if self._closed:
            raise trio.ClosedResourceError("this memory sender is closed")
        if self._writable is not None:
            return 0
        count = 0
        for datagram in datagrams:
            self.network._transmit(self, bytes(datagram))
            count += 1
        return count

    def send_one(self, datagram) -> None:
        if self._closed:
            raise trio.ClosedResourceError("this memory sender is closed")
        if self._writable is not None:
            raise BlockingIOError("the memory sender is paused")
        self.network._transmit(self, bytes(datagram))

    async def wait_writable(self) -> None:
        writable = self._writable
        if writable is None:
            await trio.lowlevel.checkpoint()
        else:
            await writable.wait()

    def close(self) -> None:
        self._closed = True
        self.resume()

    def __repr__(self) -> str:
        return f"<MemorySender #{self.number} {self.source[0]}:{self.source[1]} -> {self.spec.group}>"


class MemoryNetwork:
    """A multicast network in memory, with per-link fault rules.

    Args:
        rules: the default :class:`LinkRules` of every link.
        seed: seed of the per-link random generators.

    Use :meth:`set_rules` to give some links other rules (by group and/or
    sender source address), ``receivers`` (a list, in the order they joined)
    to find a receiver's endpoint and its ``faults``, ``senders`` likewise,
    and :attr:`faults` for the totals.

    Only the group (and port) route datagrams: interfaces and TTLs are
    accepted and ignored. The network must be used from trio tasks of one
    ``trio.run``.
    """

    def __init__(self, rules: LinkRules | None = None, *, seed: int = 0) -> None:
        if rules is None:
            rules = LinkRules()
        if not isinstance(rules, LinkRules):
            raise TypeError(f"rules={rules!r} must be a LinkRules")
        seed = _validate.check_int("seed", seed)
        self.default_rules = rules
        self.seed = seed
        self._rules: dict[tuple, LinkRules] = {}
        self._members: dict[tuple, list[MemoryReceiver]] = {}
        self.receivers: list[MemoryReceiver] = []
        self.senders: list[MemorySender] = []
        self._next_port = 40000

    # -- configuration -------------------------------------------------------

    def set_rules(self, rules: LinkRules, *, group: str | None = None, source: str | None = None) -> None:
        """Use ``rules`` for links of ``group`` and/or from sender address
        ``source`` (the most specific match wins; links already in use keep
        their random generator and counts but take the new rules)."""
        if not isinstance(rules, LinkRules):
            raise TypeError(f"rules={rules!r} must be a LinkRules")
        if group is None and source is None:
            self.default_rules = rules
        else:
            self._rules[(group, source)] = rules
        for receiver in self.receivers:
            for key, link in receiver.links.items():
                link.rules = self._rules_for(receiver.spec.group, key[0])

    def _rules_for(self, group: str, source_host: str) -> LinkRules:
        for key in ((group, source_host), (group, None), (None, source_host)):
            if key in self._rules:
                return self._rules[key]
        return self.default_rules

    # -- the network interface (see mcast_trio._net) --------------------------

    def open_receiver(self, spec, *, rcvbuf=None) -> MemoryReceiver:
        receiver = MemoryReceiver(self, spec, rcvbuf, len(self.receivers))
        self.receivers.append(receiver)
        self._members.setdefault((spec.group, spec.port), []).append(receiver)
        return receiver

    def open_sender(self, spec, *, sndbuf=None, loop=True, local_address=None) -> MemorySender:
        host = str(local_address) if local_address is not None else ("::1" if ":" in spec.group else "127.0.0.1")
        self._next_port += 1
        sender = MemorySender(self, spec, (host, self._next_port), len(self.senders))
        self.senders.append(sender)
        return sender

    def _leave(self, receiver: MemoryReceiver) -> None:
        members = self._members.get((receiver.spec.group, receiver.spec.port), [])
        if receiver in members:
            members.remove(receiver)

    def members(self, group: str, port: int) -> int:
        """How many receivers have joined ``group``:``port`` now."""
        return len(self._members.get((group, port), []))

    # -- delivery ------------------------------------------------------------

    def _link(self, sender: MemorySender, receiver: MemoryReceiver) -> FaultLink:
        key = sender.source
        link = receiver.links.get(key)
        if link is None:
            seed = f"{self.seed}|{receiver.spec.group}|{receiver.spec.port}|{sender.number}|{receiver.number}"
            link = receiver.links[key] = FaultLink(self._rules_for(receiver.spec.group, sender.source[0]),
                                                   seed.encode())
        return link

    def _transmit(self, sender: MemorySender, data: bytes) -> None:
        spec = sender.spec
        for receiver in list(self._members.get((spec.group, spec.port), ())):
            source_filter = receiver.spec.source
            if source_filter is not None and source_filter != sender.source[0]:
                continue
            self._offer(self._link(sender, receiver), receiver, data, sender.source)

    @staticmethod
    def _offer(link: FaultLink, receiver: MemoryReceiver, data: bytes, source: tuple) -> None:
        for at, copy in link.process(data, trio.current_time()):
            receiver._enqueue(at, copy, source, link)

    def flush(self) -> None:
        """Release every held datagram now (in order: not counted as
        reordered)."""
        for receiver in self.receivers:
            for key, link in receiver.links.items():
                if link.held is not None:
                    link.held = (link.held[0], -math.inf)
                    for at, data in link.expire(trio.current_time()):
                        receiver._enqueue(at, data, key, link)

    @property
    def faults(self) -> FaultCounts:
        """Counts summed over every link of the network."""
        total = FaultCounts()
        for receiver in self.receivers:
            total += receiver.faults
        return total

    def __repr__(self) -> str:
        return f"<MemoryNetwork seed={self.seed} receivers={len(self.receivers)} senders={len(self.senders)}>"
