"""The multicast sender: a trio task that drains a bounded memory channel into
the socket in batches (``sendmmsg``), in order.

``open_sender`` is an async context manager: it resolves and validates the
group, opens the socket, starts the sender task in a nursery of its own and
yields a :class:`MulticastSender`. Leaving the block normally sends everything
queued before closing; cancellation closes at once and counts what was still
queued as ``unsent``.
"""

from __future__ import annotations

import secrets
import socket
from collections.abc import Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator

import trio

from . import _sockets

try:
    from . import _mmsg
except ImportError:  # not compiled
    _mmsg = None
from ._net import current_network
from ._format import HEADER, HEADER_SIZE
from ._framing import MAX_UDP_PAYLOAD, MclEncoder, NativeEncoder, encode_raw

__all__ = ["MulticastSender", "SenderStatistics", "open_sender", "serve_sender", "FRAMINGS"]

#: Framings a sender can use (``framing=``).
FRAMINGS = ("auto", "raw", "native", "mcl")
_MAX_PER_CALL = 1024  # datagrams handed to one sendmmsg call


def _is_readout(data) -> bool:
    """True if ``data`` is one well-formed serialized AstroPix readout."""
    try:
        size = len(data)
        return (size >= HEADER_SIZE and data[:3] == HEADER
                and int.from_bytes(data[15:19], "little") == size - HEADER_SIZE)
    except TypeError:
        return False


@dataclass(frozen=True)
class SenderStatistics:
    """A snapshot of a sender's counters.

    Attributes:
        messages: messages accepted by ``send``/``send_nowait``/``send_many``.
        datagrams: datagrams handed to the kernel.
        bytes: bytes handed to the kernel (datagram sizes).
        syscalls: ``sendmmsg``/``send`` calls made.
        waits: times the socket buffer was full and the task waited.
        errors: datagrams the kernel refused (the last error is ``last_error``).
        unsent: datagrams still queued when the sender was cancelled.
        queued: datagrams waiting in the channel now.
        last_error: the last OSError text, or None.
    """

    messages: int
    datagrams: int
    bytes: int
    syscalls: int
    waits: int
    errors: int
    unsent: int
    queued: int
    last_error: str | None


class MulticastSender:
    """Send datagrams to one multicast group; made by :func:`open_sender`.

    ``send``, ``send_readout`` and ``send_many`` may be called from several
    tasks; datagrams leave in the order they were queued.
    """

    def __init__(self, spec, endpoint, framing: str, topic, encoder, queue_size: int,
                 max_queued: int = 65536) -> None:
        self._max_queued = max_queued
        self._spec = spec
        self._endpoint = endpoint
        self._framing = framing
        self._topic = topic
        self._encoder = encoder
        self._send_channel, self._receive_channel = trio.open_memory_channel[list](queue_size)
        self._messages = 0
        self._datagrams = 0
        self._bytes = 0
        self._syscalls = 0
        self._waits = 0
        self._errors = 0
        self._unsent = 0
        self._queued = 0
        self._inflight = 0  # datagrams of the batch being transmitted, not yet sent
        self._last_error: str | None = None
        self._closed = False
        self._drained = trio.lowlevel.ParkingLot()

    # -- public API --------------------------------------------------------

    @property
    def group(self):
        """The resolved group (address, port, interface, TTL)."""
        return self._spec

    @property
    def framing(self) -> str:
        return self._framing

    def _encode(self, data, topic) -> list[bytes]:
        if self._closed:
            raise trio.ClosedResourceError("this sender is closed")
        if self._framing == "raw" or (self._framing == "auto" and topic is None and _is_readout(data)):
            return encode_raw(data)
        return self._encoder.encode(data, topic if topic is not None else self._topic)

    async def send(self, data, *, topic=None) -> None:
        """Queue one message (bytes-like) for sending.

        In ``raw`` framing the message is the datagram (at most 65507 bytes);
        in ``native`` and ``mcl`` framing it is fragmented as needed and
        ``topic`` overrides the sender's default topic.

        Blocks while the queue is full. Cancellation: if cancelled, the
        message was not queued.
        """
        await self._put(self._encode(data, topic))

    def send_nowait(self, data, *, topic=None) -> None:
        """Like :meth:`send` but never blocks.

        Raises:
            trio.WouldBlock: the queue is full; nothing was queued.
        """
        datagrams = self._encode(data, topic)
        if self._queued and self._queued + len(datagrams) > self._max_queued:
            raise trio.WouldBlock
        self._send_channel.send_nowait(datagrams)
        self._account(datagrams)

    async def send_readout(self, readout) -> None:
        """Send one readout (anything with ``to_bytes()``, e.g.
        :class:`AstroPix4Readout`), as astropix-analysis'
        ``MulticastSender.send_readout`` does: in raw (and auto) framing the
        datagram is exactly ``readout.to_bytes()``.

        Cancellation: as :meth:`send`.
        """
        data = readout.to_bytes()
        if self._framing == "auto":
            await self._put(encode_raw(data))
        else:
            await self.send(data)

    async def send_many(self, messages: Iterable, *, topic=None) -> None:
        """Queue many messages at once (one channel item, one batch).

        The fastest way to send: the sender task hands them to the kernel
        with as few ``sendmmsg`` calls as possible. Readouts (objects with
        ``to_bytes()``) and bytes-like objects may be mixed.

        Cancellation: if cancelled, none of the messages was queued.
        """
        if (topic is None and type(messages) is list and messages and self._framing in ("raw", "auto")
                and _mmsg is not None and not self._closed
                and _mmsg.raw_datagrams(messages, self._framing == "auto")):
            # Fast path: a list of serialized readouts (raw: of datagrams) as
            # bytes: they go as they are, checked in C.
            await self._put(messages[:], len(messages))
            return
        datagrams: list[bytes] = []
        count = 0
        for message in messages:
            count += 1
            if hasattr(message, "to_bytes") and not isinstance(message, (bytes, bytearray, memoryview)):
                message = message.to_bytes()
                if self._framing == "auto":
                    datagrams.extend(encode_raw(message))
                    continue
            datagrams.extend(self._encode(message, topic))
        if not datagrams:
            await trio.lowlevel.checkpoint()
            return
        await self._put(datagrams, count)

    async def flush(self) -> None:
        """Wait until every datagram queued so far has been handed to the
        kernel (or counted as an error).

        Returns as soon as those datagrams are done with, even while other
        tasks keep sending; also when the sender stops and counts them as
        ``unsent``.

        Cancellation: safe; cancelling the wait does not affect sending.
        """
        target = self._settled() + self._queued
        if self._flushed(target):
            await trio.lowlevel.checkpoint()
            return
        while not self._flushed(target):
            await self._drained.park()

    def _settled(self) -> int:
        return self._datagrams + self._errors + self._unsent

    def _flushed(self, target: int) -> bool:
        # queued == 0 also covers sends that failed after flush() began.
        return self._queued == 0 or self._settled() >= target

    def statistics(self) -> SenderStatistics:
        """Return a frozen snapshot of the counters."""
        return SenderStatistics(
            messages=self._messages,
            datagrams=self._datagrams,
            bytes=self._bytes,
            syscalls=self._syscalls,
            waits=self._waits,
            errors=self._errors,
            unsent=self._unsent,
            queued=self._queued,
            last_error=self._last_error,
        )

    # -- internals -----------------------------------------------------------

    def _account(self, datagrams: list[bytes], messages: int = 1) -> None:
        self._messages += messages
        self._queued += len(datagrams)

    async def _put(self, datagrams: list[bytes], messages: int = 1) -> None:
        # Count the datagrams as queued *before* the hand-off: once the
        # channel has them, the sender task may send them (and count them
        # out) before this task resumes. A send that raises queued nothing.
        count = len(datagrams)
        # Bound the datagrams waiting, not only the channel items (one
        # send_many is one item); a batch larger than the bound goes alone.
        while self._queued and self._queued + count > self._max_queued:
            await self._drained.park()
        self._queued += count
        try:
            await self._send_channel.send(datagrams)
        except BaseException:
            self._queued -= count
            self._drained.unpark_all()
            raise
        self._messages += messages

    def _drop_queued(self) -> None:
        """The sender task has stopped: count what it never sent as unsent.

        Counts exactly the datagrams still in the channel (taking over those
        of senders blocked on it, whose ``send`` then succeeds) and the rest
        of the batch being transmitted; a concurrent ``send`` that fails
        un-counts its own datagrams.
        """
        left = self._inflight
        self._inflight = 0
        while True:
            try:
                item = self._receive_channel.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                break
            left += len(item)
        self._queued -= left
        self._unsent += left
        self._drained.unpark_all()

    async def _run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """The sender task: channel -> socket, in batches, in order."""
        receive = self._receive_channel
        task_status.started()
        try:
            async for first in receive:
                batch = first
                copied = False
                # Gather what else is queued, without waiting, into one batch.
                while len(batch) < _MAX_PER_CALL:
                    try:
                        more = receive.receive_nowait()
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                    if not copied:
                        batch = list(batch)
                        copied = True
                    batch.extend(more)
                self._inflight = len(batch)
                await self._transmit(batch)
        except BaseException:
            # Cancelled (or failed): whatever was queued never left.
            self._drop_queued()
            raise

    async def _transmit(self, datagrams: list[bytes]) -> None:
        endpoint = self._endpoint
        i = 0
        n = len(datagrams)
        while i < n:
            chunk = datagrams[i:i + _MAX_PER_CALL] if (i or n > _MAX_PER_CALL) else datagrams
            try:
                sent = endpoint.send_batch(chunk)
            except OSError as exc:
                # The kernel refused datagram i (e.g. EMSGSIZE): count, skip.
                self._errors += 1
                self._last_error = f"{exc} (datagram of {len(datagrams[i])} bytes)"
                self._queued -= 1
                self._inflight -= 1
                i += 1
                continue
            self._syscalls += 1
            if sent:
                self._datagrams += sent
                self._bytes += sum(map(len, datagrams[i:i + sent]))
                self._queued -= sent
                self._inflight -= sent
                i += sent
            else:
                self._waits += 1
                await endpoint.wait_writable()
        self._drained.unpark_all()  # flush() callers re-check their target
        await trio.lowlevel.checkpoint()

    def _close_input(self) -> None:
        self._closed = True
        self._send_channel.close()


@asynccontextmanager
async def open_sender(
    group: str,
    port: int,
    *,
    interface: Any = None,
    ttl: int = 1,
    loop: bool = True,
    framing: str = "auto",
    topic: str | bytes | None = None,
    sender_id: int | None = None,
    max_datagram: int | None = None,
    queue_size: int = 1024,
    max_queued: int = 65536,
    sndbuf: int | None = None,
    local_address: str | None = None,
    network: Any = None,
) -> AsyncIterator[MulticastSender]:
    """Open a multicast sender for ``group``:``port``.

    Args:
        group: IPv4 or IPv6 multicast group (``"ff12::1%mc0"`` may carry the
            interface as a scope).
        port: UDP port, 1..65535.
        interface: name, index or address of the interface to send on; the
            default is the loopback interface, so nothing leaves the host
            unless you name one.
        ttl: multicast TTL / hop limit, 0..255 (default 1: the local link).
        loop: whether local receivers on this host get the datagrams.
        framing: ``"auto"`` (default: AstroPix readouts, whether given as
            readout objects or as serialized bytes, go raw, exactly as
            astropix-analysis sends them; other messages use the native
            framed mode),
            ``"raw"`` (every message is one datagram), ``"native"`` or
            ``"mcl"`` (MCL-compatible msgpack).
        topic: default topic of framed messages.
        sender_id: native framing's 64-bit sender id (random by default).
        max_datagram: largest datagram of the framed modes (native default:
            1472 for IPv4, 1452 for IPv6).
        queue_size: bound of the memory channel between callers and the
            sender task (in messages: one ``send_many`` is one), >= 1.
        max_queued: most datagrams waiting to be sent at once; ``send``
            waits (``send_nowait`` raises ``trio.WouldBlock``) beyond it. A
            single batch larger than this is accepted when nothing waits.
        sndbuf: SO_SNDBUF to request, or None for the system default.
        local_address: bind to this unicast address of the host first (so
            that receivers with a source-specific membership accept the
            datagrams); None lets the kernel choose.
        network: the network to use (default: the current network, i.e.
            real sockets unless ``mcast_trio.testing`` installed another).

    Yields:
        A :class:`MulticastSender`.

    Cancellation: leaving the block normally waits until every queued
    datagram was handed to the kernel; if the block is cancelled, queued
    datagrams are dropped (counted in ``statistics().unsent``). The socket is
    closed in every case.
    """
    if framing not in FRAMINGS:
        raise ValueError(f"framing={framing!r} is not a framing; allowed: {', '.join(map(repr, FRAMINGS))}")
    if isinstance(queue_size, bool) or not isinstance(queue_size, int) or queue_size < 1:
        raise ValueError(f"queue_size={queue_size!r} is out of range; allowed: an integer >= 1")
    if isinstance(max_queued, bool) or not isinstance(max_queued, int) or max_queued < 1:
        raise ValueError(f"max_queued={max_queued!r} is out of range; allowed: an integer >= 1")
    spec = _sockets.resolve_group(group, port, interface=interface, ttl=ttl)
    encoder = None
    if framing in ("auto", "native"):
        kwargs = {}
        if max_datagram is not None:
            kwargs["max_datagram"] = max_datagram
        elif spec.family == socket.AF_INET6:
            kwargs["max_datagram"] = 1452
        encoder = NativeEncoder(sender_id=sender_id if sender_id is not None else secrets.randbits(64),
                                topic=topic if topic is not None else b"", **kwargs)
    elif framing == "mcl":
        encoder = MclEncoder(topic=topic) if max_datagram is None else MclEncoder(topic=topic,
                                                                                   chunk_size=max_datagram)
    elif max_datagram is not None and not 1 <= max_datagram <= MAX_UDP_PAYLOAD:
        raise ValueError(f"max_datagram={max_datagram!r} is out of range; allowed: 1..{MAX_UDP_PAYLOAD}")
    if network is None:
        network = current_network()
    endpoint = network.open_sender(spec, sndbuf=sndbuf, loop=loop, local_address=local_address)
    try:
        sender = MulticastSender(spec, endpoint, framing, topic, encoder, queue_size, max_queued)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(sender._run)
                try:
                    yield sender
                finally:
                    sender._close_input()
        finally:
            # Anything queued after the sender task stopped never leaves.
            sender._drop_queued()
    finally:
        endpoint.close()


async def serve_sender(group: str, port: int, *, task_status=trio.TASK_STATUS_IGNORED, **options) -> None:
    """Run a sender as a service, for ``await nursery.start(serve_sender, group, port)``.

    Takes the options of :func:`open_sender`; ``task_status.started()`` is
    called with the :class:`MulticastSender` once its socket is open. Runs
    until cancelled.

    Cancellation: the only way to stop it; datagrams still queued are
    dropped and counted in ``statistics().unsent``, and the socket is closed.
    """
    async with open_sender(group, port, **options) as sender:
        task_status.started(sender)
        await trio.sleep_forever()
